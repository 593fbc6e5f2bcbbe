"""Scan and validate a captioned video dataset; write ``run_dir/dataset.jsonl``.

Formats: (a) a folder (nested allowed) of videos with same-stem ``.txt`` captions and an optional
same-stem image (the I2V conditioning frame); (b) a ``metadata.jsonl`` or ``metadata.csv`` with
``file``, ``caption`` and optional ``condition_image`` (paths relative to the listing, inside the
dataset folder unless allowed). Still images are 1-frame samples. Nothing in the dataset folder is
ever written, moved or deleted.

crop="random" draws one crop per window from a seed (video.crop_offset) and records it, so the cache
keys the latents of that crop: a random crop is fixed per scan (and cache), and ``crop_variants`` > 1
cuts that many differently cropped samples of every window, each cached and trained in every epoch.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..io import atomic_write_text
from ..paths import resolve_path
from .buckets import (MAX_UPSCALE, BucketError, aspect_buckets, assign_bucket, check_frames, check_short_clips,
                      crop_loss, parse_resolution, train_frames, upscale_factor)
from .sources import Checked, Problem, check_entry, find_entries, keep_one_copy
from .video import (VIDEO_EXTS, VideoError, crop_offset, load_image, probe, repeats_frames, resample_indices,
                    resampled_count, window_starts)

MAX_TOKENS = 512
CROPS = ("center", "random", "none")


class EmptyDatasetError(ValueError):
    """The scan found no usable training sample; the message says why, grouped by problem kind."""


@dataclass
class ScanReport:
    records: list = field(default_factory=list)  # one dict per training sample (a window)
    problems: list = field(default_factory=list)
    files: list = field(default_factory=list)  # one dict per source file with its facts
    settings: dict = field(default_factory=dict)
    dataset_dir: str = ""
    found: int = 0  # files found in the folder or listing (samples or not)
    entries: list = field(default_factory=list)  # one row per dataset.datasets entry (datasets.contributions)

    def buckets(self) -> Counter:
        return Counter(r["bucket"] for r in self.records)

    @property
    def shortened(self) -> list[dict]:
        """The clips shorter than num_frames kept at a shorter 4k+1 length (short_clips=keep)."""
        return [f for f in self.files if f.get("shortened")]


@dataclass
class _Options:
    seed: int
    crop_variants: int
    allow_outside: bool
    base: Path


def _options(settings, dataset_dir: Path, seed, crop_variants, allow_outside) -> _Options:
    """The scan's own switches: an argument, else a DatasetSettings field of that name, else the default."""
    def pick(value, name, default):
        return getattr(settings, name, default) if value is None else value

    o = _Options(pick(seed, "crop_seed", 0), pick(crop_variants, "crop_variants", 1),
                 bool(pick(allow_outside, "allow_outside", False)), dataset_dir)
    if not isinstance(o.seed, int):
        raise BucketError(f"crop seed={o.seed!r}: must be a whole number (e.g. train.seed)")
    if not isinstance(o.crop_variants, int) or o.crop_variants < 1:
        raise BucketError(f"crop_variants={o.crop_variants!r}: must be a whole number >= 1")
    if o.crop_variants > 1 and settings.crop != "random":
        raise BucketError(f"crop_variants={o.crop_variants} needs crop='random' (crop={settings.crop!r} would cut "
                          f"{o.crop_variants} identical copies)")
    return o


def _check_settings(settings) -> None:
    try:
        parse_resolution(settings.resolution)
        check_frames(settings.num_frames)
        check_short_clips(settings)
    except BucketError as e:
        raise BucketError(f"dataset settings: {e}") from None
    if settings.target_fps <= 0:
        raise BucketError(f"target_fps={settings.target_fps}: must be > 0 (15 for the base stage, 30 for refinement)")
    if settings.crop not in CROPS:
        raise BucketError(f"crop={settings.crop!r}: use center, random or none")


def scan_dataset(dataset_dir, settings, tokenizer=None, progress=None, *, seed: Optional[int] = None,
                 crop_variants: Optional[int] = None, allow_outside: Optional[bool] = None) -> ScanReport:
    """Validate every file and cut training windows; ``settings`` is a DatasetSettings. A relative
    ``dataset_dir`` is under the workspace root (paths.py), so records hold absolute paths.

    ``seed`` draws random crops, ``crop_variants`` random crops per window, ``allow_outside`` lets a
    metadata listing name files outside the folder; each, when None, comes from a settings field of
    the same name (``crop_seed`` for the seed) or defaults to 0, 1 and False."""
    dataset_dir = resolve_path(dataset_dir)
    _check_settings(settings)
    opts = _options(settings, dataset_dir, seed, crop_variants, allow_outside)
    buckets = aspect_buckets(settings.resolution, getattr(settings, "bucket_grid", 32))
    entries, problems = find_entries(dataset_dir, opts.allow_outside)
    report = ScanReport(problems=problems, dataset_dir=str(dataset_dir), found=len(entries) + len(problems),
                        settings={**asdict(settings), "crop_seed": opts.seed, "crop_variants": opts.crop_variants,
                                  "allow_outside": opts.allow_outside})
    checked = [check_entry(e, settings, tokenizer) for e in (progress(entries, desc="reading") if progress else entries)]
    kept, duplicates = keep_one_copy(checked)
    report.problems += duplicates
    for c in progress(kept, desc="scanning") if progress else kept:
        if c.problem:
            report.problems.append(c.problem)
        elif c.entry.kind == "image":
            _add_image(report, c, settings, buckets, opts)
        else:
            _add_video(report, c, settings, buckets, opts)
    return report


