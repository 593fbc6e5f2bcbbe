"""End to end in a browser: the five notebooks in a real JupyterLab, driven by headless Chromium.

A copy of notebooks/ (the real ones are never touched) gets the demo's small settings injected the way
papermill injects them (an `injected-parameters` cell after the `parameters` cell), then each notebook
is opened in JupyterLab and run cell by cell with Shift+Enter against one run folder, like a person
would. In 03_train_lora the `steps` widget is changed before training, and the run folder must follow
the widget, not the parameter. In 04_sample an inline video must actually play.

Waits are on concrete states (kernel name shown, execution prompts, kernel idle, tab saved, video
frames presented), each with a generous limit and a message that says what was awaited and what the
page showed instead; a failure also leaves FAILED_<notebook>.png. Screenshots, the JupyterLab log,
the browser console and timings.json go to browser-artifacts/ (LONGCAT_NB_BROWSER_ARTIFACTS).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from lab_server import start_lab, stop_lab

pytestmark = pytest.mark.browser

# Differs from DEMO_PARAMETERS["steps"] (and is cheaper): the run can only get it from the widget.
WIDGET_STEPS = 12
NOTEBOOK_TIMEOUT_S = float(os.environ.get("LONGCAT_NB_BROWSER_NOTEBOOK_TIMEOUT", 900))  # one notebook's cells
UI_TIMEOUT_S = float(os.environ.get("LONGCAT_NB_BROWSER_UI_TIMEOUT", 120))  # page load, kernel start, save
VIEWPORT = {"width": 1400, "height": 1000}

# The state of the open notebook, read in the page: kernel name, execution status, one prompt per
# cell (None for markdown), any open dialog, and whether the tab has unsaved changes.
STATE_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const dialog = document.querySelector('.jp-Dialog');
  if (!panel) return {panel: false, dialog: dialog ? dialog.innerText : null};
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')];
  const kernel = panel.querySelector('.jp-Toolbar-kernelName');
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const tab = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current');
  return {
    panel: true,
    kernel: kernel ? kernel.innerText.trim() : null,
    status: indicator ? indicator.dataset.status : null,
    prompts: cells.map(c => c.classList.contains('jp-CodeCell')
      ? (c.querySelector('.jp-InputPrompt') || {innerText: ''}).innerText.trim() : null),
    active: cells.findIndex(c => c.classList.contains('jp-mod-active')),
    commandMode: !!panel.querySelector('.jp-Notebook.jp-mod-commandMode'),
    dirty: !!(tab && tab.classList.contains('jp-mod-dirty')),
    dialog: dialog ? dialog.innerText : null,
  };
}"""

# Play a <video> from the start and wait for the compositor to present frames.
PLAY_VIDEO_JS = """async (v) => {
  const within = (p, ms, what) => Promise.race([p, new Promise((_, no) => setTimeout(() => no(new Error(what)), ms))]);
  if (v.error) return {error: v.error.code};
  if (v.readyState < 2)
    await within(new Promise(ok => v.addEventListener('loadeddata', ok, {once: true})), 30000,
                 'no loadeddata within 30 s (readyState ' + v.readyState + ')');
  v.pause();
  v.currentTime = 0;
  const t0 = v.currentTime;
  await within(v.play(), 30000, 'play() did not resolve within 30 s');
  const mediaTimes = await within(new Promise(ok => {
    const seen = [];
    const onFrame = (now, meta) => { seen.push(meta.mediaTime); seen.length >= 4 ? ok(seen) : v.requestVideoFrameCallback(onFrame); };
    v.requestVideoFrameCallback(onFrame);
  }), 30000, 'no video frames presented within 30 s');
  return {t0, mediaTimes, currentTime: v.currentTime, paused: v.paused, width: v.videoWidth,
          height: v.videoHeight, duration: v.duration, decodedFrames: v.getVideoPlaybackQuality().totalVideoFrames,
          error: v.error ? v.error.code : null};
}"""

PROMPT_DONE = re.compile(r"^\[\d+\]:$")


