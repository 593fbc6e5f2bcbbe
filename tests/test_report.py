"""The run report (one HTML page) on a small fabricated run, an empty run and a damaged one; and the
notebooks' first (import / Colab) and last (report) cells."""
import json
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from longcat_nb.config import update_section
from longcat_nb.data.video import write_mp4
from longcat_nb.report import SECTIONS, build_report, report_link, write_report
from longcat_nb.runner import list_notebooks

EVIL = "<script>alert('x')</script> & \"quotes\""


class Sections(HTMLParser):
    """Per <section id=...>: its tags (name -> count), its text, and the attributes of its <video> tags."""

    def __init__(self):
        super().__init__()
        self.current = None
        self.tags, self.text, self.videos = {}, {}, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs["id"]
            self.tags[self.current], self.text[self.current], self.videos[self.current] = {}, "", []
        elif self.current:
            self.tags[self.current][tag] = self.tags[self.current].get(tag, 0) + 1
            if tag == "video":
                self.videos[self.current].append(attrs)

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current:
            self.text[self.current] += data


def parse(page: str) -> Sections:
    p = Sections()
    p.feed(page)
    return p


def _clip(path: Path, seed: int) -> Path:
    frames = np.random.default_rng(seed).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    return write_mp4(path, frames, fps=15)


def make_run(run_dir: Path) -> Path:
    update_section(run_dir, "model", device="cpu")
    update_section(run_dir, "train", steps=30, rank=4, validation_prompts=[EVIL])
    update_section(run_dir, "sample", prompt=EVIL)
    records = [{"file": f"/data/clip{i}.mp4", "kind": "video", "caption": EVIL if i == 0 else f"clip {i}",
                "condition_image": "/data/clip0.png" if i == 0 else None, "window": 0, "num_frames": 9,
                "height": 64, "width": 64, "bucket": "64x64@9", "crop_loss": 0.25, "caption_tokens": 10 + i,
                "duration_s": 0.6, "problems": []} for i in range(3)]
    (run_dir / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "dataset_problems.json").write_text(json.dumps(
        [{"file": "/data/<bad>.mp4", "kind": "too short", "value": "3 frames", "fix": "use a longer clip"}]))
    entries = {f"k{i}": {"index": i, "bucket": "64x64@9", "num_cond_latents": int(i == 0),
                         "latent_shape": [16, 3, 8, 8], "latents": f"l{i}", "text": f"t{i}"} for i in range(3)}
    manifest = {"format": "longcat-nb-cache", "version": 2, "encoder": "umt5", "complete": True,
                "settings": {"latent_dtype": "bfloat16"}, "entries": entries,
                "latents": {f"l{i}": {"bytes": 6000} for i in range(3)},
                "text": {f"t{i}": {"bytes": 7000} for i in range(3)}, "failed": []}
    (run_dir / "cache").mkdir()
    (run_dir / "cache" / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "train.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "sec": 0.1, "it_s": 10.0}) + "\n" for s in range(1, 31)))
    (run_dir / "lora").mkdir()
    (run_dir / "lora" / "lora-step000030.safetensors").write_bytes(b"x" * 100)
    for step in (10, 20):
        mp4 = _clip(run_dir / "samples" / "validation" / f"step{step:06d}_0.mp4", step)
        mp4.with_suffix(".json").write_text(json.dumps({"prompt": EVIL, "seed": 42, "steps": 2}))
    for name in ("base", "lora"):
        mp4 = _clip(run_dir / "samples" / f"t2v_seed0_{name}.mp4", len(name))
        mp4.with_suffix(".json").write_text(json.dumps({"prompt": EVIL, "seed": 0, "steps": 4, "loras": []}))
    return run_dir


def test_report_of_a_full_run(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report.html"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # written atomically
    page = out.read_text(encoding="utf-8")
    s = parse(page)
    assert list(s.tags) == list(SECTIONS)
    assert "class='missing'" not in page and "class='warn'" not in page  # nothing reported missing or broken
    assert "train" in s.text["settings"] and "validation_prompts" in s.text["settings"]
    assert s.tags["settings"]["table"] == 5
    assert "64x64@9" in s.text["dataset"] and "too short" in s.text["dataset"]
    assert "entries" in s.text["cache"] and "umt5" in s.text["cache"]
    assert s.tags["loss"].get("svg") == 1 and "lora-step000030.safetensors" in s.text["loss"]
    assert f"{sum(1 / k for k in range(21, 31)) / 10:.4g}" in s.text["loss"]  # mean of the last 10 losses
    assert len(s.videos["validation"]) == 2 and len(s.videos["samples"]) == 2
    assert "step 10" in s.text["validation"] and "step 20" in s.text["validation"]
    assert all(v["src"].startswith("data:video/mp4;base64,") for v in s.videos["samples"] + s.videos["validation"])
    # every caption/prompt is escaped: the only tags are the page's own
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert EVIL in s.text["samples"] and EVIL in s.text["dataset"]


def test_report_links_videos_over_the_budget_relative_to_the_page(tmp_path):
    run = make_run(tmp_path / "run")
    page = build_report(run, page_dir=tmp_path / "elsewhere", embed_budget=0)
    videos = parse(page).videos
    srcs = [v["src"] for v in videos["validation"] + videos["samples"]]
    assert len(srcs) == 4 and all(src.startswith("../run/samples/") for src in srcs)
    assert all((tmp_path / "elsewhere" / src).resolve().exists() for src in srcs)
    out = write_report(run, tmp_path / "elsewhere" / "r.html")
    assert out == tmp_path / "elsewhere" / "r.html" and out.exists()


def test_report_of_an_empty_run_says_what_to_run(tmp_path):
    s = parse(write_report(tmp_path).read_text(encoding="utf-8"))
    assert list(s.tags) == list(SECTIONS)
    expect = {"settings": "run 00_setup", "dataset": "run 01_dataset", "cache": "run 02_cache",
              "loss": "no training log yet", "validation": "validate_every", "samples": "run 04_sample"}
    for sid, words in expect.items():
        assert words in s.text[sid], (sid, s.text[sid])
        assert "svg" not in s.tags[sid] and "video" not in s.tags[sid]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_report_of_a_damaged_run_still_renders(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"train": {"stpes": 3}}))
    with open(run / "logs" / "train.jsonl", "a") as f:
        f.write('{"step": 31, "lo')  # a line cut short by a crash
    (run / "cache" / "manifest.json").write_text("{not json")
    s = parse(build_report(run))
    assert "stpes" in s.text["settings"] and "refuse" in s.text["settings"]
    assert s.tags["loss"].get("svg") == 1 and "1 line(s)" in s.text["loss"]
    assert "re-run 02_cache" in s.text["cache"]


