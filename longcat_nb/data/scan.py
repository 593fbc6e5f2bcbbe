"""Scan and validate a captioned video dataset; write ``run_dir/dataset.jsonl``.

Formats: (a) a folder (nested allowed) of videos with same-stem ``.txt`` captions and an optional
same-stem image (the I2V conditioning frame); (b) a ``metadata.jsonl`` or ``metadata.csv`` with
``file``, ``caption`` and optional ``condition_image`` (paths relative to the listing). Still images
are 1-frame samples. Nothing in the dataset folder is ever written, moved or deleted.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..io import atomic_write_text, sha256_file
from ..paths import resolve_path
from .buckets import (BucketError, aspect_buckets, assign_bucket, check_frames, check_short_clips, crop_loss,
                      parse_resolution, train_frames)
from .video import IMAGE_EXTS, VIDEO_EXTS, VideoError, load_image, probe, resample_indices, resampled_count, window_starts

MAX_TOKENS = 512
# Files that may sit in a dataset folder without being samples (listings, notes, scripts).
SIDECAR_EXTS = {".txt", ".json", ".jsonl", ".csv", ".md", ".py", ".yaml", ".yml"}


class EmptyDatasetError(ValueError):
    """The scan found no usable training sample; the message says why, grouped by problem kind."""


@dataclass
class Problem:
    file: str
    kind: str
    value: str
    fix: str
    frames: Optional[int] = None  # "too short": the frames the clip has at target_fps

    def __str__(self) -> str:
        return f"{self.file}: {self.kind} ({self.value}) -> {self.fix}"


@dataclass
class Entry:
    """One source file found in the dataset (before windows are cut)."""
    file: Path
    caption: Optional[str] = None
    caption_file: Optional[Path] = None
    condition_image: Optional[Path] = None
    kind: str = "video"  # video | image


@dataclass
class ScanReport:
    records: list = field(default_factory=list)  # one dict per training sample (a window)
    problems: list = field(default_factory=list)
    files: list = field(default_factory=list)  # one dict per source file with its facts
    settings: dict = field(default_factory=dict)
    dataset_dir: str = ""
    found: int = 0  # files found in the folder or listing (samples or not)

    def buckets(self) -> Counter:
        return Counter(r["bucket"] for r in self.records)

    @property
    def shortened(self) -> list[dict]:
        """The clips shorter than num_frames kept at a shorter 4k+1 length (short_clips=keep)."""
        return [f for f in self.files if f.get("shortened")]


def _read_caption(path: Path) -> tuple[Optional[str], Optional[Problem]]:
    if not path.exists():
        return None, Problem(str(path.with_suffix("")) + ".*", "missing caption", f"no {path.name}",
                             f"write the caption into {path.name} next to the clip")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, Problem(str(path), "caption is not UTF-8", f"byte {e.start}: {raw[e.start:e.start + 4]!r}",
                             "re-save the caption file as UTF-8")
    if not text.strip():
        return None, Problem(str(path), "empty caption", "0 characters", "write a description of the clip")
    return text.strip(), None


def find_entries(dataset_dir: Path) -> tuple[list[Entry], list[Problem]]:
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist; set dataset_dir to your clips folder")
    for listing in ("metadata.jsonl", "metadata.csv"):
        if (dataset_dir / listing).exists():
            return _from_listing(dataset_dir / listing)
    entries, problems = [], []
    files = sorted(p for p in dataset_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_stem: dict = {}
    for p in files:
        by_stem.setdefault(p.with_suffix(""), []).append(p)
    for stem, group in sorted(by_stem.items()):
        videos = [p for p in group if p.suffix.lower() in VIDEO_EXTS]
        images = [p for p in group if p.suffix.lower() in IMAGE_EXTS]
        others = [p for p in group if p.suffix.lower() not in VIDEO_EXTS | IMAGE_EXTS | SIDECAR_EXTS]
        cap_file = stem.with_suffix(".txt")
        for p in others:
            problems.append(Problem(str(p), "not a video", f"extension {p.suffix or '(none)'}",
                                    f"convert it to mp4 or remove it from the folder (supported: {sorted(VIDEO_EXTS)})"))
        if videos:
            for v in videos:
                entries.append(Entry(v, caption_file=cap_file, condition_image=images[0] if images else None))
        elif images:
            entries.append(Entry(images[0], caption_file=cap_file, kind="image"))
    return entries, problems


def _from_listing(path: Path) -> tuple[list[Entry], list[Problem]]:
    rows, problems = [], []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(Problem(f"{path}:{i}", "bad JSON line", str(e), "fix the line or remove it"))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.DictReader(f), 2))
    entries = []
    for i, row in rows:
        name = row.get("file") or row.get("video") or row.get("path")
        if not name:
            problems.append(Problem(f"{path}:{i}", "no file column", json.dumps(row)[:80], "add a 'file' value"))
            continue
        file = (path.parent / name)
        cond = row.get("condition_image") or row.get("image")
        kind = "image" if file.suffix.lower() in IMAGE_EXTS else "video"
        entries.append(Entry(file, caption=row.get("caption"), condition_image=(path.parent / cond) if cond else None, kind=kind))
    return entries, problems


def scan_dataset(dataset_dir, settings, tokenizer=None, progress=None) -> ScanReport:
    """Validate every file and cut training windows; ``settings`` is a DatasetSettings. A relative
    ``dataset_dir`` is under the workspace root (paths.py), so records hold absolute paths."""
    dataset_dir = resolve_path(dataset_dir)
    try:
        parse_resolution(settings.resolution)
        check_frames(settings.num_frames)
        check_short_clips(settings)
    except BucketError as e:
        raise BucketError(f"dataset settings: {e}") from None
    if settings.target_fps <= 0:
        raise BucketError(f"target_fps={settings.target_fps}: must be > 0 (15 for the base stage, 30 for refinement)")
    buckets = aspect_buckets(settings.resolution, getattr(settings, "bucket_grid", 32))
    entries, problems = find_entries(dataset_dir)
    report = ScanReport(problems=problems, settings=asdict(settings), dataset_dir=str(dataset_dir),
                        found=len(entries) + len(problems))
    seen_hash: dict = {}
    it = progress(entries, desc="scanning") if progress else entries
    for e in it:
        rel = str(e.file)
        if not e.file.exists():
            report.problems.append(Problem(rel, "missing file", "listed but not found", "fix the path in the listing"))
            continue
        size = e.file.stat().st_size
        if size == 0:
            report.problems.append(Problem(rel, "empty file", "0 bytes", "re-copy or re-export the clip"))
            continue
        digest = sha256_file(e.file)
        if digest in seen_hash:
            report.problems.append(Problem(rel, "duplicate", f"same content as {seen_hash[digest]}",
                                           "remove one copy (it would be trained twice)"))
            continue
        seen_hash[digest] = rel
        caption, cap_problem = (e.caption, None) if e.caption is not None else _read_caption(e.caption_file)
        if e.caption is not None and not e.caption.strip():
            caption, cap_problem = None, Problem(rel, "empty caption", "0 characters", "write a caption in the listing")
        if cap_problem:
            report.problems.append(cap_problem)
            continue
        if settings.trigger:
            caption = f"{settings.trigger.strip()} {caption}"
        n_tokens = None
        if tokenizer is not None:
            from ..text import count_tokens

            n_tokens = count_tokens(tokenizer, caption)
            if n_tokens > settings.max_caption_tokens:
                report.problems.append(Problem(
                    str(e.caption_file or rel), "caption too long", f"{n_tokens} tokens > {settings.max_caption_tokens}",
                    "shorten the caption; the text encoder cuts everything after 512 tokens"))
                continue
        if e.kind == "image":
            try:
                h, w = load_image(e.file).shape[:2]
            except Exception as ex:
                report.problems.append(Problem(rel, "not an image", str(ex)[:80], "re-export the image as PNG or JPEG"))
                continue
            b = assign_bucket(h, w, 1, settings, buckets)
            report.files.append({"file": rel, "kind": "image", "width": w, "height": h, "fps": None,
                                 "duration": 0.0, "frames": 1, "caption_tokens": n_tokens})
            report.records.append(_record(e, caption, b, [0], None, None, 0, n_tokens, h, w, settings))
            continue
        try:
            info = probe(e.file)
        except VideoError as ex:
            kind = "corrupt video" if size > 1024 and e.file.suffix.lower() in VIDEO_EXTS else "not a video"
            report.problems.append(Problem(rel, kind, str(ex)[:120], "re-encode or re-download the clip (e.g. to H.264 mp4)"))
            continue
        fdict = {"file": rel, "kind": "video", **info.to_dict(), "caption_tokens": n_tokens, "bytes": size}
        report.files.append(fdict)
        if info.variable_fps:
            report.problems.append(Problem(rel, "variable frame rate", f"average {info.fps:.2f} fps",
                                           "re-encode at a constant rate, e.g. ffmpeg -i in.mp4 -r 30 out.mp4 (used with nearest-frame resampling meanwhile)"))
        available = resampled_count(info.frame_count, info.fps, settings.target_fps)
        frames = train_frames(available, settings)
        if frames is None:
            report.problems.append(_too_short(rel, available, info.duration, settings))
            continue
        # the bucket may round the count down further (resolution_frames with frame_interval > 4):
        # windows are cut at the bucket's count so every latent in a bucket has one shape
        b = assign_bucket(info.height, info.width, frames, settings, buckets)
        shortened = frames < settings.num_frames  # the clip's own length, not the bucket's rounding
        fdict.update(train_frames=b.frames, shortened=shortened)
        # a shortened clip has under 4 frames to spare: one window, not near-copies of it
        starts = [0] if shortened else window_starts(available, b.frames, settings.extraction, settings.windows,
                                                     settings.stride)
        for k, start in enumerate(starts):
            idx = resample_indices(b.frames, info.fps, settings.target_fps, start)
            report.records.append(_record(e, caption, b, idx, info, start, k, n_tokens, info.height, info.width, settings))
    return report


def _too_short(rel: str, available: int, duration: float, settings) -> Problem:
    fps = settings.target_fps
    fit = max(1, (available - 1) // 4 * 4 + 1)  # the longest 4k+1 count the clip holds
    if settings.short_clips == "keep":
        need = min(settings.min_frames, settings.num_frames)
        fix = f"use a longer clip (at least {need / fps:.2f} s) or lower min_frames (e.g. {fit})"
        what = f"min_frames={need}"
    else:
        need = settings.num_frames
        fix = f"set short_clips='keep' (trains it at {fit} frames), lower num_frames (e.g. {fit}) or use a longer clip"
        what = f"num_frames={need}"
    return Problem(rel, "too short", f"{available} frames at {fps:g} fps ({duration:.2f} s) < {what} "
                                     f"({need / fps:.2f} s)", fix, frames=available)


def _record(e: Entry, caption, b, idx, info, start, k, n_tokens, h, w, settings) -> dict:
    return {
        "file": str(e.file),
        "kind": e.kind,
        "caption": caption,
        "condition_image": str(e.condition_image) if e.condition_image else None,
        "source_fps": info.fps if info else None,
        "source_size": [w, h],
        "target_fps": settings.target_fps,
        "window": k,
        "window_start": start,
        "frame_indices": idx,
        "num_frames": b.frames,
        "height": b.height,
        "width": b.width,
        "bucket": b.key,
        "crop": settings.crop,
        "crop_loss": round(crop_loss(h, w, b.height, b.width), 4) if settings.crop != "none" else 0.0,
        "caption_tokens": n_tokens,
        "duration_s": round(b.frames / settings.target_fps, 3),
        "problems": [],
    }


def describe_problems(problems: list[Problem]) -> list[str]:
    """One line per problem kind, most frequent first: how many, an example and its fix. For "too
    short" the example is the shortest clip, so its fix (a lower min_frames/num_frames) covers them all."""
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.kind, []).append(p)
    lines = []
    for kind, ps in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        label = "e.g."
        if kind == "too short" and all(p.frames is not None for p in ps):
            ps, label = sorted(ps, key=lambda p: p.frames), "shortest"
        n = f"{len(ps)} file{'s' * (len(ps) > 1)}"
        lines.append(f"{kind} ({n}), {label} {ps[0].file}: {ps[0].value} -> fix: {ps[0].fix}")
    return lines


