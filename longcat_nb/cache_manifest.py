"""The cache manifest's batched writes, the check of every cache file against it, and what it says about
the text encoder (cache.py builds and reads the cache; see its docstring for the layout)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .cache import CacheError, _manifest_path, file_problem, read_manifest
from .io import atomic_write_text

MANIFEST_EVERY_FILES = 50  # manifest writes during a build: every N new files or S seconds, and at the end
MANIFEST_EVERY_SECONDS = 30.0


class ManifestWriter:
    """Writes the build's manifest every ``every`` new files or ``seconds``, and on ``flush()``: it holds
    every record's frame indices (~1.2 MB at 1,000 clips), so rewriting it after each file costs more
    than the file. A kill loses at most the files since the last write; the resumed build re-encodes
    them (deterministic: the same bytes) and overwrites the untracked copies."""

    def __init__(self, run_dir, m: dict, every: Optional[int] = None, seconds: Optional[float] = None):
        self.path, self.m = _manifest_path(run_dir), m
        self.every = MANIFEST_EVERY_FILES if every is None else every
        self.seconds = MANIFEST_EVERY_SECONDS if seconds is None else seconds
        self.pending, self.writes, self.last = 0, 0, time.monotonic()

    def added(self) -> None:
        self.pending += 1
        if self.pending >= self.every or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self, only_pending: bool = False) -> None:
        if only_pending and not self.pending:
            return
        atomic_write_text(self.path, json.dumps(self.m, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.pending, self.writes, self.last = 0, self.writes + 1, time.monotonic()


def cache_text_encoder(run_dir) -> Optional[dict]:
    """The text encoder the run's cache was built with, from its manifest: {"name", "source", "id",
    "width"} (width = the DiT caption width the embeddings are padded to); None without a cache."""
    m = read_manifest(run_dir)
    if m is None:
        return None
    ident = m.get("identity") or {}
    return {"name": m["encoder"], "source": ident.get("text_encoder_source", ""),
            "id": ident.get("text_encoder_id", ""), "width": ident.get("caption_channels")}


def verify_cache(run_dir, full: bool = False, m: Optional[dict] = None) -> int:
    """Check every file the cache's entries and its negative prompt use against the manifest: size and
    safetensors header (cheap), with ``full`` the sha256 of every byte too. Raises CacheError naming
    each damaged file and the fix; returns the number of files checked."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir) if m is None else m
    if m is None:
        raise CacheError(f"{_manifest_path(run_dir)} does not exist: run 02_cache first")
    used: dict = {}
    for k, e in sorted(m["entries"].items()):
        for table in ("latents", "text"):
            info = m[table].get(e[table])
            if info is None:
                raise CacheError(f"{_manifest_path(run_dir)}: entry {k} points at a file the manifest does not "
                                 "list; re-run 02_cache")
            used[info["file"]] = info
    if m.get("negative") in m["text"]:
        used[m["text"][m["negative"]]["file"]] = m["text"][m["negative"]]
    cache_dir = run_dir / "cache"
    bad = [f"{cache_dir / f} is damaged ({why})" for f, info in sorted(used.items())
           if (why := file_problem(cache_dir, info, full))]
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CacheError(f"{'; '.join(bad[:5])}{more}: re-run 02_cache, which re-makes damaged files (the rest "
                         "of the cache is kept)")
    return len(used)
