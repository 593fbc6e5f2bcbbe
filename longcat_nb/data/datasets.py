"""Several datasets in one run: the ``dataset.datasets`` list, its checks, and the scan of every entry.

An entry is ``{"dataset_dir": ..., "repeats": 1, "role": "train", "loss_weight": 1.0}`` plus optional
overrides of the dataset section's per-folder settings (num_frames, target_fps, resolution, ...).
``role`` is train, regularisation (prior-preservation data, mixed in with its own loss weight) or eval
(held out: scored for the eval loss, never trained on). A train entry can also give part of its folder
to evaluation: ``eval_fraction`` (a fixed, seeded share of its files) or ``eval_files`` (names relative
to the folder). The empty list is the one-folder form: one train entry built from the section itself.

Every record in dataset.jsonl carries its entry (``dataset``), ``role``, ``repeats`` and
``loss_weight``; the cache keeps the record, so the trainer reads them from there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROLES = ("train", "regularisation", "eval")
# the dataset section's settings an entry may set for its own folder
OVERRIDES = ("num_frames", "target_fps", "resolution", "extraction", "windows", "stride", "crop", "trigger",
             "short_clips", "min_frames", "max_caption_tokens", "crop_seed", "crop_variants", "allow_outside")
ENTRY_KEYS = ("dataset_dir", "repeats", "role", "loss_weight", "eval_fraction", "eval_files", "name") + OVERRIDES
ENTRY_DEFAULTS = {"repeats": 1, "role": "train", "loss_weight": 1.0, "eval_fraction": 0.0, "eval_files": []}
EXAMPLE = '[{"dataset_dir": "clips/", "repeats": 1}, {"dataset_dir": "stills/", "num_frames": 1, "repeats": 3}]'


@dataclass
class DatasetEntry:
    index: int
    dataset_dir: str
    settings: Any  # config.DatasetSettings with the entry's overrides applied
    repeats: int = 1
    role: str = "train"
    loss_weight: float = 1.0
    eval_fraction: float = 0.0
    eval_files: list = field(default_factory=list)
    name: str = ""


def _number(value, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value).is_integer() if whole else value == value and abs(value) != float("inf")


def _own_key_problem(key: str, value) -> Optional[str]:
    """What is wrong with one of the entry's own keys (not an override), with the fix; None when fine."""
    if key == "dataset_dir" and not (isinstance(value, str) and value.strip()):
        return 'give the folder (or metadata.jsonl/csv folder) as a text, e.g. "dataset_dir": "clips/"'
    if key == "repeats" and not (_number(value, True) and value >= 1):
        return "use a whole number >= 1 (how many times its samples are drawn per epoch)"
    if key == "role" and value not in ROLES:
        return f"use one of {', '.join(ROLES)}"
    if key == "loss_weight" and not (_number(value, False) and value > 0):
        return "use a number > 0 (1.0 = as a train sample; prior preservation often 0.5-1.0)"
    if key == "eval_fraction" and not (_number(value, False) and 0 <= value < 1):
        return "use a share from 0 (none) up to, not including, 1 (e.g. 0.1 holds out a tenth of the files)"
    if key == "eval_files" and not (isinstance(value, list) and all(isinstance(x, str) and x for x in value)):
        return 'use a list of file names relative to the folder, e.g. ["clip_07.mp4"]'
    if key == "name" and not isinstance(value, str):
        return "use a text"
    return None


def entry_problem(i: int, entry) -> Optional[str]:
    """The first thing wrong with entry ``i``: its index, key, value and the fix; None when fine."""
    from ..config import DatasetSettings, _coerce_field, field_problem

    where = f"entry {i}"
    if not isinstance(entry, dict):
        return f"{where} = {entry!r}: each entry must be an object, e.g. {{\"dataset_dir\": \"clips/\", \"repeats\": 1}}"
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        return f"{where}: unknown key {unknown[0]!r}: remove it or use one of {', '.join(ENTRY_KEYS)}"
    if "dataset_dir" not in entry:
        return f'{where} has no dataset_dir: add "dataset_dir": "path/to/folder"'
    for key, value in entry.items():
        problem = _own_key_problem(key, value) if key not in OVERRIDES else None
        if problem:
            return f"{where}: {key}={value!r}: {problem}"
    own = {f.name: f for f in dataclasses.fields(DatasetSettings)}
    for key in OVERRIDES:
        if key in entry:
            try:
                problem = field_problem("dataset", own[key], _coerce_field(own[key], entry[key], key))
            except ValueError as e:
                problem = str(e)
            if problem:
                return f"{where}: {problem}"
    if entry.get("role", "train") != "train" and (entry.get("eval_fraction") or entry.get("eval_files")):
        return f"{where}: eval_fraction/eval_files carve evaluation clips out of a train entry: remove them here"
    return None


def list_problem(items) -> Optional[str]:
    """config.py's check of ``dataset.datasets``: every entry, before anything is written."""
    if isinstance(items, str):
        items = parse_list(items)
    if not isinstance(items, list):
        return f"must be a JSON list of entries, e.g. {EXAMPLE}"
    for i, entry in enumerate(items):
        problem = entry_problem(i, entry)
        if problem:
            return problem
    if items and not any(isinstance(e, dict) and e.get("role", "train") != "eval" for e in items):
        return 'every entry has role "eval": give at least one train (or regularisation) entry'
    return None


