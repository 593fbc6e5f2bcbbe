"""One self-contained HTML page per run: settings, dataset, cache, loss curve, validation and sample videos.

``write_report(run_dir)`` reads only what the notebooks left in the run folder (config.json, dataset.jsonl,
cache/manifest.json, logs/train.jsonl, samples/) and writes ``run_dir/report.html``, which opens from disk in
a browser without Jupyter. Every section says what is missing and which notebook makes it. The page has no
scripts and no external resources: the loss curve is inline SVG, and videos are embedded as data URIs while
they fit a size budget, else linked relative to the page. Nothing here loads torch or a model, so the report
is cheap enough to rewrite at the end of every notebook.

Written by hand rather than with a templating library: the page is a handful of tables and <video> tags,
and ``html.escape`` on every piece of text is the whole safety story.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from .io import atomic_write_text, sha256_file

REPORT_NAME = "report.html"
SECTIONS = ("settings", "dataset", "cache", "loss", "validation", "samples")
# Videos are embedded (base64) until they add up to this many bytes; the rest are linked. 20 MB of mp4
# is ~27 MB of page, still quick to open; a real run's 480x832x93 clips are ~1-3 MB each.
EMBED_BUDGET_BYTES = 20_000_000
MAX_TABLE_ROWS = 200

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;color:#1d1d1f}
h1{margin:24px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}h3{margin:18px 0 6px}
nav a{margin-right:12px}.meta{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.missing{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:8px 0}
.warn{background:#fdecea;border-left:4px solid #d93025;padding:8px 12px;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:16px}.card{border:1px solid #ddd;border-radius:6px;padding:8px;max-width:360px}
.card video{width:100%;max-width:344px;min-width:160px;background:#000;display:block}
.card p{margin:6px 0;font-size:13px;word-break:break-word}.card table{font-size:12px}
details{margin:4px 0}svg{max-width:100%;height:auto}
"""


# ------------------------------------------------------------------------------------------------
# small HTML pieces (every piece of text goes through esc)
# ------------------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _table(rows: list[dict] | dict, title: str = "", max_rows: int = MAX_TABLE_ROWS) -> str:
    numeric = not isinstance(rows, dict)  # right-aligned numbers read well in columns, not in key/value lists
    if isinstance(rows, dict):
        rows = [{"setting": k, "value": v} for k, v in rows.items()]
    rows = list(rows)
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows[:max_rows]:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cls = " class='num'" if numeric and isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='meta'>{len(rows) - max_rows} more rows not shown</p>" if len(rows) > max_rows else ""
    cap = f"<caption style='text-align:left'><b>{esc(title)}</b></caption>" if title else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _missing(text: str) -> str:
    return f"<p class='missing'>{esc(text)}</p>"


def _warn(text: str) -> str:
    return f"<p class='warn'>{esc(text)}</p>"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{sid}'>\n<h2>{esc(title)}</h2>\n{body}\n</section>\n"


def _read_json(path: Path) -> tuple[Any, Optional[str]]:
    """(data, None) or (None, a sentence saying why the file could not be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} could not be read ({type(e).__name__}: {e})"


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Records and the number of lines that did not parse (e.g. a line cut short by a crash)."""
    out, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    return out, bad


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def settings_section(run_dir: Path) -> str:
    path = run_dir / "config.json"
    if not path.exists():
        return _missing("no config.json yet: run 00_setup (every notebook writes its own section).")
    data, err = _read_json(path)
    if err:
        return _warn(err + "; fix it by hand or delete it to start from the defaults.")
    if not isinstance(data, dict):
        return _warn(f"{path}: expected a JSON object at the top level.")
    parts = []
    try:
        from .config import config_from_dict

        config_from_dict(data, str(path))
    except Exception as e:  # shown, not raised: the report must still describe a broken run
        parts.append(_warn(f"the kit would refuse this config: {e}"))
    cards = []
    for name, values in data.items():
        table = _table(values) if isinstance(values, dict) and values else _missing(f"section '{name}' is empty")
        cards.append(f"<div><h3>{esc(name)}</h3>{table}</div>")
    parts.append("<div class='grid'>" + "".join(cards) + "</div>")
    return "\n".join(parts)