def _problems_path(run_dir) -> Path:
    return Path(run_dir) / "dataset_problems.json"


def _write_problems(run_dir, report: ScanReport) -> Path:
    path = _problems_path(run_dir)
    atomic_write_text(path, json.dumps([asdict(p) for p in report.problems], indent=2, ensure_ascii=False) + "\n")
    return path


def check_samples(run_dir, report: ScanReport) -> None:
    """Refuse a scan with no training sample: write ``dataset_problems.json`` (so the reasons can be
    read), leave ``dataset.jsonl`` as it was, and raise EmptyDatasetError naming the cause."""
    if report.records:
        return
    run_dir = Path(run_dir)
    problems_path = _write_problems(run_dir, report)
    where = report.dataset_dir or "the dataset folder"
    head = f"no training samples in {where}: {report.found} file(s) found"
    if not report.found:
        head += (f"; put clips ({', '.join(sorted(VIDEO_EXTS))}) with same-name .txt captions there, "
                 "or a metadata.jsonl / metadata.csv listing, and set dataset_dir to that folder")
    lines = [head + (", none usable:" if report.problems else ".")]
    lines += ["  " + line for line in describe_problems(report.problems)]
    old = run_dir / "dataset.jsonl"
    kept = f"{old} was not overwritten (it keeps its {_count_lines(old)} samples from an earlier scan)" \
        if old.exists() else f"{old} was not written"
    lines.append(f"{kept}; every problem is listed in {problems_path}. "
                 "Fix them (or the dataset settings above) and re-run 01_dataset.")
    raise EmptyDatasetError("\n".join(lines))


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def write_dataset_jsonl(run_dir, report: ScanReport) -> Path:
    """Write ``dataset.jsonl`` and ``dataset_problems.json``; a scan with no sample is refused (check_samples)."""
    check_samples(run_dir, report)
    path = Path(run_dir) / "dataset.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.records)
    atomic_write_text(path, text)
    _write_problems(run_dir, report)
    return path


