"""Find a dataset's source files (a folder walk or a metadata listing), read their bytes and captions,
keep one file per content.

Anything that cannot be read (a file, a caption, a folder that cannot be listed) and any listed path
outside the dataset folder becomes a Problem naming the path and the fix; the scan goes on.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..io import sha256_file
from .video import IMAGE_EXTS, VIDEO_EXTS

# Files that may sit in a dataset folder without being samples (listings, notes, scripts).
SIDECAR_EXTS = {".txt", ".json", ".jsonl", ".csv", ".md", ".py", ".yaml", ".yml"}
LISTINGS = ("metadata.jsonl", "metadata.csv")
# A loss mask sits beside its clip as <stem>_mask.<image or video ext> (or <stem>.mask.<ext>): white = learn.
MASK_SUFFIXES = ("_mask", ".mask")


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
    mask: Optional[Path] = None  # loss mask (image or video; white = learn), None = the whole frame


@dataclass
class Checked:
    """A source file after its bytes and caption are read; ``problem`` None means usable."""
    entry: Entry
    digest: Optional[str] = None
    size: int = 0
    caption: Optional[str] = None
    tokens: Optional[int] = None
    problem: Optional[Problem] = None


def unreadable(path, err: OSError) -> Problem:
    return Problem(str(path), "unreadable file", f"{err.strerror or err} ({type(err).__name__})",
                   f"let the user running the kit read it (e.g. chmod a+r '{path}') or remove it from the folder")


def _unlistable(err: OSError) -> Problem:
    return Problem(str(err.filename), "unreadable folder", f"{err.strerror or err}: its clips are not scanned",
                   f"let the user running the kit list it (e.g. chmod a+rx '{err.filename}') or move its clips out")


def read_caption(path: Path) -> tuple[Optional[str], Optional[Problem]]:
    if not path.exists():
        return None, Problem(str(path.with_suffix("")) + ".*", "missing caption", f"no {path.name}",
                             f"write the caption into {path.name} next to the clip")
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, unreadable(path, e)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, Problem(str(path), "caption is not UTF-8", f"byte {e.start}: {raw[e.start:e.start + 4]!r}",
                             "re-save the caption file as UTF-8")
    if not text.strip():
        return None, Problem(str(path), "empty caption", "0 characters", "write a description of the clip")
    return text.strip(), None


def find_entries(dataset_dir: Path, allow_outside: bool = False) -> tuple[list[Entry], list[Problem]]:
    """The samples of a folder, or of its metadata listing; ``allow_outside`` lets a listing name files
    outside the folder (refused by default: a listing copied from elsewhere must not open any file)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist; set dataset_dir to your clips folder")
    for listing in LISTINGS:
        if (dataset_dir / listing).exists():
            try:
                return _from_listing(dataset_dir / listing, allow_outside)
            except OSError as e:
                return [], [unreadable(dataset_dir / listing, e)]
    problems = []
    files = []
    # os.walk, not rglob: rglob skips a folder it cannot list without a word, and its clips vanish
    for folder, _, names in os.walk(dataset_dir, onerror=lambda e: problems.append(_unlistable(e))):
        files += [p for p in (Path(folder) / n for n in names) if not p.name.startswith(".") and p.is_file()]
    return _group_by_stem(sorted(files), problems)


def mask_stem(p: Path) -> Optional[Path]:
    """The sample stem a mask file belongs to (``clip_mask.png`` -> ``clip``), or None if not a mask."""
    if p.suffix.lower() not in VIDEO_EXTS | IMAGE_EXTS:
        return None
    stem = p.with_suffix("")
    for s in MASK_SUFFIXES:
        if stem.name.endswith(s) and len(stem.name) > len(s):
            return stem.with_name(stem.name[:-len(s)])
    return None


def _group_by_stem(files: list[Path], problems: list[Problem]) -> tuple[list[Entry], list[Problem]]:
    entries = []
    by_stem: dict = {}
    masks = {mask_stem(p): p for p in files if mask_stem(p) is not None}
    for p in files:
        if mask_stem(p) is None:
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
                entries.append(Entry(v, caption_file=cap_file, condition_image=images[0] if images else None,
                                     mask=masks.get(stem)))
        elif images:
            entries.append(Entry(images[0], caption_file=cap_file, kind="image", mask=masks.get(stem)))
    return entries, problems