def _problem_rows(run_dir: Path, records: list[dict]) -> tuple[list[dict], Optional[str]]:
    rows: list[dict] = []
    err = None
    path = run_dir / "dataset_problems.json"
    if path.exists():
        data, err = _read_json(path)
        for p in data if isinstance(data, list) else []:
            if isinstance(p, dict):
                rows.append({"file": p.get("file", ""), "problem": p.get("kind", ""),
                             "value": p.get("value", ""), "fix": p.get("fix", "")})
    for r in records:
        for p in r.get("problems") or []:
            if isinstance(p, dict):
                rows.append({"file": r.get("file", ""), "problem": p.get("kind", ""),
                             "value": p.get("value", ""), "fix": p.get("fix", "")})
            else:
                rows.append({"file": r.get("file", ""), "problem": str(p), "value": "", "fix": ""})
    return rows, err


def dataset_section(run_dir: Path) -> str:
    path = run_dir / "dataset.jsonl"
    if not path.exists():
        return _missing("no dataset.jsonl yet: run 01_dataset.")
    records, bad = _read_jsonl(path)
    parts = []
    if bad:
        parts.append(_warn(f"{bad} line(s) of {path} are not valid JSON; re-run 01_dataset to rewrite it."))
    if not records:
        parts.append(_missing("dataset.jsonl has no usable samples: check the problems below and re-run 01_dataset."))
    files = {r.get("file") for r in records}
    kinds = Counter(r.get("kind", "video") for r in records)
    tokens = [r["caption_tokens"] for r in records if isinstance(r.get("caption_tokens"), int)]
    seconds = sum(float(r.get("duration_s") or 0.0) for r in records)
    summary = {
        "training samples (windows)": len(records),
        "source files": len(files),
        "video samples": kinds.get("video", 0),
        "image samples": kinds.get("image", 0),
        "with a conditioning image (I2V)": sum(1 for r in records if r.get("condition_image")),
        "seconds of training video": round(seconds, 2),
        "caption tokens (min / max)": f"{min(tokens)} / {max(tokens)}" if tokens else "not counted",
    }
    if records:
        parts.append(_table(summary, title="Summary"))
    buckets: dict[str, dict] = {}
    for r in records:
        b = buckets.setdefault(str(r.get("bucket")), {"bucket": str(r.get("bucket")), "samples": 0, "size": "",
                                                       "frames": r.get("num_frames"), "_crop": []})
        b["samples"] += 1
        b["size"] = f"{r.get('width')}x{r.get('height')}"
        b["_crop"].append(float(r.get("crop_loss") or 0.0))
    bucket_rows = [{**{k: v for k, v in b.items() if k != "_crop"},
                    "mean crop loss": round(sum(b["_crop"]) / len(b["_crop"]), 3)}
                   for b in sorted(buckets.values(), key=lambda b: -b["samples"])]
    if bucket_rows:
        parts.append(_table(bucket_rows, title="Buckets (W x H, frames)"))
    problems, err = _problem_rows(run_dir, records)
    if err:
        parts.append(_warn(err))
    if problems:
        parts.append(_table(problems, title=f"Problems ({len(problems)}; these files are not trained)"))
    else:
        parts.append("<p>No problems found.</p>")
    if records:
        rows = [{"file": Path(str(r.get("file", ""))).name, "window": r.get("window"), "bucket": r.get("bucket"),
                 "caption": r.get("caption", ""), "condition image": Path(str(r["condition_image"])).name
                 if r.get("condition_image") else ""} for r in records]
        parts.append(f"<details><summary>All {len(rows)} samples</summary>{_table(rows)}</details>")
    return "\n".join(parts)


