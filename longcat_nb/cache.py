"""The cache: VAE latents and text embeddings on disk, so training never runs the VAE or UMT5-XXL.

Layout under ``run_dir/cache/``::

    manifest.json                    what is cached, with the identity and checksum of every file
    latents/<latent-key>.safetensors latents [16, T, h, w] (normalized), cond_latents [16, 1, h, w] (I2V only)
    text/<text-key>.safetensors      text_embeds [1, n, C] (the n real tokens), text_mask [512] int64
    .lock                            present while a build runs (pid), so two builds never interleave

One file per latent and one per distinct caption, not shards: every write is one atomic rename, a
damaged file costs one entry, a changed caption or clip rewrites only its own file, and the trainer
reads any entry without touching the others.

Keys. A *latent key* hashes what the latents depend on: the source file (size, mtime and the sha256 of
its first and last MiB — a full-content hash would re-read every clip on every run), the conditioning
image (same), the frame indices, bucket (size and frames), crop, the VAE's identity (its config and the
size + head/tail hash of its weight files), the posterior mode and the stored dtype. A *text key*
hashes the caption, the encoder name and identity (config + weights), the token limit and the dtype.
An *entry key* (one per dataset.jsonl record) hashes the two, so a caption edit re-encodes only the
caption and a clip edit only the clip. How a latent was computed (device, VAE compute dtype, tiling)
changes only rounding and is recorded per file, not keyed. The checkpoint folder is recorded but not
keyed: the weights' content identity is stronger, and moving the folder must not re-encode.

Encoding is deterministic: one item at a time (batch composition never changes the numbers), the
posterior noise drawn in float32 on the CPU from a seed derived from the latent key, cuDNN in its
deterministic mode. So a build that is killed at any point and re-run ends with the same files, bit for
bit, as an uninterrupted one. Files are written to a temporary name and renamed; the manifest (also
atomic) is written in batches (cache_manifest.py): a kill loses at most the files since its last write,
which the resumed build re-makes, identically. A file whose size, safetensors header or sha256
disagrees with the manifest is re-made by the build and refused by the reader, never silently read
(``verify_cache`` checks them all when training starts).

Text embeddings store only the real tokens (mask == 1): the DiT zeroes the projected padding
(``text_tokens_zero_pad``, spec §2.6) or masks it out, so padded values never reach the output, and
1 000 captions take ~0.6 GB instead of 4 GB. The reader scatters them back into [1, 512, C] zeros.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .config import load_config
from .io import atomic_save_safetensors, process_lock, sha256_file  # noqa: F401 (cache_encode calls it through here)

if TYPE_CHECKING:
    from .cache_manifest import ManifestWriter

CACHE_FORMAT = "longcat-nb-cache"
CACHE_VERSION = 2
ENCODERS = ("umt5", "qwen2.5-vl")
POSTERIORS = ("sample", "mode")
QWEN_DEFAULT = "Qwen/Qwen2.5-VL-7B-Instruct"
MAX_TEXT_TOKENS = 512
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MIB = 1 << 20


class CacheError(RuntimeError):
    """The cache cannot be used as it is (wrong encoder or settings, damaged file, unfinished build)."""


# ---------------------------------------------------------------------------------------------
# identities and keys
# ---------------------------------------------------------------------------------------------
def _head_tail_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(-_MIB, os.SEEK_END)
            h.update(f.read(_MIB))
    return h.hexdigest()


def source_identity(path: str | os.PathLike, memo: Optional[dict] = None) -> dict:
    """A source file's identity: size, mtime and the sha256 of its first and last MiB. ``memo`` (one
    build's dict) lets the windows of one clip read it once."""
    p = Path(path)
    st = p.stat()
    k = (str(p), st.st_size, st.st_mtime_ns)
    if memo is None or k not in memo:
        h = _head_tail_sha256(p, st.st_size)
        if memo is None:
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h}
        memo[k] = h
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": memo[k]}