def _read_rows(path: Path, problems: list[Problem]) -> list[tuple[int, dict]]:
    if path.suffix != ".jsonl":
        with open(path, newline="", encoding="utf-8") as f:
            return list(enumerate(csv.DictReader(f), 2))
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(Problem(f"{path}:{i}", "bad JSON line", str(e), "fix the line or remove it"))
    return rows


def _from_listing(path: Path, allow_outside: bool) -> tuple[list[Entry], list[Problem]]:
    problems: list[Problem] = []
    base = Path(os.path.normpath(path.parent))
    entries = []
    for i, row in _read_rows(path, problems):
        name = row.get("file") or row.get("video") or row.get("path")
        if not name:
            problems.append(Problem(f"{path}:{i}", "no file column", json.dumps(row)[:80], "add a 'file' value"))
            continue
        cond, mask = row.get("condition_image") or row.get("image"), row.get("mask")
        # lexical, not resolved: a symlink the user put inside the folder stays allowed
        paths = [Path(os.path.normpath(base / n)) if n else None for n in (name, cond, mask)]
        outside = [n for n, p in zip((name, cond, mask), paths) if p is not None and not p.is_relative_to(base)]
        if outside and not allow_outside:
            problems += [Problem(f"{path}:{i}", "outside the dataset folder", n,
                                 f"put the file inside {base} and list it relative to it, or set allow_outside=True "
                                 "to train on files elsewhere") for n in outside]
            continue
        file = paths[0]
        kind = "image" if file.suffix.lower() in IMAGE_EXTS else "video"
        entries.append(Entry(file, caption=row.get("caption"), condition_image=paths[1], kind=kind, mask=paths[2]))
    return entries, problems


def check_entry(e: Entry, settings, tokenizer) -> Checked:
    rel = str(e.file)
    try:
        if not e.file.exists():
            return Checked(e, problem=Problem(rel, "missing file", "listed but not found", "fix the path in the listing"))
        size = e.file.stat().st_size
        if size == 0:
            return Checked(e, problem=Problem(rel, "empty file", "0 bytes", "re-copy or re-export the clip"))
        digest = sha256_file(e.file)
    except OSError as ex:
        return Checked(e, problem=unreadable(e.file, ex))
    if e.mask is not None and not e.mask.is_file():
        return Checked(e, problem=Problem(str(e.mask), "missing mask", f"the loss mask of {e.file} is not found",
                                          "fix the mask path in the listing, or remove it to learn the whole frame"))
    caption, tokens, problem = _caption(e, settings, tokenizer)
    return Checked(e, digest, size, caption, tokens, problem)


def _caption(e: Entry, settings, tokenizer) -> tuple[Optional[str], Optional[int], Optional[Problem]]:
    if e.caption is not None and not e.caption.strip():
        return None, None, Problem(str(e.file), "empty caption", "0 characters", "write a caption in the listing")
    caption, problem = (e.caption, None) if e.caption is not None else read_caption(e.caption_file)
    if problem:
        return None, None, problem
    if settings.trigger:
        caption = f"{settings.trigger.strip()} {caption}"
    if tokenizer is None:
        return caption, None, None
    from ..text import count_tokens

    n_tokens = count_tokens(tokenizer, caption)
    if n_tokens > settings.max_caption_tokens:
        return None, n_tokens, Problem(
            str(e.caption_file or e.file), "caption too long", f"{n_tokens} tokens > {settings.max_caption_tokens}",
            "shorten the caption; the text encoder cuts everything after 512 tokens")
    return caption, n_tokens, None


def keep_one_copy(checked: list[Checked]) -> tuple[list[Checked], list[Problem]]:
    """One file per content: the first by path with a usable caption, else the first by path; every
    other copy is reported as a duplicate of it (a copy with a bad caption never costs the good one)."""
    groups: dict[str, list[Checked]] = {}
    for c in checked:
        if c.digest:
            groups.setdefault(c.digest, []).append(c)
    dropped, problems = set(), []
    for group in groups.values():
        ordered = sorted(group, key=lambda c: str(c.entry.file))
        keeper = next((c for c in ordered if c.problem is None), ordered[0])
        for c in ordered:
            if c is not keeper:
                dropped.add(id(c))
                problems.append(Problem(str(c.entry.file), "duplicate", f"same content as {keeper.entry.file}",
                                        f"{keeper.entry.file} is kept; remove this copy (it would be trained twice)"))
    return [c for c in checked if id(c) not in dropped], problems