def cache_section(run_dir: Path) -> str:
    path = run_dir / "cache" / "manifest.json"
    if not path.exists():
        return _missing("no cache yet (cache/manifest.json is missing): run 02_cache.")
    m, err = _read_json(path)
    if err or not isinstance(m, dict):
        return _warn((err or f"{path}: not a JSON object") + "; re-run 02_cache to rebuild it.")
    parts = []
    entries = m.get("entries") or {}
    latents = m.get("latents") or {}
    texts = m.get("text") or {}
    failed = m.get("failed") or []
    summary = {
        "format": f"{m.get('format')} v{m.get('version')}",
        "text encoder": m.get("encoder"),
        "complete": bool(m.get("complete")),
        "entries": len(entries),
        "latent files": len(latents),
        "latents MB": round(sum(v.get("bytes", 0) for v in latents.values()) / 1e6, 2),
        "text files (captions)": len(texts),
        "text MB": round(sum(v.get("bytes", 0) for v in texts.values()) / 1e6, 2),
        "failed": len(failed),
        **{k: v for k, v in (m.get("settings") or {}).items()},
    }
    if not m.get("complete"):
        parts.append(_missing("the cache is not complete (a build was interrupted or some samples failed): "
                              "re-run 02_cache to finish it."))
    ds = run_dir / "dataset.jsonl"
    if m.get("dataset_sha256") and ds.exists() and sha256_file(ds) != m["dataset_sha256"]:
        parts.append(_warn("dataset.jsonl changed after this cache was built: re-run 02_cache "
                           "(it re-encodes only what changed)."))
    parts.append(_table(summary, title="Manifest"))
    per_bucket: dict[str, dict] = {}
    for e in sorted(entries.values(), key=lambda e: e.get("index", 0)):
        b = per_bucket.setdefault(str(e.get("bucket")), {"bucket": str(e.get("bucket")), "entries": 0, "i2v": 0,
                                                         "latent shape": "x".join(map(str, e.get("latent_shape") or []))})
        b["entries"] += 1
        b["i2v"] += 1 if e.get("num_cond_latents") else 0
    if per_bucket:
        parts.append(_table(list(per_bucket.values()), title="Cached entries per bucket"))
    if failed:
        rows = [f if isinstance(f, dict) else {"failed": f} for f in failed]
        parts.append(_table(rows, title="Failed samples (not cached)"))
    if m.get("identity"):
        parts.append(f"<details><summary>Model identity</summary>{_table(m['identity'])}</details>")
    return "\n".join(parts)


def read_train_log(run_dir: Path) -> tuple[list[dict], int]:
    """The training log, one record per step (a step logged twice across a resume keeps its last line)."""
    path = Path(run_dir) / "logs" / "train.jsonl"
    if not path.exists():
        return [], 0
    recs, bad = _read_jsonl(path)
    by_step: dict[int, dict] = {}
    for r in recs:
        if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float)):
            by_step[int(r["step"])] = r
        else:
            bad += 1
    return [by_step[k] for k in sorted(by_step)], bad