def folder_identity(folder: Path) -> str:
    """Config + weight files (name, size, head/tail hash) of a model folder; no paths, no mtimes, so a
    moved or re-downloaded identical model keeps its identity."""
    h = hashlib.sha256()
    cfg = folder / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"no-config")
    for w in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")):
        size = w.stat().st_size
        h.update(f"{w.name}:{size}:{_head_tail_sha256(w, size)}".encode())
    return h.hexdigest()[:16]


def model_identity(folder: Path, settings) -> dict:
    """What the cached tensors depend on in the model: VAE, text encoder, and the DiT's text width."""
    from .model_files import check_checkpoint

    folder = check_checkpoint(folder, ["dit", "vae"] + (["text_encoder"] if settings.text_encoder == "umt5" else []))
    dit_cfg = json.loads((folder / "dit" / "config.json").read_text())
    caption_channels = int(dit_cfg.get("caption_channels", 4096))
    if settings.text_encoder == "umt5":
        te_source, te_id = str(folder / "text_encoder"), folder_identity(folder / "text_encoder")
        te_dim = int(json.loads((folder / "text_encoder" / "config.json").read_text()).get("d_model", caption_channels))
    else:
        te_source = settings.qwen_path or QWEN_DEFAULT
        local = Path(te_source).expanduser()
        te_id = folder_identity(local) if local.is_dir() else hashlib.sha256(te_source.encode()).hexdigest()[:16]
        te_dim = caption_channels  # zero-padded to the DiT's caption width
    return {"checkpoint": str(folder.resolve()), "vae": folder_identity(folder / "vae"),
            "text_encoder": settings.text_encoder, "text_encoder_source": te_source, "text_encoder_id": te_id,
            "text_dim": te_dim, "caption_channels": caption_channels}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def latent_key(record: dict, identity: dict, settings, memo: Optional[dict] = None) -> str:
    cond = record.get("condition_image")
    keyed = {
        "v": CACHE_VERSION, "src": source_identity(record["file"], memo), "kind": record.get("kind", "video"),
        "cond": source_identity(cond, memo) if cond else None, "frames": record.get("frame_indices"),
        "bucket": record["bucket"], "size": [record["num_frames"], record["height"], record["width"]],
        "crop": _crop_identity(record), "vae": identity["vae"], "dtype": settings.latent_dtype,
        "posterior": settings.posterior,
    }
    if record.get("mask"):  # the loss mask is stored with the latents; records without one keep their key
        keyed["mask"] = source_identity(record["mask"], memo)
    return _hash(keyed)


def _crop_identity(record: dict):
    """The crop policy, plus where a random crop sits: its latents are valid for that crop only. Records
    without an offset (center, none) keep the key they always had."""
    crop = record.get("crop", "center")
    return crop if record.get("crop_offset") is None else [crop, record["crop_offset"]]


def text_key(caption: str, identity: dict, settings) -> str:
    return _hash({"v": CACHE_VERSION, "caption": caption, "encoder": identity["text_encoder"],
                  "encoder_id": identity["text_encoder_id"], "tokens": MAX_TEXT_TOKENS,
                  "dim": identity["caption_channels"], "dtype": settings.latent_dtype})


def entry_key(lkey: str, tkey: str) -> str:
    return _hash({"latents": lkey, "text": tkey})


def _seed(key: str, salt: int = 0) -> int:
    return (int(key[:15], 16) + salt) % (1 << 62)


# ---------------------------------------------------------------------------------------------
# files: checks, manifest, lock
# ---------------------------------------------------------------------------------------------
def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete safetensors file (header length, JSON, data extent), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size < 8:
        return f"{size} bytes: shorter than a safetensors header"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"header of {n} bytes runs past the end of the {size}-byte file (truncated)"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"tensor data ends at byte {8 + n + end} but the file has {size} (truncated or appended to)"
    return None


def file_problem(cache_dir: Path, info: dict, full: bool = True) -> Optional[str]:
    """Why a cache file disagrees with its manifest record (size, header, sha256), or None."""
    path = cache_dir / info["file"]
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size < info["bytes"]:
        return f"truncated: {size} of {info['bytes']} bytes"
    if size != info["bytes"]:
        return f"{size} bytes, the manifest says {info['bytes']}"
    bad = safetensors_problem(path)
    if bad:
        return bad
    if full and sha256_file(path) != info["sha256"]:
        return "sha256 differs from the manifest (corrupted)"
    return None