def test_report_link_is_a_file_link_only_when_jupyter_can_serve_it(tmp_path, monkeypatch):
    from IPython.display import HTML, FileLink

    (tmp_path / "run").mkdir()
    out = write_report(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert isinstance(report_link(out), FileLink) and "run/report.html" in report_link(out)._repr_html_()
    monkeypatch.chdir(tmp_path / "run")
    (tmp_path / "run" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "sub")
    assert isinstance(report_link(out), HTML) and str(out.resolve()) in report_link(out).data


# ------------------------------------------------------------------------------------------------
# notebooks: first code cell (imports, Colab), last code cell (report)
# ------------------------------------------------------------------------------------------------
def _cells(nb_path):
    return json.loads(Path(nb_path).read_text(encoding="utf-8"))["cells"]


def _src(cell) -> str:
    return "".join(cell["source"])


def test_notebooks_start_with_the_import_cell_and_end_with_the_report():
    firsts = []
    for nb in list_notebooks():
        cells = _cells(nb)
        code = [c for c in cells if c["cell_type"] == "code"]
        first, params = code[0], code[1]
        assert "parameters" not in first["metadata"].get("tags", []), nb.name
        tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert tagged and tagged[0] is params, f"{nb.name}: the parameters cell must be the second code cell"
        assert 'KIT_SOURCE = "' in _src(first) and '"google.colab" in sys.modules' in _src(first)
        assert "USE_DRIVE = False" in _src(first), nb.name
        firsts.append(_src(first))
        assert "write_report(run_dir)" in _src(code[-1]), nb.name
        assert cells[-2]["cell_type"] == "markdown" and _src(cells[-2]).startswith("## Report")
        ids = [c["id"] for c in cells]
        assert len(ids) == len(set(ids)), nb.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb.name
    assert len(firsts) == 5 and len(set(firsts)) == 1, "the first code cell must be the same in every notebook"


def _first_cell() -> str:
    cells = _cells(list_notebooks()[0])
    return _src([c for c in cells if c["cell_type"] == "code"][0])


@pytest.fixture
def fake_colab(monkeypatch):
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda where: mounted.append(where))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return mounted


def test_first_cell_in_colab_installs_the_kit_when_missing(tmp_path, monkeypatch, fake_colab):
    import importlib.util
    import subprocess

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "longcat_nb" else real_find_spec(name, *a))
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args))
    monkeypatch.chdir(tmp_path)  # no checkout above this folder
    kit = tmp_path / "kit"
    ns = {}
    exec(_first_cell().replace('KIT_DIR = "/content/longcat-nb"', f"KIT_DIR = {str(kit)!r}"), ns)
    # a clone (data_samples/ comes with it), then an editable install of it
    assert calls == [["git", "clone", "--depth", "1", ns["KIT_SOURCE"], str(kit)],
                     [sys.executable, "-m", "pip", "install", "-q", "-e", str(kit)]]
    assert sys.path[0] == str(kit)
    sys.path.remove(str(kit))
    assert fake_colab == [] and Path.cwd() == tmp_path  # Drive stays off by default

    del sys.modules["google.colab"]
    with pytest.raises(ModuleNotFoundError, match="pip install -e"):
        exec(_first_cell(), {})


def test_first_cell_in_colab_mounts_drive_and_keeps_absolute_run_dirs(tmp_path, monkeypatch, fake_colab):
    root = tmp_path / "drive" / "longcat-nb"
    src = _first_cell().replace("USE_DRIVE = False", "USE_DRIVE = True")
    src = src.replace('RUN_ROOT = "/content/drive/MyDrive/longcat-nb"', f"RUN_ROOT = {str(root)!r}")
    monkeypatch.chdir(tmp_path)  # restored after the test
    exec(src, {})
    assert fake_colab == ["/content/drive"]
    # a relative run_dir (the default "runs/demo") now lands on Drive; an injected absolute one is untouched
    assert Path.cwd() == root and Path("runs/demo").resolve() == root / "runs" / "demo"


def test_report_link_is_a_link_for_a_kernel_in_notebooks_and_the_run_in_runs(tmp_path, monkeypatch):
    """`jupyter lab` started in the checkout: the kernel works in notebooks/, the run lies in runs/ next
    to it (paths.py); Jupyter serves both, so the report is a link."""
    from IPython.display import FileLink

    from longcat_nb.paths import ROOT_ENV

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "runs" / "r").mkdir(parents=True)
    out = write_report(tmp_path / "runs" / "r")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path / "notebooks")
    link = report_link(out)
    assert isinstance(link, FileLink) and "../runs/r/report.html" in link._repr_html_()
