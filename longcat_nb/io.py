"""Atomic file writes: a crash never leaves a half-written file that is later read as good."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


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


def _process_start(pid: int) -> Optional[str]:
    """A process's start time (Linux /proc), which tells its owner from a later process given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in ( ) may hold spaces


def _alive(owner: dict, me: dict) -> bool:
    if owner.get("host") != me["host"]:
        return owner.get("host") is not None  # another machine's pid cannot be checked: assume it runs
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == me["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _process_start(pid)  # None where /proc is hidden: the pid alone decides
    return owner.get("started") is None or now is None or owner["started"] == now


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def lock_owner(path: str | os.PathLike) -> Optional[dict]:
    """The live process (its JSON: host, pid) holding the lock file ``path``; None when there is no lock,
    it is this process's, or its owner is gone. A lock from another host counts as live."""
    try:
        owner = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and _alive(owner, _me()) else None


@contextlib.contextmanager
def process_lock(path: str | os.PathLike, busy: Callable[[dict], Exception],
                 on_stale: Optional[Callable[[dict], None]] = None) -> Iterator[None]:
    """Hold the lock file ``path`` (host, pid and start time as JSON) while the block runs; removed after.

    A live owner raises ``busy(owner)``; the lock of a dead owner (killed, crashed) is taken over and
    ``on_stale(owner)`` told. The file is created with O_EXCL, so of two processes only one gets it."""
    path, me = Path(path), _me()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # os.open's default is 0o777
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}  # half-written by an owner killed at once
            if not isinstance(owner, dict):
                owner = {}
            if _alive(owner, me):
                raise busy(owner) from None
            path.unlink(missing_ok=True)
            if on_stale is not None and owner.get("pid") != me["pid"]:
                on_stale(owner)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise busy({"host": "?", "pid": "?"})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
