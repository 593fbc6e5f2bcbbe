"""Atomic file writes: a crash never leaves a half-written file that is later read as good."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The permissions a plain open() (0666) or mkdir() (0777) gives under the current umask.
    tempfile.mkstemp/mkdtemp create 0600/0700; a file renamed from one keeps that unless fixed."""
    return (0o777 if directory else 0o666) & ~_umask()


def set_plain_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything under it the permissions plain open()/mkdir() would. For trees
    written by libraries that create 0600 files (safetensors' save_file, behind save_pretrained)."""
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, plain_mode(directory=True))
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), plain_mode())


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a whole file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temporary name in the same folder, then rename over ``path``.
    ``suffix`` ends the temporary name (e.g. ".mp4" for writers that pick the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 & ~umask).
        # After write(): a writer that replaces the file (rather than truncating it) is covered too.
        os.chmod(tmp, plain_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