def prepare_notebooks(dest: Path, run_dir: Path, kernel_name: str) -> list[Path]:
    """Copies of notebooks/ with DEMO_PARAMETERS (and run_dir) injected as papermill would, set to
    the kit's kernel. Returns them in order."""
    import nbformat
    import papermill
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from longcat_nb.runner import DEMO_PARAMETERS, list_notebooks

    params = dict(DEMO_PARAMETERS, run_dir=str(run_dir))
    out = []
    for src in list_notebooks():
        declared = papermill.inspect_notebook(str(src))
        assert "run_dir" in declared, f"{src.name}: its parameters cell declares no run_dir"
        nb = parameterize_notebook(load_notebook_node(str(src)),
                                   {k: v for k, v in params.items() if k in declared},
                                   kernel_name=kernel_name, language="python")
        nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "Python (longcat-nb)",
                                     "language": "python"}
        nbformat.write(nb, dest / src.name)
        out.append(dest / src.name)
    return out


def form_cell_index(nb_path: Path) -> int:
    """The cell that builds the notebook's widget form (`form = ...`), after the parameters."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and re.search(r"^form = ", cell.source, re.M):
            return i
    raise AssertionError(f"{nb_path.name}: no cell builds the form (`form = ...`); the browser test expects "
                         "the form cell right after the parameters cell")


def ansi_free(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class NotebookInLab:
    """One notebook open in JupyterLab; every wait names what it waits for and fails with the state."""

    def __init__(self, page, server, artifacts: Path, path: Path):
        import nbformat

        self.page, self.server, self.artifacts, self.path = page, server, artifacts, path
        self.name = path.stem
        self.n_cells = len(nbformat.read(path, as_version=4).cells)
        self.panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    # -- state and failure -------------------------------------------------------------------------
    def state(self) -> dict:
        try:
            return self.page.evaluate(STATE_JS)
        except Exception as e:  # the page itself is gone: say so instead of hiding the first error
            return {"error reading page state": repr(e)}

    def fail(self, message: str):
        shot = self.artifacts / f"FAILED_{self.name}.png"
        try:
            self.page.screenshot(path=str(shot))
        except Exception:
            shot = "(screenshot failed)"
        pytest.fail(f"{self.name}: {message}\n  page state: {json.dumps(self.state())}\n  screenshot: {shot}\n"
                    f"  JupyterLab log (tail):\n{self.server.log_tail(2000)}", pytrace=False)

    def wait_for(self, js: str, arg, timeout_s: float, what: str):
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return self.page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=250).json_value()
        except PlaywrightTimeout:
            self.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def cell(self, i: int):
        return self.panel.locator(".jp-Notebook .jp-Cell").nth(i)

    # -- steps -------------------------------------------------------------------------------------
    def open(self, kernel_display: str):
        self.page.goto(f"{self.server.url}/lab/tree/{self.path.name}?reset&token={self.server.token}",
                       timeout=UI_TIMEOUT_S * 1000)
        self.wait_for(
            """([n, kernel]) => {
                 const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                 if (!panel) return false;
                 const k = panel.querySelector('.jp-Toolbar-kernelName');
                 const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
                 return panel.querySelectorAll('.jp-Notebook .jp-Cell').length === n && k && k.innerText.trim() === kernel
                        && ind && ind.dataset.status === 'idle';
               }""",
            [self.n_cells, kernel_display], UI_TIMEOUT_S,
            f"the notebook to load with its {self.n_cells} cells and kernel '{kernel_display}' idle")

    def select(self, i: int):
        """Make cell i the active cell in command mode (a click on its prompt, as a person would)."""
        self.page.keyboard.press("Escape")
        self.cell(i).locator(".jp-InputPrompt").first.click()
        self.wait_for("""(i) => { const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                                  const cells = p.querySelectorAll('.jp-Notebook .jp-Cell');
                                  return cells[i] && cells[i].classList.contains('jp-mod-active')
                                         && !!p.querySelector('.jp-Notebook.jp-mod-commandMode'); }""",
                      i, UI_TIMEOUT_S, f"cell {i} to become the active cell in command mode")

    def run_cells(self, start: int, stop: int, timeout_s: float = NOTEBOOK_TIMEOUT_S) -> float:
        """Shift+Enter from cell `start` through cell `stop - 1` (Ctrl+Enter on the notebook's last
        cell, so no empty cell is appended), then wait until nothing is queued and the kernel is idle.
        Every code cell in the range must then show an execution count. Returns the seconds taken."""
        t0 = time.monotonic()
        self.select(start)
        for i in range(start, stop):
            self.page.keyboard.press("Control+Enter" if i == self.n_cells - 1 else "Shift+Enter")
        # Done = nothing queued ([*]), the kernel idle, and either every code cell of the range numbered
        # or an error shown (JupyterLab clears the queue after an error). "No [*] and idle" alone can
        # hold for a moment before the keystrokes are handled, so it is not enough.
        self.wait_for("""([start, stop]) => {
                 const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                 const cells = [...p.querySelectorAll('.jp-Notebook .jp-Cell')];
                 const prompt = c => { const e = c.querySelector('.jp-InputPrompt');
                                       return c.classList.contains('jp-CodeCell') && e ? e.innerText.trim() : null; };
                 const prompts = cells.map(prompt);
                 const ind = p.querySelector('.jp-Notebook-ExecutionIndicator');
                 if (prompts.includes('[*]:') || !ind || ind.dataset.status !== 'idle') return false;
                 const ran = prompts.slice(start, stop).every(x => x === null || /^\\[\\d+\\]:$/.test(x));
                 const failed = !!p.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
                                && [...p.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
                                   .some(e => e.innerText.includes('Traceback'));
                 return ran || failed; }""",
                      [start, stop], timeout_s, f"cells {start}..{stop - 1} to finish running (all numbered, or an "
                      "error shown; no [*] prompt; kernel idle)")
        prompts = self.state()["prompts"]
        not_run = [i for i in range(start, stop) if prompts[i] is not None and not PROMPT_DONE.match(prompts[i])]
        if not_run:
            errors = self.errors_in_page(start, stop)
            self.fail(f"code cell(s) {not_run} did not run (prompts {[prompts[i] for i in not_run]})"
                      + (f"; an earlier cell raised:\n{errors}" if errors else
                         "; no traceback on the page: the keystrokes did not reach the notebook"))
        return time.monotonic() - t0

    def errors_in_page(self, start: int, stop: int) -> str:
        texts = []
        for i in range(start, stop):
            for t in self.cell(i).locator('[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts():
                if "Traceback" in t or "Error" in t:
                    texts.append(f"[cell {i}] {t[-3000:]}")
        return "\n".join(texts)

    def save_and_check(self, start: int, stop: int) -> dict:
        """Ctrl+S, wait for the tab to be clean, then read the saved file: no error output, and
        an execution count on every code cell in the range (what the page showed was what ran)."""
        import nbformat

        self.select(stop - 1)
        self.page.keyboard.press("Control+s")
        self.wait_for("""() => { const t = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current');
                                 return !!t && !t.classList.contains('jp-mod-dirty'); }""",
                      None, UI_TIMEOUT_S, "the notebook tab to be saved (not dirty) after Ctrl+S")
        nb = nbformat.read(self.path, as_version=4)
        for i, cell in enumerate(nb.cells[start:stop], start):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    tb = ansi_free("\n".join(out.get("traceback", [])))
                    self.fail(f"cell {i} raised {out.get('ename')}: {out.get('evalue')}\n"
                              f"--- cell source ---\n{cell.source}\n--- traceback ---\n{tb[-4000:]}")
        unrun = [i for i, c in enumerate(nb.cells[start:stop], start)
                 if c.cell_type == "code" and c.get("execution_count") is None]
        if unrun:
            self.fail(f"the saved notebook has no execution count on code cell(s) {unrun}")
        return nb

    def screenshot_output(self, i: int, filename: str) -> Path:
        """The output area of cell i (e.g. its widget form)."""
        path = self.artifacts / filename
        self.cell(i).locator(".jp-Cell-outputArea").screenshot(path=str(path))
        return path

    def screenshot_form(self, i: int, filename: str) -> Path:
        """The whole output of cell i in a viewport tall enough for it (JupyterLab scrolls inside the page,
        so what is out of view would be cut)."""
        self.page.set_viewport_size({"width": VIEWPORT["width"], "height": 2600})
        try:
            self.cell(i).scroll_into_view_if_needed()
            return self.screenshot_output(i, filename)
        finally:
            self.page.set_viewport_size(VIEWPORT)

    def screenshot_page(self, filename: str) -> Path:
        path = self.artifacts / filename
        self.page.screenshot(path=str(path))
        return path

    def widget_input(self, form_cell: int, label: str, tag: str = "input"):
        """The <input> (or `tag`: select, textarea) of the form widget whose label is exactly `label`."""
        box = self.cell(form_cell).locator(".jupyter-widgets.widget-inline-hbox").filter(
            has=self.page.locator("label.widget-label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))
        if box.count() != 1:
            self.fail(f"expected one widget labelled {label!r} in the form (cell {form_cell}), found {box.count()}")
        return box.locator(tag)

    def estimate(self, form_cell: int) -> str:
        return self.cell(form_cell).locator(".longcat-estimate").inner_text()

    def wait_until(self, check, what: str, timeout_s: float = UI_TIMEOUT_S):
        """Poll `check()` (a round trip through the kernel: widget -> observer -> widgets) until true."""
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > timeout_s:
                self.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
            self.page.wait_for_timeout(250)

    def wait_for_form(self, form_cell: int, n_widgets: int):
        self.wait_for("""([i, n]) => { const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                                       const c = p.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                                       return !!c && c.querySelectorAll('.jupyter-widgets .widget-label').length >= n; }""",
                      [form_cell, n_widgets], UI_TIMEOUT_S,
                      f"the form in cell {form_cell} to render at least {n_widgets} labelled ipywidgets "
                      "(if it shows text like 'VBox(children=...)', the JupyterLab widget renderer is missing)")


REPORT_SECTIONS = ("settings", "dataset", "cache", "loss", "validation", "samples")


def check_report_page(page, run_dir: Path, artifacts_dir: Path) -> dict:
    """The run's report.html (written by every notebook's last cell), opened from disk: every section
    is there and shown, the loss curve is drawn, and its videos load."""
    report = run_dir / "report.html"
    assert report.exists(), f"{report} was not written by the notebooks' last cells"
    page.goto(report.resolve().as_uri())
    state = page.evaluate("""(ids) => ids.map(id => {
        const s = document.getElementById(id);
        return {id, present: !!s, visible: !!s && s.offsetHeight > 0, text: s ? s.innerText.slice(0, 200) : ''};
    })""", list(REPORT_SECTIONS))
    missing = [x["id"] for x in state if not (x["present"] and x["visible"])]
    assert not missing, f"report.html lacks visible sections {missing}: {state}"
    assert page.locator("#loss svg").count() >= 1, "report.html: no loss curve (svg) in the loss section"
    n_videos = page.evaluate("() => document.querySelectorAll('video').length")
    assert n_videos >= 2, f"report.html shows {n_videos} video(s); expected the base and LoRA samples"
    # every clip decodes: metadata loaded (duration known) and, after a seek, a frame at that time
    page.wait_for_function("() => [...document.querySelectorAll('video')].every(v => v.readyState >= 1)",
                           timeout=UI_TIMEOUT_S * 1000)
    videos = page.evaluate("""async () => Promise.all([...document.querySelectorAll('video')].map(v =>
        new Promise(done => { v.addEventListener('seeked', () => done({duration: v.duration,
            ready: v.readyState, width: v.videoWidth, error: v.error && v.error.code}), {once: true});
            v.currentTime = Math.min(0.1, v.duration / 2); })))""")
    bad = [v for v in videos if not (v["duration"] > 0 and v["width"] > 0 and v["ready"] >= 2 and not v["error"])]
    assert not bad, f"report.html videos that do not decode: {bad} (all: {videos})"
    page.screenshot(path=str(artifacts_dir / "report.png"), full_page=True)
    return {"sections": len(state), "videos": videos}


def test_notebooks_in_jupyterlab(browser_requirements, tmp_path, artifacts_dir):
    from playwright.sync_api import sync_playwright

    from longcat_nb.runner import DEMO_PARAMETERS, KERNEL_NAME, ensure_kernel

    t_start = time.monotonic()
    timings: dict = {"notebooks": {}}
    assert DEMO_PARAMETERS["steps"] != WIDGET_STEPS
    kernel = ensure_kernel()  # the kit's kernelspec, running this interpreter
    assert kernel == KERNEL_NAME
    root, run_dir = tmp_path / "lab", tmp_path / "run"
    root.mkdir()
    notebooks = prepare_notebooks(root, run_dir, kernel)
    stems = [p.stem for p in notebooks]
    assert {"03_train_lora", "04_sample"} <= set(stems) and stems.index("03_train_lora") < stems.index("04_sample"), \
        f"the test checks 03_train_lora's steps widget and 04_sample's video; notebooks/ has {stems}"

    t_lab = time.monotonic()
    server = start_lab(root, tmp_path / "lab-state", artifacts_dir / "jupyterlab.log")
    console_log = open(artifacts_dir / "browser-console.log", "w")
    try:
        timings["lab_start_s"] = round(time.monotonic() - t_lab, 1)
        spec = server.api("GET", "/api/kernelspecs")["kernelspecs"].get(kernel)
        assert spec, f"JupyterLab does not list the kernel {kernel!r} that runner.ensure_kernel() installed"
        argv0 = Path(spec["spec"]["argv"][0])
        assert argv0.resolve() == Path(sys.executable).resolve(), \
            f"kernelspec {kernel!r} runs {argv0}, not this interpreter {sys.executable}: remove the other copy"
        kernel_display = spec["spec"]["display_name"]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=browser_requirements, headless=True,
                # --no-sandbox: CI containers (and root) have no user namespaces for chromium's sandbox;
                # the page is our own localhost server. Autoplay: play() must not need a user gesture.
                args=["--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"])
            timings["chromium"] = browser.version
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(UI_TIMEOUT_S * 1000)
            page.on("console", lambda m: console_log.write(f"[{m.type}] {m.text}\n"))
            page.on("pageerror", lambda e: console_log.write(f"[pageerror] {e}\n"))
            try:
                for path in notebooks:
                    t_nb = time.monotonic()
                    nb = NotebookInLab(page, server, artifacts_dir, path)
                    nb.open(kernel_display)
                    form = form_cell_index(path)
                    nb.run_cells(0, form + 1)
                    nb.wait_for_form(form, 1)

                    if nb.name == "03_train_lora":
                        steps = nb.widget_input(form, "steps")
                        shown = steps.input_value()
                        assert shown == str(DEMO_PARAMETERS["steps"]), \
                            f"03: the steps widget shows {shown!r}, not the injected parameter {DEMO_PARAMETERS['steps']}"
                        steps.fill(str(WIDGET_STEPS))
                        steps.press("Enter")  # IntText sends its value to the kernel on change
                        steps.evaluate("e => e.blur()")
                        assert steps.input_value() == str(WIDGET_STEPS)
                        check_group_and_preset(nb, form)
                    if nb.name == "04_sample":
                        check_estimate_follows_frames(nb, form)
                    nb.screenshot_form(form, f"{nb.name}_widgets.png")

                    nb.run_cells(form + 1, nb.n_cells)
                    nb.save_and_check(0, nb.n_cells)
                    nb.screenshot_page(f"{nb.name}_done.png")

                    if nb.name == "03_train_lora":
                        check_training_followed_widget(nb, run_dir)
                    if nb.name == "04_sample":
                        timings["video"] = check_video_plays(nb, artifacts_dir)
                    timings["notebooks"][nb.name] = round(time.monotonic() - t_nb, 1)
                    page.goto("about:blank")
                    server.shutdown_kernels()
                timings["report"] = check_report_page(page, run_dir, artifacts_dir)
            finally:
                browser.close()
        check_run_folder(run_dir)
    finally:
        console_log.close()
        stop_lab(server)
        timings["total_s"] = round(time.monotonic() - t_start, 1)
        (artifacts_dir / "timings.json").write_text(json.dumps(timings, indent=2))
        print(f"\n[browser test] timings: {json.dumps(timings)}")


def check_group_and_preset(nb: NotebookInLab, form: int):
    """03: the memory & speed group opens; the 24 GiB card preset fills its fields and the estimate follows;
    the cpu/tiny preset puts them back to what the tiny CPU run needs."""
    swap = nb.widget_input(form, "blocks to swap")
    if swap.is_visible():
        nb.fail("the memory & speed group is open before anyone opens it")
    nb.cell(form).get_by_text(re.compile(r"^memory & speed \(\d+\)$")).click()
    nb.wait_until(swap.is_visible, "the memory & speed group to open after a click on its title")
    nb.screenshot_form(form, "03_train_lora_group_open.png")
    if swap.input_value() != "0":
        nb.fail(f"blocks to swap shows {swap.input_value()!r} before any preset; the parameters say 0")
    before = nb.estimate(form)
    nb.widget_input(form, "card preset", "select").select_option("24 GiB")
    nb.wait_until(lambda: swap.input_value() not in ("", "0") and "fits in 24 GiB" in nb.estimate(form),
                  "the 24 GiB preset to fill blocks to swap and the estimate to say it fits in 24 GiB")
    if nb.estimate(form) == before:
        nb.fail(f"the estimate did not change with the preset: {before!r}")
    nb.screenshot_form(form, "03_train_lora_preset_24GiB.png")
    nb.widget_input(form, "card preset", "select").select_option("cpu/tiny")
    nb.wait_until(lambda: swap.input_value() == "0" and "no GPU chosen" in nb.estimate(form),
                  "the cpu/tiny preset to set blocks to swap back to 0")


def check_estimate_follows_frames(nb: NotebookInLab, form: int):
    """04: the live estimate changes when the frame count changes (and back)."""
    frames = nb.widget_input(form, "num frames")
    shown, before = frames.input_value(), nb.estimate(form)
    for value in ("93", shown):
        frames.fill(value)
        frames.press("Enter")
        if value == "93":
            nb.wait_until(lambda: "x93," in nb.estimate(form) and nb.estimate(form) != before,
                          "the estimate to follow num frames = 93")
            nb.screenshot_form(form, "04_sample_estimate_93_frames.png")
    nb.wait_until(lambda: nb.estimate(form) == before, f"the estimate to return with num frames = {shown}")


def check_training_followed_widget(nb: NotebookInLab, run_dir: Path):
    """The edited widget, not the injected parameter, decided the training run."""
    from longcat_nb.runner import DEMO_PARAMETERS

    cfg = json.loads((run_dir / "config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines() if line.strip()]
    problems = []
    if cfg["train"]["steps"] != WIDGET_STEPS:
        problems.append(f"config.json train.steps = {cfg['train']['steps']}")
    if len(log) != WIDGET_STEPS or log[-1]["step"] != WIDGET_STEPS:
        problems.append(f"logs/train.jsonl has {len(log)} records, last step {log[-1]['step'] if log else None}")
    lora = run_dir / "lora" / f"lora-step{WIDGET_STEPS:06d}.safetensors"
    if not lora.exists():
        problems.append(f"no {lora.name} in lora/ (found {sorted(p.name for p in (run_dir / 'lora').glob('*'))})")
    if problems:
        nb.fail(f"the steps widget was set to {WIDGET_STEPS} (parameter {DEMO_PARAMETERS['steps']}) "
                "but the run did not follow it: "
                + "; ".join(problems))
    if not re.search(rf"\b{WIDGET_STEPS} steps\b", nb.panel.inner_text()):
        nb.fail(f"the page does not show '{WIDGET_STEPS} steps' after training (03 prints '<steps> steps; loss ...')")


def check_video_plays(nb: NotebookInLab, artifacts: Path) -> dict:
    """04 shows base and LoRA samples as inline <video>s; the LoRA one must decode and play."""
    videos = nb.panel.locator(".jp-OutputArea video")
    count = videos.count()
    if count < 2:
        nb.fail(f"expected the base and LoRA samples as inline <video> elements, found {count} "
                "(a GIF <img> means the notebook ran in headless mode: LONGCAT_NB_HEADLESS leaked into the kernel)")
    video = videos.nth(count - 1)
    video.scroll_into_view_if_needed()
    try:
        info = video.evaluate(PLAY_VIDEO_JS)
    except Exception as e:
        nb.fail(f"the inline video did not play: {e}")
    if info.get("error"):
        nb.fail(f"the inline video failed with MediaError code {info['error']} (4 = the browser cannot decode it: "
                "Debian's chromium decodes H.264, playwright's own chromium build does not)")
    advanced = len(set(info["mediaTimes"])) >= 2 or info["currentTime"] != info["t0"]
    if info["paused"] or not advanced or info["width"] <= 0 or info["decodedFrames"] <= 0:
        nb.fail(f"the inline video is not playing: {info}")
    # while it plays: the cell's output (both videos), and the notebook around it
    video.locator("xpath=ancestor::div[contains(@class, 'jp-Cell-outputArea')]").screenshot(
        path=str(artifacts / "04_sample_video_playing.png"))
    nb.screenshot_page("04_sample_video_playing_page.png")
    return info


def check_run_folder(run_dir: Path):
    """What the five notebooks wrote into the one run folder."""
    cfg = json.loads((run_dir / "config.json").read_text())
    assert set(cfg) >= {"model", "dataset", "cache", "train", "sample"}, f"config.json sections: {sorted(cfg)}"
    assert (run_dir / "dataset.jsonl").read_text().strip(), "dataset.jsonl is empty"
    assert (run_dir / "cache" / "manifest.json").exists(), "02_cache wrote no cache/manifest.json"
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.mp4"))
    stem = "001_t2v_seed0_a-red-ball-bounces"  # the first sample group, 04's default prompt
    assert samples == [f"{stem}_base.mp4", f"{stem}_lora.mp4"], f"samples/: {samples}"
    lora_json = json.loads((run_dir / "samples" / f"{stem}_lora.json").read_text())
    used = [Path(p).name for p, _ in lora_json["loras"]]
    assert used == [f"lora-step{WIDGET_STEPS:06d}.safetensors"], \
        f"04 sampled with {used}, not the LoRA trained with the widget's {WIDGET_STEPS} steps"
