"""Training state on disk: training checkpoints (write, verify, find, load, prune) and the run folder's lock.

``checkpoints/step-N/`` holds lora.safetensors, optimizer.safetensors and rng.safetensors (tensors)
and state.json (step, data position, losses, the optimizer's structure, the settings, and the size and
sha256 of each tensor file). A training checkpoint is written as ``.step-N.tmp`` and renamed; an old one is
renamed to ``.step-N.del`` before it is deleted, so a ``step-N`` folder with state.json is always
whole, and what a killed run leaves behind is removed at the next start. Never pickle.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from . import lora as lora_lib
from .config import TrainSettings, load_config, section_from_dict
from .io import atomic_save_safetensors, atomic_write_json, lock_owner, process_lock, sha256_file

TENSOR_FILES = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors")
LOCK_NAME = ".train.lock"


class RunLocked(RuntimeError):
    """Another trainer holds the run folder."""


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing, truncated, altered, or holds NaN/inf weights."""


class ResumeMismatch(ValueError):
    """The run's newest checkpoint was trained with settings this run cannot continue from."""


# ---------------------------------------------------------------------------------------------
# the run's lock: one trainer per run folder
# ---------------------------------------------------------------------------------------------
def _locked(lock: Path, owner: dict) -> RunLocked:
    return RunLocked(
        f"{lock}: another trainer (pid {owner.get('pid')} on {owner.get('host')}) is training this run. Wait for "
        "it to finish, stop it (Ctrl-C, or interrupt its notebook kernel: it saves a checkpoint first), or use "
        f"another run_dir; if no trainer is running, delete {lock}.")


def run_lock(run_dir: str | os.PathLike, log: Callable[[str], None] = print):
    """Held while train() runs; a dead trainer's lock is taken over (and said so)."""
    lock = Path(run_dir) / LOCK_NAME
    return process_lock(lock, lambda owner: _locked(lock, owner), on_stale=lambda owner: log(
        f"{lock}: its trainer (pid {owner.get('pid')} on {owner.get('host')}) is gone; lock taken over"))


def check_unlocked(run_dir: str | os.PathLike) -> None:
    lock = Path(run_dir) / LOCK_NAME
    owner = lock_owner(lock)
    if owner is not None:
        raise _locked(lock, owner)