def read_dataset_jsonl(run_dir) -> list[dict]:
    path = Path(run_dir) / "dataset.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run 01_dataset first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def saved_problems(run_dir) -> list[Problem]:
    """The problems 01_dataset recorded in ``dataset_problems.json`` (none when absent or unreadable)."""
    try:
        data = json.loads(_problems_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [Problem(str(d.get("file", "")), str(d.get("kind", "")), str(d.get("value", "")), str(d.get("fix", "")),
                    d.get("frames")) for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def require_samples(run_dir) -> list[dict]:
    """The records of ``dataset.jsonl`` for the stages after 01; none (or no file) raises with the cause
    01_dataset recorded in ``dataset_problems.json``."""
    run_dir = Path(run_dir)
    path = run_dir / "dataset.jsonl"
    problems = saved_problems(run_dir)
    if path.exists():
        records = read_dataset_jsonl(run_dir)
        if records:
            return records
        head = f"{path} holds no samples"
    elif _problems_path(run_dir).exists():
        head = f"{path} does not exist: 01_dataset found no usable sample, so it wrote none"
    else:
        raise FileNotFoundError(f"{path} does not exist: run 01_dataset first")
    lines = [head + (f"; its problems ({_problems_path(run_dir)}):" if problems else "")]
    lines += ["  " + line for line in describe_problems(problems)]
    lines.append("Fix them (or the dataset settings) and re-run 01_dataset, then the notebooks after it.")
    raise EmptyDatasetError("\n".join(lines))