def smooth(values: list[float], k: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def eval_curve(recs: list[dict]) -> tuple[list[int], list[float]]:
    """The eval loss (train.eval_every) of the steps that logged one."""
    pts = [(int(r["step"]), float(r["eval_loss"])) for r in recs if isinstance(r.get("eval_loss"), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_eval(ax, recs: list[dict]) -> None:
    """The eval loss beside the training loss: held-out samples at fixed σ and noise (train_data.EvalLoss)."""
    steps, values = eval_curve(recs)
    if steps:
        ax.plot(steps, values, "o-", lw=1.4, ms=3, label="eval loss (held out, fixed σ/noise)")


def loss_svg(steps: list[int], losses: list[float], recs: Optional[list[dict]] = None) -> str:
    """The loss curve as an inline <svg> (matplotlib, no pyplot: no global backend is touched); the
    eval loss of ``recs`` beside it."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasSVG(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        ax.plot(steps, smooth(losses, k), lw=1.6, label=f"mean of {k}")
    plot_eval(ax, recs or [])
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: not allowed inside HTML


def loss_section(run_dir: Path) -> str:
    log_path = run_dir / "logs" / "train.jsonl"
    if not log_path.exists():
        return _missing("no training log yet (logs/train.jsonl is missing): run 03_train_lora.")
    recs, bad = read_train_log(run_dir)
    parts = []
    if bad:
        parts.append(_warn(f"{bad} line(s) of {log_path} could not be read and are left out."))
    if not recs:
        parts.append(_missing("the training log has no steps yet: run 03_train_lora."))
        return "\n".join(parts)
    steps = [int(r["step"]) for r in recs]
    losses = [float(r["loss"]) for r in recs]
    try:
        parts.append(f"<figure>{loss_svg(steps, losses, recs)}</figure>")
    except ImportError:
        parts.append(_missing("matplotlib is not installed, so there is no plot (pip install matplotlib)."))
    tail = losses[-10:]
    ev_steps, ev_losses = eval_curve(recs)
    numbers = {
        "steps logged": len(recs),
        "last step": steps[-1],
        "first loss": round(losses[0], 5),
        f"mean loss, last {len(tail)} steps": round(sum(tail) / len(tail), 5),
        "lowest loss": f"{min(losses):.5f} (step {steps[losses.index(min(losses))]})",
        "last learning rate": recs[-1].get("lr"),
        **({"last eval loss (held out)": f"{ev_losses[-1]:.5f} (step {ev_steps[-1]})"} if ev_steps else {}),
        "training time (sum of step times)": _duration(sum(float(r.get("sec") or 0.0) for r in recs)),
    }
    if isinstance(recs[-1].get("it_s"), (int, float)):
        numbers["speed (it/s, last)"] = round(float(recs[-1]["it_s"]), 3)
    mems = [float(r["mem_gib"]) for r in recs if isinstance(r.get("mem_gib"), (int, float))]
    if mems:
        numbers["peak GPU memory GiB"] = round(max(mems), 2)
    parts.append(_table(numbers, title="Final numbers"))
    loras = sorted((run_dir / "lora").glob("*.safetensors")) if (run_dir / "lora").is_dir() else []
    if loras:
        parts.append(_table([{"file": p.name, "MB": round(p.stat().st_size / 1e6, 2)} for p in loras],
                            title="Exported LoRA files (lora/)"))
    else:
        parts.append(_missing("no exported LoRA in lora/ yet: training writes one when it finishes."))
    return "\n".join(parts)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------------
# videos
# ------------------------------------------------------------------------------------------------
class _VideoEmbedder:
    """Embeds mp4 files as data URIs until the budget is spent, then links them relative to the page."""

    def __init__(self, page_dir: Path, budget: int):
        self.page_dir = page_dir
        self.left = budget
        self.embedded = 0
        self.linked = 0

    def href(self, path: Path) -> str:
        try:
            rel = os.path.relpath(path.resolve(), self.page_dir.resolve())
        except ValueError:  # another drive on Windows
            return path.resolve().as_uri()
        return quote(Path(rel).as_posix())

    def tag(self, path: Path) -> str:
        size = path.stat().st_size
        href = self.href(path)
        if size <= self.left:
            self.left -= size
            self.embedded += 1
            src = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        else:
            self.linked += 1
            src = href
        return (f"<video controls loop muted playsinline preload='metadata' src='{esc(src)}'></video>"
                f"<p class='meta'><a href='{esc(href)}'>{esc(path.name)}</a> · {size / 1e6:.2f} MB</p>")


def _sidecar(mp4: Path) -> tuple[dict, Optional[str]]:
    js = mp4.with_suffix(".json")
    if not js.exists():
        return {}, None
    data, err = _read_json(js)
    return (data if isinstance(data, dict) else {}), err


_SETTING_ORDER = ("prompt", "negative_prompt", "mode", "seed", "steps", "guidance", "height", "width",
                  "num_frames", "frames", "fps", "loras", "seconds")


def _card(mp4: Path, embed: _VideoEmbedder, title: str) -> str:
    meta, err = _sidecar(mp4)
    prompt = meta.get("prompt")
    head = f"<p><b>{esc(title)}</b></p>" + (f"<p>{esc(prompt)}</p>" if prompt else "")
    ordered = {k: meta[k] for k in _SETTING_ORDER if k in meta and k != "prompt"}
    rest = {k: v for k, v in meta.items() if k not in ordered and k not in ("prompt", "file")}
    settings = _table(ordered) if ordered else ""
    if rest:
        settings += f"<details><summary>all settings</summary>{_table(rest)}</details>"
    if err:
        settings += _warn(err)
    elif not meta:
        settings += "<p class='meta'>no settings file next to this video</p>"
    return f"<div class='card'>{head}{embed.tag(mp4)}{settings}</div>"


def validation_section(run_dir: Path, embed: _VideoEmbedder) -> str:
    folder = run_dir / "samples" / "validation"
    videos = sorted(folder.glob("*.mp4")) if folder.is_dir() else []
    if not videos:
        return _missing("no validation videos yet: set validate_every > 0 and validation_prompts in 03_train_lora "
                        "(they land in samples/validation/).")
    by_step: dict[str, list[Path]] = {}
    for v in videos:
        m = re.match(r"step0*(\d+)_", v.name)
        by_step.setdefault(m.group(1) if m else "", []).append(v)
    parts = [f"<p>{len(videos)} video(s), the same prompts and seeds at each validation step.</p>"]
    for step in sorted(by_step, key=lambda s: int(s) if s else -1):
        parts.append(f"<h3>{esc('step ' + step if step else 'other')}</h3>")
        parts.append("<div class='grid'>" + "".join(_card(v, embed, v.stem) for v in by_step[step]) + "</div>")
    return "\n".join(parts)


def sample_videos(run_dir: Path) -> list[Path]:
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    val = folder / "validation"
    return sorted(p for p in folder.rglob("*.mp4") if val not in p.parents and not p.name.startswith("."))


def samples_section(run_dir: Path, embed: _VideoEmbedder) -> str:
    videos = sample_videos(run_dir)
    if not videos:
        return _missing("no samples yet: run 04_sample (videos and their settings land in samples/).")
    parts = [f"<p>{len(videos)} video(s); a base/LoRA pair shares its seed.</p>",
             "<div class='grid'>" + "".join(
                 _card(v, embed, v.relative_to(run_dir / "samples").with_suffix("").as_posix()) for v in videos)
             + "</div>"]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
_TITLES = {"settings": "Settings", "dataset": "Dataset", "cache": "Cache", "loss": "Training loss",
           "validation": "Validation videos", "samples": "Samples"}


def _guarded(fn, *args) -> str:
    """A section that fails to build says so instead of losing the whole page."""
    try:
        return fn(*args)
    except Exception as e:
        return _warn(f"this section could not be built: {type(e).__name__}: {e}")


def build_report(run_dir: str | os.PathLike, page_dir: Optional[str | os.PathLike] = None,
                 embed_budget: int = EMBED_BUDGET_BYTES) -> str:
    """The HTML text of the report; video links are relative to ``page_dir`` (default: the run folder)."""
    run_dir = Path(run_dir)
    embed = _VideoEmbedder(Path(page_dir) if page_dir is not None else run_dir, embed_budget)
    bodies = {
        "settings": _guarded(settings_section, run_dir),
        "dataset": _guarded(dataset_section, run_dir),
        "cache": _guarded(cache_section, run_dir),
        "loss": _guarded(loss_section, run_dir),
        "validation": _guarded(validation_section, run_dir, embed),
        "samples": _guarded(samples_section, run_dir, embed),
    }
    nav = "".join(f"<a href='#{sid}'>{esc(_TITLES[sid])}</a>" for sid in SECTIONS)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notebooks = sorted((run_dir / "executed").glob("*.ipynb")) if (run_dir / "executed").is_dir() else []
    executed = ""
    if notebooks:
        links = ", ".join(f"<a href='{esc(embed.href(p))}'>{esc(p.name)}</a>" for p in notebooks)
        executed = f"<p class='meta'>executed notebooks: {links}</p>"
    videos_note = ""
    if embed.linked:
        videos_note = (f"<p class='meta'>{embed.embedded} video(s) embedded, {embed.linked} linked (over the "
                       f"{embed_budget / 1e6:.0f} MB embedding budget): keep this page next to the run folder.</p>")
    sections = "".join(_section(sid, _TITLES[sid], bodies[sid]) for sid in SECTIONS)
    title = f"longcat-nb run report: {run_dir.resolve().name}"
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n"
        f"<p class='meta'>{esc(str(run_dir.resolve()))} · written {esc(now)}</p>\n{executed}\n"
        f"<nav>{nav}</nav>\n{videos_note}\n{sections}"
        "<p class='meta'>If a video does not play, open its file link: some Chromium builds lack the "
        "H.264 decoder.</p>\n</body>\n</html>\n"
    )


def write_report(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Write the run's report (default ``run_dir/report.html``) atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: run 00_setup with this run_dir first")
    out = Path(out) if out is not None else run_dir / REPORT_NAME
    if out.is_dir():
        out = out / REPORT_NAME
    text = build_report(run_dir, page_dir=out.parent)

    return atomic_write_text(out, text)


def report_link(path: str | os.PathLike):
    """What a notebook displays after writing the report: a clickable link when Jupyter can serve the
    file (it lies under the notebook's working folder, or the kernel and the file are both in the
    workspace root, e.g. `jupyter lab` started in the checkout and runs/ next to notebooks/), else the
    path to open in a browser."""
    from IPython.display import HTML, FileLink

    from .paths import workspace_root

    path = Path(path)
    try:
        rel = os.path.relpath(path.resolve(), Path.cwd().resolve())
    except ValueError:  # another drive on Windows
        rel = ".."
    root = workspace_root().resolve()
    in_root = Path.cwd().resolve().is_relative_to(root) and path.resolve().is_relative_to(root)
    if not rel.startswith("..") or in_root:
        return FileLink(rel, result_html_prefix="Run report: ")
    return HTML(f"Run report: open <code>{esc(str(path.resolve()))}</code> in a browser "
                "(it is outside the folder Jupyter serves).")