# ---------------------------------------------------------------------------------------------
# optimizer state: tensors into safetensors, the structure (any nesting, e.g. bitsandbytes') into JSON
# ---------------------------------------------------------------------------------------------
def flatten_optimizer(opt) -> tuple[dict, dict]:
    """(tensors, structure) of an optimizer's state_dict: each tensor is replaced by {"__tensor__": name};
    dicts with non-string keys, tuples and non-finite floats are tagged so they come back as they were."""
    tensors: dict = {}
    stored: dict = {}  # one tensor shared by several entries (bitsandbytes' qmaps) is stored once
    starts: set = set()

    def enc(v, key: str):
        if torch.is_tensor(v):
            layout = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
            if layout not in stored:
                shares = layout[:2] in starts
                starts.add(layout[:2])
                stored[layout] = key if key not in tensors else f"{key}#{len(tensors)}"
                tensors[stored[layout]] = v.clone() if shares else v  # safetensors refuses overlapping views
            return {"__tensor__": stored[layout]}
        if isinstance(v, dict):
            if all(isinstance(k, str) and k != "__tensor__" and not k.startswith("__tag_") for k in v):
                return {k: enc(x, f"{key}.{k}") for k, x in v.items()}
            return {"__tag_dict__": [[enc(k, key), enc(x, f"{key}.{k}")] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tag_tuple__": [enc(x, f"{key}.{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{key}.{i}") for i, x in enumerate(v)]
        if isinstance(v, float) and not math.isfinite(v):
            return {"__tag_float__": repr(v)}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"optimizer state {key!r} is a {type(v).__name__}: only tensors, numbers, strings, "
                        "lists and dicts can be checkpointed without pickle")

    structure = enc(opt.state_dict() if hasattr(opt, "state_dict") else opt, "state_dict")
    return tensors, {"structure": structure}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The state_dict flatten_optimizer took apart (also reads the older {param_groups, scalars} form)."""
    if "structure" not in meta:
        return _unflatten_v1(tensors, meta)

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return tensors[v["__tensor__"]]
        if "__tag_dict__" in v:
            return {dec(k): dec(x) for k, x in v["__tag_dict__"]}
        if "__tag_tuple__" in v:
            return tuple(dec(x) for x in v["__tag_tuple__"])
        if "__tag_float__" in v:
            return float(v["__tag_float__"])
        return {k: dec(x) for k, x in v.items()}

    return dec(meta["structure"])


def _unflatten_v1(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


@contextlib.contextmanager
def interrupt_held():
    """Hold back SIGINT (Ctrl-C, a kernel interrupt) until the block is done, so a saved step never holds
    half an update; anywhere else an interrupt just drops the unfinished step."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # only the main thread may set handlers; None: a handler set outside Python, left alone
        return
    got = []
    before = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if got and callable(before):
            before(*got[0])
        elif got and before != signal.SIG_IGN:
            raise KeyboardInterrupt


def rng_state() -> dict:
    """The global generators (the data's noise is seeded per micro-batch; these drive LoRA dropout)."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = st
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        sts = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
        if len(sts) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(sts)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _discard(folder: Path) -> None:
    """Rename first, then delete: a kill midway leaves a .del folder, never a step-N missing files."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name.lstrip('.')}.del")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, position: dict, losses: list,
                    settings: TrainSettings, keep: int, world: int = 1, rng: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write checkpoints/step-N atomically and keep the last K. ``rng``: the generators' state to store
    (default: now); ``extra``: more tensor files, name -> tensors (e.g. the EMA's), restored on resume
    into the state's "extra". Refuses NaN/inf weights: a diverged model is never saved over good checkpoints."""
    extra = extra or {}
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:07d}"
    lora = lora_lib.lora_state_dict(model)
    opt_tensors, opt_meta = flatten_optimizer(opt)
    bad = nonfinite(lora) + nonfinite(opt_tensors) + [b for t in extra.values() for b in nonfinite(t)]
    if bad:
        raise ValueError(f"not saving {final}: {', '.join(bad[:3])} hold NaN/inf values (training diverged)")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, tensors in [*zip(TENSOR_FILES, (lora, opt_tensors, rng if rng is not None else rng_state())),
                          *extra.items()]:
        if name == "lora.safetensors":  # with each module's alpha in the header: it loads at the trained scale
            path = lora_lib.save_trained(tmp / name, model, lora_lib.run_metadata(ckpt_dir.parent, step))
        else:
            path = atomic_save_safetensors(tmp / name, tensors)
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_json(tmp / "state.json", {
        "step": step, "position": position, "losses": losses, "optimizer": opt_meta,
        "settings": asdict(settings), "time": time.time(), "world_size": world, "files": files,
        "extra_files": sorted(extra),
    })
    _discard(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        _discard(old)
    return final


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """step-N folders with their state.json (written last), oldest first."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").exists())


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def clean_incomplete(ckpt_dir: Path) -> list[str]:
    """Remove what a killed save or prune left (.step-N.tmp, .step-N.del, step-N without state.json);
    a whole .step-N.tmp whose step-N is gone (killed between the two renames) is renamed into place.
    Returns what was done, one phrase per folder. Call under the run's lock."""
    done = []
    for p in sorted(Path(ckpt_dir).glob(".step-*.tmp")):
        final = p.with_name(p.name[1:-len(".tmp")])
        if (p / "state.json").exists() and not final.exists():
            os.replace(p, final)
            done.append(f"recovered {final.name} from {p.name}")
    for p in sorted(Path(ckpt_dir).glob(".step-*")) + sorted(Path(ckpt_dir).glob("step-*")):
        if p.is_dir() and (p.name.startswith(".") or not (p / "state.json").exists()):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


def read_checkpoint(path: Path) -> dict:
    """state.json and the three tensor files of a checkpoint, checked against the sizes and sha256 in
    state.json (older checkpoints have none: then only loaded); CheckpointDamaged names the file."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path / 'state.json'} cannot be read ({e})") from None
    out = {"state": state}
    for name in TENSOR_FILES + tuple(state.get("extra_files", ())):
        f, want = path / name, (state.get("files") or {}).get(name)
        size = f.stat().st_size if f.is_file() else None
        if want and size != want["bytes"]:
            raise CheckpointDamaged(f"{f} is {'missing' if size is None else f'{size} bytes'}, "
                                    f"{want['bytes']} were written (truncated or replaced)")
        if want and sha256_file(f) != want["sha256"]:
            raise CheckpointDamaged(f"{f} fails its checksum (its sha256 differs from the one saved in "
                                    "state.json): the file was altered after it was written")
        try:
            out[name] = load_file(f)
        except Exception as e:  # safetensors' own error names no file: say which
            raise CheckpointDamaged(f"{f} cannot be read ({type(e).__name__}: {e})") from None
    bad = nonfinite(out["lora.safetensors"])
    if bad:
        raise CheckpointDamaged(f"{path / 'lora.safetensors'} holds NaN/inf values ({', '.join(bad[:3])})")
    return out


def _apply(ck: dict, model, opt) -> dict:
    lora_lib.load_lora_state_dict(model, ck["lora.safetensors"])
    opt.load_state_dict(unflatten_optimizer(ck["optimizer.safetensors"], ck["state"]["optimizer"]))
    _set_rng_state(ck["rng.safetensors"])
    return {**ck["state"], "extra": {n: ck[n] for n in ck["state"].get("extra_files", ())}}


def load_checkpoint(path: Path, model, opt) -> dict:
    """Load one checkpoint (verified) into the model and optimizer; its state.json."""
    return _apply(read_checkpoint(path), model, opt)


def resume_latest(ckpt_dir: Path, model, opt, settings: TrainSettings, log: Callable[[str], None] = print,
                  set_aside: bool = True) -> Optional[tuple[Path, dict]]:
    """Load the newest intact checkpoint; each damaged one newer than it is skipped with its reason and
    (``set_aside``) renamed damaged-step-N, so pruning never keeps it in place of a good one. None when
    there is none; CheckpointDamaged when every checkpoint is damaged (nothing is thrown away)."""
    done, skipped = complete_checkpoints(ckpt_dir), []
    for path in reversed(done):
        try:
            ck = read_checkpoint(path)
        except CheckpointDamaged as e:
            log(f"skipped checkpoint {path.name}: {e}" + (f"; kept as damaged-{path.name}" if set_aside else ""))
            skipped.append(path)
            continue
        _refuse_mismatch(path, ck["state"].get("settings", {}), settings)
        for bad in skipped if set_aside else []:
            os.replace(bad, bad.with_name(f"damaged-{bad.name}"))
        return path, _apply(ck, model, opt)
    if done:
        raise CheckpointDamaged(f"every checkpoint in {ckpt_dir} is damaged (see the lines above): restore one, or "
                                f"delete {ckpt_dir} to start this run over")
    return None


# Settings a checkpoint cannot be resumed under: rank, targets and adapter change the LoRA tensors, the optimizer
# its state (adamw8bit and prodigy keep other tensors than adamw), and alpha the scale alpha/rank that
# multiplies everything learnt so far (it loads, but the model jumps). Everything else (lr, steps,
# schedule, batch, seed, precision of the frozen base, dropout, ...) may change between runs.
RESUME_KEYS = ("rank", "targets", "alpha", "optimizer", "adapter")


def check_resume(run_dir: str | os.PathLike, settings=None) -> Optional[Path]:
    """Refuse, in one line, settings the newest checkpoint in run_dir/checkpoints cannot resume under,
    and a run folder another trainer is using (RunLocked).

    ``settings``: the train section about to be used (a TrainSettings or a dict of some of its keys,
    the rest from config.json); None = config.json as it is. Returns the checkpoint that will be
    resumed (None = a fresh start). 03_train_lora calls this before it writes config.json, and
    train() again before it builds anything."""
    run_dir = Path(run_dir)
    check_unlocked(run_dir)
    for last in reversed(complete_checkpoints(run_dir / "checkpoints")):
        try:  # an unreadable one is skipped at resume (and said so there)
            was = json.loads((last / "state.json").read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError):
            continue
        if settings is None or isinstance(settings, dict):
            current = asdict(load_config(run_dir).train)
            current.update(settings or {})
            settings = section_from_dict("train", current, str(run_dir / "config.json"))
        _refuse_mismatch(last, was, settings)
        return last
    return None


def _refuse_mismatch(last: Path, was: dict, settings: TrainSettings) -> None:
    wanted = asdict(settings)
    same = {"targets": lambda a, b: sorted(lora_lib.expand_targets(a)) == sorted(lora_lib.expand_targets(b)),
            "alpha": lambda a, b: float(a) == float(b)}
    diff = [k for k in RESUME_KEYS if k in was and not same.get(k, lambda a, b: a == b)(was[k], wanted[k])]
    if not diff:
        return
    had = ", ".join(f"{k}={was[k]!r}" for k in diff)
    asked = ", ".join(f"{k}={wanted[k]!r}" for k in diff)
    back = " and ".join(f"{k}={was[k]!r}" for k in diff)
    raise ResumeMismatch(
        f"{last} was trained with {had}, this run asks {asked}: a checkpoint cannot resume under another "
        f"{'/'.join(diff)}. Use a new run_dir for the new settings, set {back} to continue this run, or delete "
        f"{last.parent} to start this run over.")