def parse_list(value) -> Any:
    """A papermill/CLI value: a list, or its JSON text (``-p datasets='[...]'``); "" = []."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            return f"not JSON ({e.msg} at character {e.pos})"
    return value


def dataset_entries(settings, default_dir: str = "") -> list[DatasetEntry]:
    """The run's entries, each with its settings; ``[]`` gives the one-folder form as one train entry."""
    from ..config import ConfigError, DatasetSettings, _coerce_field

    items = parse_list(getattr(settings, "datasets", []) or [])
    problem = list_problem(items)
    if problem:
        raise ConfigError(f"dataset.datasets: {problem}")
    if not items:
        return [DatasetEntry(0, settings.dataset_dir or default_dir, settings)]
    own = {f.name: f for f in dataclasses.fields(DatasetSettings)}
    out = []
    for i, e in enumerate(items):
        overrides = {k: _coerce_field(own[k], e[k], k) for k in OVERRIDES if k in e}
        s = dataclasses.replace(settings, dataset_dir=e["dataset_dir"], datasets=[], **overrides)
        vals = {**ENTRY_DEFAULTS, **{k: e[k] for k in ENTRY_DEFAULTS if k in e}}
        out.append(DatasetEntry(i, e["dataset_dir"], s, int(vals["repeats"]), vals["role"],
                                float(vals["loss_weight"]), float(vals["eval_fraction"]), list(vals["eval_files"]),
                                e.get("name") or Path(e["dataset_dir"]).name))
    return out


def largest_settings(settings):
    """The entry whose clips are largest (pixels x frames), for the memory planner."""
    entries = dataset_entries(settings) if getattr(settings, "datasets", None) else [None]
    if entries == [None]:
        return settings

    def size(s):
        h, w = (int(v) for v in str(s.resolution).lower().split("x"))
        return h * w * s.num_frames

    return max((e.settings for e in entries), key=size)


# ---------------------------------------------------------------------------------------------
# the scan of every entry
# ---------------------------------------------------------------------------------------------
def _carved(files: list[str], entry: DatasetEntry, base: Path) -> set[str]:
    """The files of a train entry held out for evaluation: the named ones, plus a fixed share chosen by
    a hash of each name (the same files on every scan, whatever order the folder lists them in)."""
    named = {str((base / f).resolve()) for f in entry.eval_files}
    missing = [f for f in entry.eval_files if not (base / f).exists()]
    if missing:
        raise FileNotFoundError(f"dataset.datasets entry {entry.index}: eval_files names {missing[0]!r}, not found "
                                f"in {base}: give names relative to that folder")
    chosen = {f for f in files if str(Path(f).resolve()) in named}
    if entry.eval_fraction:
        n = min(max(1, round(entry.eval_fraction * len(files))), len(files) - 1)  # some files stay trained
        ranked = sorted(files, key=lambda f: hashlib.sha256(Path(f).name.encode()).hexdigest())
        chosen |= set(ranked[:n])
    return chosen


def _tag(report, entry: DatasetEntry) -> None:
    base = Path(report.dataset_dir)
    held = _carved(sorted({r["file"] for r in report.records}), entry, base)
    for r in report.records:
        eval_clip = r["file"] in held or entry.role == "eval"
        r.update(dataset=entry.index, role="eval" if eval_clip else entry.role,
                 repeats=1 if eval_clip else entry.repeats, loss_weight=1.0 if eval_clip else entry.loss_weight)
    for f in report.files:
        f["dataset"] = entry.index


def scan_datasets(settings, tokenizer=None, progress=None, default_dir: str = ""):
    """Scan every entry with its own settings and join them into one ScanReport; ``report.entries``
    holds one row per entry (samples, repeats, share of an epoch). A file that an eval entry holds out
    is dropped from the train entries that also list it (an eval clip is never trained on)."""
    from .scan import ScanReport, scan_dataset
    from .sources import Problem

    entries = dataset_entries(settings, default_dir)
    joined = ScanReport(settings=dataclasses.asdict(settings), dataset_dir=entries[0].dataset_dir)
    for e in entries:
        rep = scan_dataset(e.dataset_dir or default_dir, e.settings, tokenizer, progress)
        _tag(rep, e)
        joined.records += rep.records
        joined.problems += rep.problems
        joined.files += rep.files
        joined.found += rep.found
    held = {r["file"] for r in joined.records if r["role"] == "eval"}
    leaked = sorted({r["file"] for r in joined.records if r["role"] != "eval" and r["file"] in held})
    joined.problems += [Problem(f, "held out for eval", "listed by a train entry and an eval entry",
                                "it is used for the eval loss only; remove it from one of the two folders")
                        for f in leaked]
    joined.records = [r for r in joined.records if r["role"] == "eval" or r["file"] not in held]
    joined.entries = contributions(joined.records, entries)
    return joined


def contributions(records: list[dict], entries: list[DatasetEntry]) -> list[dict]:
    """Per entry: its samples, repeats and how many draws (and what share) of one epoch they make."""
    rows = []
    for e in entries:
        mine = [r for r in records if r.get("dataset", 0) == e.index]
        trained = [r for r in mine if r.get("role") != "eval"]
        rows.append({"entry": e.index, "name": e.name, "dataset_dir": e.dataset_dir, "role": e.role,
                     "repeats": e.repeats, "loss_weight": e.loss_weight, "samples": len(trained),
                     "eval samples": len(mine) - len(trained),
                     "draws per epoch": len(trained) * e.repeats,
                     "frames": e.settings.num_frames, "resolution": e.settings.resolution})
    total = sum(r["draws per epoch"] for r in rows) or 1
    for r in rows:
        r["share of epoch"] = f"{100 * r['draws per epoch'] / total:.0f}%"
    return rows