def _manifest_path(run_dir) -> Path:
    return Path(run_dir) / "cache" / "manifest.json"


def read_manifest(run_dir) -> Optional[dict]:
    p = _manifest_path(run_dir)
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CacheError(f"{p} is damaged ({e}); re-run 02_cache (it starts the cache afresh)") from None
    if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
        raise CacheError(f"{p} is a cache of another format/version ({m.get('format')!r} v{m.get('version')}, "
                         f"this kit reads {CACHE_FORMAT!r} v{CACHE_VERSION}); re-run 02_cache to rebuild it")
    return m


def _dataset_sha256(run_dir: Path) -> str:
    return sha256_file(run_dir / "dataset.jsonl")


@contextlib.contextmanager
def _build_lock(cache_dir: Path):
    """One build per cache: a lock file holding host and pid; a dead owner's lock is taken over."""
    lock = cache_dir / ".lock"
    with process_lock(lock, lambda owner: CacheError(
            f"{lock}: another cache build (pid {owner.get('pid')} on {owner.get('host')}) is writing this cache. "
            "Wait for it; if it is dead, delete the .lock file.")):
        yield


@contextlib.contextmanager
def _deterministic_cudnn():
    prev = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def _elem(dtype: str) -> int:
    return torch.tensor([], dtype=_DTYPES[dtype]).element_size()


def record_latent_bytes(record: dict, dtype: str) -> int:
    t = 1 + (int(record["num_frames"]) - 1) // 4
    plane = 16 * (int(record["height"]) // 8) * (int(record["width"]) // 8) * _elem(dtype)
    return plane * t + (plane if record.get("condition_image") else 0)


def caption_bytes(tokens: Optional[int], text_dim: int, dtype: str) -> int:
    return (tokens or MAX_TEXT_TOKENS) * text_dim * _elem(dtype) + MAX_TEXT_TOKENS * 8


def estimate_bytes(records: list[dict], text_dim: int, dtype: str) -> int:
    """Disk bytes of a cache of ``records`` (latent shapes from the records, text from token counts)."""
    total = sum(record_latent_bytes(r, dtype) for r in records)
    captions = {r["caption"]: r.get("caption_tokens") for r in records}
    return total + sum(caption_bytes(n, text_dim, dtype) for n in captions.values()) + caption_bytes(1, text_dim, dtype)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
@dataclass
class CacheResult:
    entries: int = 0  # records in dataset.jsonl
    cached: int = 0  # entries ready for training now
    skipped: int = 0  # entries already valid: nothing encoded
    stale: int = 0  # entries whose inputs (clip, caption, settings, model) changed since the last build
    encoded: int = 0  # latent files encoded in this run
    text_encoded: int = 0  # caption embeddings encoded in this run (the empty negative included)
    damaged: list = field(default_factory=list)  # [{"file", "reason"}]: found damaged; re-made if a record uses it
    failed: list = field(default_factory=list)  # [{"file", "window", "reason"}]: records not cached
    orphans: list = field(default_factory=list)  # [{"file", "kind", "bytes", "about"}]: no record uses them
    removed: list = field(default_factory=list)  # orphan files deleted (remove_orphans)
    temp_removed: int = 0  # temporary files left by a killed build, deleted
    estimated_bytes: int = 0  # before starting: the whole cache of this dataset
    bytes_on_disk: int = 0  # after: files the entries use (orphans not counted)
    orphan_bytes: int = 0
    seconds: float = 0.0

    def table(self) -> dict:
        return {"samples in dataset.jsonl": self.entries, "cached (ready to train)": self.cached,
                "already valid (skipped)": self.skipped, "stale (re-made: input changed)": self.stale,
                "latents encoded now": self.encoded, "captions encoded now": self.text_encoded,
                "damaged files (re-made if used)": len(self.damaged), "failed": len(self.failed),
                "orphans (no record uses them)": len(self.orphans), "orphans removed": len(self.removed),
                "estimated size": _mb(self.estimated_bytes), "size on disk": _mb(self.bytes_on_disk),
                "seconds": round(self.seconds, 1)}


def _check_settings(cs) -> None:
    if cs.text_encoder not in ENCODERS:
        raise CacheError(f"cache.text_encoder={cs.text_encoder!r}: choose one of {list(ENCODERS)}")
    if cs.latent_dtype not in _DTYPES:
        raise CacheError(f"cache.latent_dtype={cs.latent_dtype!r}: choose one of {sorted(_DTYPES)}")
    if cs.posterior not in POSTERIORS:
        raise CacheError(f"cache.posterior={cs.posterior!r}: choose one of {list(POSTERIORS)}")


def _new_manifest(identity: dict, cs, dataset_sha: str) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "encoder": cs.text_encoder, "identity": identity,
            "settings": {"latent_dtype": cs.latent_dtype, "posterior": cs.posterior,
                         "max_text_tokens": MAX_TEXT_TOKENS},
            "dataset_sha256": dataset_sha, "complete": False, "negative": None,
            "entries": {}, "latents": {}, "text": {}, "failed": []}