def _too_small(rel: str, h: int, w: int, b, settings) -> Optional[Problem]:
    f = upscale_factor(h, w, b.height, b.width, settings.crop)
    if f <= MAX_UPSCALE:
        return None
    need = f"{math.ceil(w * f / MAX_UPSCALE)}x{math.ceil(h * f / MAX_UPSCALE)}"
    return Problem(rel, "too small", f"{w}x{h} px, upscaled {f:.1f}x to its {b.width}x{b.height} bucket "
                                     f"(more than {MAX_UPSCALE:g}x)",
                   f"use a larger source (at least {need} px) or a lower resolution than {settings.resolution}")


def _low_fps(rel: str, fps: float, target: float) -> Problem:
    return Problem(rel, "low frame rate", f"{fps:.3g} fps < target_fps={target:g}",
                   f"trained at its real speed with frames repeated (each about {target / fps:.1f}x); for smooth "
                   f"motion use a clip recorded at {target:g} fps or more, interpolate it (ffmpeg -i in.mp4 -vf "
                   f"minterpolate=fps={target:g} out.mp4) or set target_fps={fps:.3g}")


def _add_image(report: ScanReport, c: Checked, settings, buckets, opts: _Options) -> None:
    rel = str(c.entry.file)
    try:
        h, w = load_image(c.entry.file).shape[:2]
    except Exception as ex:
        report.problems.append(Problem(rel, "not an image", str(ex)[:80], "re-export the image as PNG or JPEG"))
        return
    b = assign_bucket(h, w, 1, settings, buckets)
    report.files.append({"file": rel, "kind": "image", "width": w, "height": h, "fps": None,
                         "duration": 0.0, "frames": 1, "caption_tokens": c.tokens})
    small = _too_small(rel, h, w, b, settings)
    if small:
        report.problems.append(small)
        return
    _add_samples(report, c, b, [0], lambda start: [0], None, settings, opts, (h, w))


def _add_video(report: ScanReport, c: Checked, settings, buckets, opts: _Options) -> None:
    rel, target = str(c.entry.file), settings.target_fps
    try:
        info = probe(c.entry.file)
    except VideoError as ex:
        kind = "corrupt video" if c.size > 1024 and c.entry.file.suffix.lower() in VIDEO_EXTS else "not a video"
        report.problems.append(Problem(rel, kind, str(ex)[:120], "re-encode or re-download the clip (e.g. to H.264 mp4)"))
        return
    fdict = {"file": rel, "kind": "video", **info.to_dict(), "caption_tokens": c.tokens, "bytes": c.size}
    report.files.append(fdict)
    if info.variable_fps:
        report.problems.append(Problem(rel, "variable frame rate", f"average {info.fps:.2f} fps",
                                       "re-encode at a constant rate, e.g. ffmpeg -i in.mp4 -r 30 out.mp4 (used with nearest-frame resampling meanwhile)"))
    if repeats_frames(info.fps, target):  # reported, and trained at its real speed rather than sped up
        fdict["frames_repeated"] = True
        report.problems.append(_low_fps(rel, info.fps, target))
    available = resampled_count(info.frame_count, info.fps, target, repeat=True)
    frames = train_frames(available, settings)
    if frames is None:
        report.problems.append(_too_short(rel, available, info.duration, settings))
        return
    # the bucket may round the count down further (resolution_frames with frame_interval > 4):
    # windows are cut at the bucket's count so every latent in a bucket has one shape
    b = assign_bucket(info.height, info.width, frames, settings, buckets)
    small = _too_small(rel, info.height, info.width, b, settings)
    if small:
        report.problems.append(small)
        return
    shortened = frames < settings.num_frames  # the clip's own length, not the bucket's rounding
    fdict.update(train_frames=b.frames, shortened=shortened)
    # a shortened clip has under 4 frames to spare: one window, not near-copies of it
    starts = [0] if shortened else window_starts(available, b.frames, settings.extraction, settings.windows,
                                                 settings.stride)
    _add_samples(report, c, b, starts, lambda start: resample_indices(b.frames, info.fps, target, start, repeat=True),
                 info, settings, opts, (info.height, info.width))


def _add_samples(report: ScanReport, c: Checked, b, starts, indices, info, settings, opts: _Options, hw) -> None:
    """One record per window start, times crop_variants for random crops (each its own seeded crop)."""
    random = settings.crop == "random"
    name = str(c.entry.file.relative_to(opts.base) if c.entry.file.is_relative_to(opts.base) else c.entry.file)
    k = 0
    for start in starts:
        for variant in range(opts.crop_variants if random else 1):
            r = _record(c, b, indices(start), info, start, k, hw, settings)
            if random:  # keyed by the cache through the record: a latent is valid for its crop only
                r.update(crop_variant=variant, crop_offset=crop_offset(opts.seed, name, start, variant))
            report.records.append(r)
            k += 1


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


def _record(c: Checked, b, idx, info, start, k, hw, settings) -> dict:
    e, (h, w) = c.entry, hw
    return {
        "file": str(e.file),
        "kind": e.kind,
        "caption": c.caption,
        "condition_image": str(e.condition_image) if e.condition_image else None,
        "mask": str(e.mask) if e.mask else None,
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
        "caption_tokens": c.tokens,
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