@dataclass
class _Build:
    """One build's state, handed from step to step (the manifest ``m`` is the one being written)."""
    run_dir: Path
    cfg: object
    cache_dir: Path
    dev: torch.device
    folder: Path
    res: CacheResult
    identity: dict
    m: dict
    log: Callable[[str], None] = print
    progress: Optional[Callable] = None
    manifest: Optional["ManifestWriter"] = None
    plan: list = field(default_factory=list)  # (index, record, latent key, text key, entry key)
    neg_key: str = ""
    text_todo: dict = field(default_factory=dict)  # text key -> caption
    latent_todo: dict = field(default_factory=dict)  # latent key -> (index, record)

    @property
    def cs(self):
        return self.cfg.cache

    def add_ready_entries(self) -> None:
        for i, r, lk, tk, ek in self.plan:
            if ek not in self.m["entries"] and lk in self.m["latents"] and tk in self.m["text"]:
                self.m["entries"][ek] = _entry(i, r, lk, tk, self.m["latents"][lk])

    def file_added(self) -> None:
        self.add_ready_entries()
        self.manifest.added()


def build_cache(run_dir, progress: Optional[Callable] = None, log: Callable[[str], None] = print,
                device: Optional[str] = None, remove_orphans: Optional[bool] = None) -> CacheResult:
    """Encode every record of ``run_dir/dataset.jsonl`` that is not validly cached yet.

    Settings come from ``run_dir/config.json`` (``model`` and ``cache`` sections); ``remove_orphans``
    overrides ``cache.remove_orphans``. Text encoder first (loaded, used, freed), then the VAE.
    """
    from .cache_encode import _encode_clips, _encode_texts
    from .cache_manifest import ManifestWriter
    from .envinfo import configure_allocator
    from .model_files import pick_device, resolve_checkpoint
    from .data.scan import require_samples

    t0 = time.time()
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    cs = cfg.cache
    _check_settings(cs)
    records = require_samples(run_dir)  # before any model: an empty dataset names 01's problems
    drop_orphans = cs.remove_orphans if remove_orphans is None else remove_orphans
    folder = resolve_checkpoint(cfg.model.checkpoint)
    dev = pick_device(device or cfg.model.device)
    configure_allocator()
    cache_dir = run_dir / "cache"
    for sub in ("latents", "text"):
        (cache_dir / sub).mkdir(parents=True, exist_ok=True)
    res = CacheResult(entries=len(records))

    with _build_lock(cache_dir):
        res.temp_removed = _remove_temp_files(cache_dir)
        old = _read_previous_manifest(run_dir, log)
        identity = model_identity(folder, cs)
        b = _Build(run_dir, cfg, cache_dir, dev, folder, res, identity,
                   _new_manifest(identity, cs, _dataset_sha256(run_dir)), log, progress)
        _keep_known_files(b, old)
        _plan_entries(b, records, old)
        _check_disk_space(b, records)
        b.manifest = ManifestWriter(run_dir, b.m)
        b.add_ready_entries()
        b.manifest.flush()
        _encode_texts(b)  # the text encoder is loaded, used and freed before the VAE comes in
        _encode_clips(b)  # the VAE only now, and only if something needs encoding
        used = _drop_or_report_orphans(b, drop_orphans)
        b.m["complete"] = True
        b.m["built"] = {"seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        b.manifest.flush()
    _totals(b, used, t0)
    return res


def _read_previous_manifest(run_dir: Path, log: Callable[[str], None]) -> Optional[dict]:
    try:
        return read_manifest(run_dir)
    except CacheError as e:
        log(f"{e}; starting afresh (existing files are re-checked by key)")
        return None


def _keep_known_files(b: _Build, old: Optional[dict]) -> None:
    """Every known file stays in the tables (orphans too, so a later run can adopt or remove them),
    except ones found damaged, which are re-made or dropped."""
    if old is not None and old.get("encoder") != b.cs.text_encoder:
        b.log(f"text encoder changed from {old.get('encoder')!r} to {b.cs.text_encoder!r}: every caption is "
              "re-encoded (latents are kept); the old embeddings become orphans")
    for table in ("latents", "text"):
        for k, info in ((old or {}).get(table) or {}).items():
            bad = file_problem(b.cache_dir, info)
            if bad is None:
                b.m[table][k] = info
            else:  # dropped from the table: re-made below if a record needs it
                b.res.damaged.append({"file": str(b.cache_dir / info["file"]), "reason": bad})


def _plan_entries(b: _Build, records: list[dict], old: Optional[dict]) -> None:
    """The keys of every record, and what is missing: captions (the empty negative too) and clips."""
    cs, m, res = b.cs, b.m, b.res
    memo: dict = {}
    for i, r in enumerate(records):
        try:
            lk = latent_key(r, b.identity, cs, memo)
        except FileNotFoundError as e:
            res.failed.append({"file": r.get("file"), "window": r.get("window", 0),
                               "reason": f"source missing: {e.filename} (re-run 01_dataset or restore the file)"})
            continue
        tk = text_key(r["caption"], b.identity, cs)
        b.plan.append((i, r, lk, tk, entry_key(lk, tk)))
    old_by_sample = {(e["source"], e.get("window", 0)): k for k, e in ((old or {}).get("entries") or {}).items()}
    b.neg_key = text_key("", b.identity, cs)
    b.text_todo = {tk: r["caption"] for _, r, _, tk, _ in b.plan if tk not in m["text"]}
    if b.neg_key not in m["text"]:
        b.text_todo[b.neg_key] = ""
    for i, r, lk, tk, ek in b.plan:
        if lk not in m["latents"]:
            b.latent_todo.setdefault(lk, (i, r))
        if lk in m["latents"] and tk in m["text"]:
            res.skipped += 1
        else:
            prev = old_by_sample.get((r["file"], r.get("window", 0)))
            res.stale += prev is not None and prev != ek
    m["negative"] = b.neg_key


def _check_disk_space(b: _Build, records: list[dict]) -> None:
    dtype, text_dim = b.cs.latent_dtype, b.identity["text_dim"]
    b.res.estimated_bytes = estimate_bytes(records, text_dim, dtype)
    todo_bytes = sum(record_latent_bytes(r, dtype) for _, r in b.latent_todo.values()) + \
        sum(caption_bytes(None, text_dim, dtype) for _ in b.text_todo)
    free = shutil.disk_usage(b.cache_dir).free
    b.log(f"cache: {len(b.plan)} samples, estimated {_mb(b.res.estimated_bytes)} in all; to encode now: "
          f"{len(b.latent_todo)} clip(s), {len(b.text_todo)} caption(s), up to {_mb(todo_bytes)} "
          f"({_mb(free)} free on {b.cache_dir})")
    if todo_bytes > free:
        raise CacheError(f"{b.cache_dir}: needs up to {_mb(todo_bytes)} but only {_mb(free)} is free; free "
                         "space or put the run folder on a larger disk")


def _drop_or_report_orphans(b: _Build, drop: bool) -> tuple[set, set]:
    """Files no entry uses: listed in the result, or deleted with ``drop``. Returns the used keys."""
    m, res = b.m, b.res
    m["failed"] = res.failed
    used = {e["latents"] for e in m["entries"].values()}, {e["text"] for e in m["entries"].values()} | {b.neg_key}
    res.orphans = _find_orphans(b.cache_dir, m, used)
    if drop:
        for o in res.orphans:
            (b.cache_dir / o["file"]).unlink(missing_ok=True)
            if o["kind"] in ("latents", "text"):
                del m[o["kind"]][o["key"]]
            res.removed.append(o["file"])
        res.orphans = []
    return used


def _totals(b: _Build, used: tuple[set, set], t0: float) -> None:
    m, res = b.m, b.res
    res.cached = len(m["entries"])
    res.bytes_on_disk = sum(m["latents"][k]["bytes"] for k in used[0] if k in m["latents"]) + \
        sum(m["text"][k]["bytes"] for k in used[1] if k in m["text"])
    res.orphan_bytes = sum(o["bytes"] for o in res.orphans)
    res.seconds = time.time() - t0
    b.log(f"cache: {res.cached}/{res.entries} samples ready, {_mb(res.bytes_on_disk)} on disk "
          f"(estimated {_mb(res.estimated_bytes)}); {res.encoded} clip(s) and {res.text_encoded} caption(s) "
          f"encoded in {res.seconds:.1f}s" + (f"; {len(res.failed)} failed" if res.failed else "")
          + (f"; {len(res.orphans)} orphan file(s), {_mb(res.orphan_bytes)} (remove_orphans=True deletes them)"
             if res.orphans else ""))


def _meta(**fields) -> dict:
    # One metadata key holding sorted JSON: safetensors writes several keys in hash-map order, which
    # differs between processes and would make identical caches differ in their bytes.
    return {"longcat_nb": json.dumps(fields, sort_keys=True)}


def _entry(index: int, record: dict, lk: str, tk: str, linfo: dict) -> dict:
    return {"index": index, "latents": lk, "text": tk, "source": record["file"], "window": record.get("window", 0),
            "caption": record["caption"], "bucket": record["bucket"],
            "num_cond_latents": 1 if linfo.get("cond_shape") else 0, "latent_shape": linfo["shape"],
            "record": record}


def _file_info(cache_dir: Path, rel: str) -> dict:
    path = cache_dir / rel
    return {"file": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _remove_temp_files(cache_dir: Path) -> int:
    """Temporary files of a killed build (``.name.XXXX.tmp``); safe to delete under the build lock."""
    n = 0
    for p in [*cache_dir.glob(".*.tmp"), *cache_dir.glob("latents/.*.tmp"), *cache_dir.glob("text/.*.tmp")]:
        p.unlink(missing_ok=True)
        n += 1
    return n


def _find_orphans(cache_dir: Path, m: dict, used: tuple[set, set]) -> list[dict]:
    out = []
    for kind, keys in (("latents", used[0]), ("text", used[1])):
        for k, info in sorted(m[kind].items()):
            if k not in keys:
                about = info.get("source") if kind == "latents" else repr(info.get("caption", ""))[:60]
                out.append({"file": info["file"], "kind": kind, "key": k, "bytes": info["bytes"], "about": about})
        known = {info["file"] for info in m[kind].values()}
        for p in sorted((cache_dir / kind).glob("*.safetensors")):
            rel = f"{kind}/{p.name}"
            if rel not in known:  # e.g. written by a build killed before its manifest update
                out.append({"file": rel, "kind": "untracked", "key": p.stem, "bytes": p.stat().st_size,
                            "about": "not in the manifest"})
    return out



# The encoders and the reading side live in their own modules (which import this one); their names
# stay importable from here, looked up on first use.
_MOVED = {"cache_encode": ("_load_text_encoder", "_qwen_encoder", "encode_latents", "encode_record"),
          "cache_read": ("CachedDataset", "_load_checked", "_text_tensors", "cache_summary", "check_manifest",
                         "decode_check", "load_negative", "no_entries_cause")}


def __getattr__(name: str):
    import importlib

    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
