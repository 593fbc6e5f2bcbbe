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
from typing import Callable, Optional

import torch

from .config import load_config
from .io import atomic_save_safetensors, process_lock, sha256_file

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
    from .checkpoint import check_checkpoint

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
    return _hash({
        "v": CACHE_VERSION, "src": source_identity(record["file"], memo), "kind": record.get("kind", "video"),
        "cond": source_identity(cond, memo) if cond else None, "frames": record.get("frame_indices"),
        "bucket": record["bucket"], "size": [record["num_frames"], record["height"], record["width"]],
        "crop": _crop_identity(record), "vae": identity["vae"], "dtype": settings.latent_dtype,
        "posterior": settings.posterior,
    })


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


def build_cache(run_dir, progress: Optional[Callable] = None, log: Callable[[str], None] = print,
                device: Optional[str] = None, remove_orphans: Optional[bool] = None) -> CacheResult:
    """Encode every record of ``run_dir/dataset.jsonl`` that is not validly cached yet.

    Settings come from ``run_dir/config.json`` (``model`` and ``cache`` sections); ``remove_orphans``
    overrides ``cache.remove_orphans``. Text encoder first (loaded, used, freed), then the VAE.
    """
    from .cache_manifest import ManifestWriter
    from .checkpoint import pick_device, resolve_checkpoint
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
    cache_dir = run_dir / "cache"
    for sub in ("latents", "text"):
        (cache_dir / sub).mkdir(parents=True, exist_ok=True)
    res = CacheResult(entries=len(records))

    with _build_lock(cache_dir):
        res.temp_removed = _remove_temp_files(cache_dir)
        try:
            old = read_manifest(run_dir)
        except CacheError as e:
            log(f"{e}; starting afresh (existing files are re-checked by key)")
            old = None
        identity = model_identity(folder, cs)
        m = _new_manifest(identity, cs, _dataset_sha256(run_dir))
        if old is not None and old.get("encoder") != cs.text_encoder:
            log(f"text encoder changed from {old.get('encoder')!r} to {cs.text_encoder!r}: every caption is "
                "re-encoded (latents are kept); the old embeddings become orphans")
        # Every known file stays in the tables (orphans too, so a later run can adopt or remove them),
        # except ones found damaged, which are re-made or dropped.
        for table in ("latents", "text"):
            for k, info in ((old or {}).get(table) or {}).items():
                bad = file_problem(cache_dir, info)
                if bad is None:
                    m[table][k] = info
                else:  # dropped from the table: re-made below if a record needs it
                    res.damaged.append({"file": str(cache_dir / info["file"]), "reason": bad})

        # -- plan ---------------------------------------------------------------------------------
        plan = []  # (index, record, latent key, text key, entry key)
        memo: dict = {}
        for i, r in enumerate(records):
            try:
                lk = latent_key(r, identity, cs, memo)
            except FileNotFoundError as e:
                res.failed.append({"file": r.get("file"), "window": r.get("window", 0),
                                   "reason": f"source missing: {e.filename} (re-run 01_dataset or restore the file)"})
                continue
            tk = text_key(r["caption"], identity, cs)
            plan.append((i, r, lk, tk, entry_key(lk, tk)))
        old_by_sample = {(e["source"], e.get("window", 0)): k for k, e in ((old or {}).get("entries") or {}).items()}
        neg_key = text_key("", identity, cs)
        text_todo = {tk: r["caption"] for _, r, _, tk, _ in plan if tk not in m["text"]}
        if neg_key not in m["text"]:
            text_todo[neg_key] = ""
        latent_todo = {}
        for i, r, lk, tk, ek in plan:
            if lk not in m["latents"]:
                latent_todo.setdefault(lk, (i, r))
            if lk in m["latents"] and tk in m["text"]:
                res.skipped += 1
            else:
                prev = old_by_sample.get((r["file"], r.get("window", 0)))
                res.stale += prev is not None and prev != ek
        m["negative"] = neg_key

        res.estimated_bytes = estimate_bytes(records, identity["text_dim"], cs.latent_dtype)
        todo_bytes = sum(record_latent_bytes(r, cs.latent_dtype) for _, r in latent_todo.values()) + \
            sum(caption_bytes(None, identity["text_dim"], cs.latent_dtype) for _ in text_todo)
        free = shutil.disk_usage(cache_dir).free
        log(f"cache: {len(plan)} samples, estimated {_mb(res.estimated_bytes)} in all; to encode now: "
            f"{len(latent_todo)} clip(s), {len(text_todo)} caption(s), up to {_mb(todo_bytes)} "
            f"({_mb(free)} free on {cache_dir})")
        if todo_bytes > free:
            raise CacheError(f"{cache_dir}: needs up to {_mb(todo_bytes)} but only {_mb(free)} is free; free "
                             "space or put the run folder on a larger disk")

        def add_ready_entries():
            for i, r, lk, tk, ek in plan:
                if ek not in m["entries"] and lk in m["latents"] and tk in m["text"]:
                    m["entries"][ek] = _entry(i, r, lk, tk, m["latents"][lk])

        manifest = ManifestWriter(run_dir, m)
        add_ready_entries()
        manifest.flush()

        # -- phase 1: text (encoder loaded, used, freed before the VAE comes in) -------------------
        if text_todo:
            encode = _load_text_encoder(cfg, cs, folder, dev, identity)
            bar = progress(total=len(text_todo), desc="text embeddings", unit="caption") if progress else None
            try:
                for tk, caption in text_todo.items():
                    emb, mask = encode(caption)  # [L, C], [L]
                    rel = f"text/{tk}.safetensors"
                    atomic_save_safetensors(cache_dir / rel, {
                        "text_embeds": emb[mask.bool()][None].to(_DTYPES[cs.latent_dtype]).contiguous(),
                        "text_mask": mask.to(torch.int64)}, metadata=_meta(key=tk, kind="text"))
                    m["text"][tk] = {**_file_info(cache_dir, rel), "caption": caption, "tokens": int(mask.sum())}
                    res.text_encoded += 1
                    add_ready_entries()
                    manifest.added()
                    if bar is not None:
                        bar.update(1)
            finally:
                manifest.flush(only_pending=True)  # an error or interrupt keeps every finished file
                if bar is not None:
                    bar.close()
                del encode
                _free(dev)

        # -- phase 2: latents (the VAE only now, and only if something needs encoding) --------------
        if latent_todo:
            from .checkpoint import load_vae
            from .vae import set_tiling

            vae = load_vae(folder, dev, cfg.model.vae_dtype)
            set_tiling(vae, cs.vae_tiling)
            vae_dtype = str(next(vae.parameters()).dtype).replace("torch.", "")
            frames_total = sum(int(r["num_frames"]) for _, r in latent_todo.values())
            bar = progress(total=frames_total, desc="latents", unit="frame") if progress else None
            try:
                with _deterministic_cudnn():
                    for lk, (i, r) in latent_todo.items():
                        try:
                            tensors = encode_record(vae, r, lk, cs.posterior)
                        except torch.OutOfMemoryError:
                            raise CacheError(
                                f"out of GPU memory encoding {r['file']} ({r['bucket']}): set vae_tiling=True "
                                "(or a smaller resolution/num_frames in 01_dataset) and re-run; finished "
                                "entries are kept") from None
                        except Exception as e:  # one bad clip must not lose the others
                            res.failed.append({"file": r["file"], "window": r.get("window", 0),
                                               "reason": f"{type(e).__name__}: {e}"[:300]})
                            continue
                        rel = f"latents/{lk}.safetensors"
                        stored = {n: t.to(_DTYPES[cs.latent_dtype]) for n, t in tensors.items()}
                        atomic_save_safetensors(cache_dir / rel, stored,
                                                metadata=_meta(key=lk, kind="latents", source=str(r["file"])))
                        m["latents"][lk] = {
                            **_file_info(cache_dir, rel), "source": r["file"], "window": r.get("window", 0),
                            "shape": list(tensors["latents"].shape),
                            "cond_shape": list(tensors["cond_latents"].shape) if "cond_latents" in tensors else None,
                            "seed": _seed(lk) if cs.posterior == "sample" else None,
                            "computed": {"device": dev.type, "vae_dtype": vae_dtype, "vae_tiling": cs.vae_tiling},
                        }
                        res.encoded += 1
                        add_ready_entries()
                        manifest.added()
                        if bar is not None:
                            bar.update(int(r["num_frames"]))
                            bar.set_postfix(clip=Path(r["file"]).name[:24], refresh=False)
            finally:
                manifest.flush(only_pending=True)
                if bar is not None:
                    bar.close()
                del vae
                _free(dev)

        # -- orphans, totals --------------------------------------------------------------------------
        m["failed"] = res.failed
        used = {e["latents"] for e in m["entries"].values()}, {e["text"] for e in m["entries"].values()} | {neg_key}
        res.orphans = _find_orphans(cache_dir, m, used)
        if drop_orphans:
            for o in res.orphans:
                (cache_dir / o["file"]).unlink(missing_ok=True)
                if o["kind"] in ("latents", "text"):
                    del m[o["kind"]][o["key"]]
                res.removed.append(o["file"])
            res.orphans = []
        m["complete"] = True
        m["built"] = {"seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        manifest.flush()
    res.cached = len(m["entries"])
    res.bytes_on_disk = sum(m["latents"][k]["bytes"] for k in used[0] if k in m["latents"]) + \
        sum(m["text"][k]["bytes"] for k in used[1] if k in m["text"])
    res.orphan_bytes = sum(o["bytes"] for o in res.orphans)
    res.seconds = time.time() - t0
    log(f"cache: {res.cached}/{res.entries} samples ready, {_mb(res.bytes_on_disk)} on disk "
        f"(estimated {_mb(res.estimated_bytes)}); {res.encoded} clip(s) and {res.text_encoded} caption(s) "
        f"encoded in {res.seconds:.1f}s" + (f"; {len(res.failed)} failed" if res.failed else "")
        + (f"; {len(res.orphans)} orphan file(s), {_mb(res.orphan_bytes)} (remove_orphans=True deletes them)"
           if res.orphans else ""))
    return res


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


# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------
def _load_text_encoder(cfg, cs, folder: Path, dev: torch.device, identity: dict) -> Callable:
    """Returns encode(caption) -> (embeddings [L, C] float, mask [L] int64), L = 512."""
    from .checkpoint import load_text_encoder, load_tokenizer, pick_dtype
    from .text import encode_prompts

    if cs.text_encoder == "umt5":
        tok = load_tokenizer(folder)
        enc = load_text_encoder(folder, dev, cfg.model.text_encoder_dtype)

        def encode(caption: str):
            emb, mask = encode_prompts(tok, enc, [caption], max_length=MAX_TEXT_TOKENS)
            return emb[0, 0].float().cpu(), mask[0].cpu()

        return encode
    return _qwen_encoder(identity["text_encoder_source"], dev, pick_dtype(cfg.model.text_encoder_dtype, dev),
                         identity["caption_channels"])


def _qwen_encoder(source: str, dev: torch.device, dtype: torch.dtype, width: int) -> Callable:
    """SimpleTuner's LongCat-Video text path, kept as a named alternative: Qwen2.5-VL-7B, 512 tokens, no
    chat template and no prompt cleaning, ``hidden_states[-1]`` (3584-d) zero-padded to the DiT's
    caption width (4096). The checkpoint's caption projection was trained on UMT5 features, so these
    are out of distribution for it (spec §6); use only to match a SimpleTuner-trained setup."""
    try:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    except ImportError as e:
        raise CacheError("text_encoder='qwen2.5-vl' needs transformers with Qwen2.5-VL (>= 4.49)") from e
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype)
    except Exception as e:
        raise CacheError(f"could not load Qwen2.5-VL from {source!r} ({type(e).__name__}: {e}). Download it "
                         f"(`hf download {QWEN_DEFAULT} --local-dir DIR`) and set cache.qwen_path=DIR, or use "
                         "text_encoder='umt5' (the checkpoint's own encoder)") from None
    model = model.to(dev).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(caption: str):
        t = tok([caption], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
        out = model(input_ids=t.input_ids.to(dev), attention_mask=t.attention_mask.to(dev), output_hidden_states=True)
        h = out.hidden_states[-1][0].float().cpu()
        if h.shape[-1] > width:
            raise CacheError(f"Qwen hidden size {h.shape[-1]} exceeds the DiT's caption_channels={width}")
        return torch.nn.functional.pad(h, (0, width - h.shape[-1])), t.attention_mask[0].to(torch.int64)

    return encode


def encode_record(vae, record: dict, lkey: str, posterior: str = "sample") -> dict:
    """One record's latents: the clip as trained, plus the conditioning image for I2V records.

    ``latents`` is the whole clip encoded as one video, so its frame 0 is the causal VAE's encoding of
    pixel frame 0 alone. ``cond_latents`` is the conditioning image encoded as a 1-frame video (as the
    I2V pipeline encodes its input image), with its own posterior draw.
    """
    from .data.video import load_condition_image, load_sample_frames
    from .vae import from_uint8_frames

    out = {"latents": encode_latents(vae, from_uint8_frames(load_sample_frames(record)), _seed(lkey), posterior)[0]}
    img = load_condition_image(record)
    if img is not None:
        out["cond_latents"] = encode_latents(vae, from_uint8_frames(img), _seed(lkey, 1), posterior)[0]
    return {k: v.cpu() for k, v in out.items()}


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor, seed: int, posterior: str = "sample") -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, 16, T, H/8, W/8] float32.

    The posterior noise is drawn in float32 on the CPU from ``seed``, so every device and VAE dtype
    draws the same noise and a re-run draws it again exactly.
    """
    from .vae import check_num_frames, normalize_latents

    check_num_frames(video.shape[2], "frames")
    param = next(vae.parameters())
    dist = vae.encode(video.to(param.device, param.dtype)).latent_dist
    if posterior == "mode":
        z = dist.mode().float()
    else:
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        z = dist.mean.float() + dist.std.float() * noise.to(dist.mean.device)
    return normalize_latents(vae, z)


# ---------------------------------------------------------------------------------------------
# reading, for the trainer
# ---------------------------------------------------------------------------------------------
def _load_checked(cache_dir: Path, info: dict, verify: bool) -> dict:
    """Read a cache file; its sha256 is checked against the manifest on the same bytes that are loaded."""
    from safetensors.torch import load

    path = cache_dir / info["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: re-run 02_cache (it re-makes missing entries)") from None
    if len(data) != info["bytes"] or (verify and hashlib.sha256(data).hexdigest() != info["sha256"]):
        why = f"{len(data)} bytes, expected {info['bytes']}" if len(data) != info["bytes"] else \
            "sha256 mismatch with the manifest"
        raise CacheError(f"{path} is damaged ({why}): re-run 02_cache to re-make it")
    try:
        return load(data)
    except Exception as e:
        raise CacheError(f"{path} cannot be read ({e}): re-run 02_cache to re-make it") from None


def _text_tensors(t: dict, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = t["text_mask"].to(torch.int64)
    emb = t["text_embeds"]
    full = torch.zeros(1, mask.shape[0], emb.shape[-1], dtype=dtype or emb.dtype)
    full[0, mask.bool()] = emb[0].to(full.dtype)
    return full, mask


class CachedDataset:
    """The cached samples of a run, in dataset.jsonl order.

    ``ds[i]`` is a dict:

    * ``latents`` [16, T, h, w]: the clip's normalized VAE latents (``dtype``, float32 by default).
      For I2V records too this is the whole clip as the VAE sees it: frame 0 is the encoding of the
      clip's own first pixel frame (the causal VAE encodes it alone).
    * ``cond_latents`` [16, 1, h, w] or None: the conditioning image (resized/cropped to the bucket)
      encoded as a 1-frame video, normalized, with its own posterior draw. None for T2V records.
    * ``num_cond_latents``: 1 when ``cond_latents`` is given, else 0. To train I2V as the pipeline
      samples it, use ``x0 = cat([cond_latents, latents[:, 1:]], dim=1)``, t = 0 on frame 0 and the
      loss on frames 1.. (``train.collate`` does this); ``latents`` alone is the T2V target.
    * ``text_embeds`` [1, 512, C] (C = the DiT's caption_channels; zeros where the mask is 0) and
      ``text_mask`` [512] int64: what the DiT takes as encoder_hidden_states / encoder_attention_mask
      once batched.
    * ``bucket`` (e.g. "480x832x93"), ``key`` (entry key), ``caption``, ``source`` (the clip's path).

    Opening checks the manifest against ``config.json`` (encoder, stored dtype, posterior, model
    identity), that dataset.jsonl has not changed since the build and that the build finished, and
    every file's safetensors header and size (``check_hashes``: its sha256 too); each item's sha256 is
    checked as it is read.
    """

    def __init__(self, run_dir, dtype: Optional[torch.dtype] = torch.float32, verify: bool = True,
                 check_settings: bool = True, allow_partial: bool = False, check_hashes: bool = False):
        from .cache_manifest import verify_cache

        self.run_dir = Path(run_dir)
        self.cache_dir = self.run_dir / "cache"
        self.dtype, self.verify = dtype, verify
        m = read_manifest(self.run_dir)
        if m is None:
            raise CacheError(f"{_manifest_path(self.run_dir)} does not exist: run 02_cache first")
        if check_settings:
            check_manifest(self.run_dir, m)
        if not m.get("complete") and not allow_partial:
            raise CacheError(f"the cache build in {self.cache_dir} did not finish ({len(m['entries'])} entries so far): "
                             "re-run 02_cache to resume it")
        self.manifest = m
        self.keys = sorted(m["entries"], key=lambda k: (m["entries"][k]["index"], k))
        verify_cache(self.run_dir, full=check_hashes, m=m)

    def __len__(self) -> int:
        return len(self.keys)

    def entry_meta(self, i: int) -> dict:
        """The manifest's entry (no tensors read): bucket, num_cond_latents, latent_shape, record, ..."""
        return self.manifest["entries"][self.keys[i]]

    def buckets(self) -> dict[str, list[int]]:
        out: dict = {}
        for i, k in enumerate(self.keys):
            out.setdefault(self.manifest["entries"][k]["bucket"], []).append(i)
        return out

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} cached samples")
        key = self.keys[i]
        e = self.manifest["entries"][key]
        lat = _load_checked(self.cache_dir, self.manifest["latents"][e["latents"]], self.verify)
        emb, mask = _text_tensors(_load_checked(self.cache_dir, self.manifest["text"][e["text"]], self.verify), self.dtype)

        def cast(t):
            return t if self.dtype is None else t.to(self.dtype)

        return {"latents": cast(lat["latents"]),
                "cond_latents": cast(lat["cond_latents"]) if "cond_latents" in lat else None,
                "num_cond_latents": int(e["num_cond_latents"]), "text_embeds": emb, "text_mask": mask,
                "bucket": e["bucket"], "key": key, "caption": e["caption"], "source": e["source"]}


def check_manifest(run_dir, m: dict) -> None:
    """Refuse a cache that does not match the run's settings (never mix encoders, dtypes or models)."""
    from .checkpoint import resolve_checkpoint

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    cs = cfg.cache
    where = run_dir / "cache"
    if m["encoder"] != cs.text_encoder:
        raise CacheError(f"the cache in {where} was built with text encoder {m['encoder']!r} but "
                         f"{run_dir / 'config.json'} sets cache.text_encoder={cs.text_encoder!r}; the two are never "
                         f"mixed: re-run 02_cache with text_encoder={cs.text_encoder!r}, or set it back to "
                         f"{m['encoder']!r}")
    for name in ("latent_dtype", "posterior"):
        if m["settings"][name] != getattr(cs, name):
            raise CacheError(f"the cache in {where} holds {name}={m['settings'][name]!r} but config.json sets "
                             f"cache.{name}={getattr(cs, name)!r}: re-run 02_cache, or set it back")
    ident = model_identity(resolve_checkpoint(cfg.model.checkpoint), cs)
    for name in ("vae", "text_encoder_id", "caption_channels"):
        if m["identity"][name] != ident[name]:
            raise CacheError(f"the cache in {where} was made with another model ({name} {m['identity'][name]} from "
                             f"{m['identity']['checkpoint']}; model.checkpoint={cfg.model.checkpoint!r} has "
                             f"{ident[name]}): re-run 02_cache")
    ds = run_dir / "dataset.jsonl"
    if ds.exists() and _dataset_sha256(run_dir) != m.get("dataset_sha256"):
        raise CacheError(f"{ds} changed after the cache was built: re-run 02_cache (it encodes only what changed)")


def load_negative(run_dir, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's embedding ([1, 512, C], stored dtype unless ``dtype``) and mask [512], for
    caption dropout (encoded exactly like a caption: one EOS token + padding)."""
    m = read_manifest(run_dir)
    if m is None or not m.get("negative") or m["negative"] not in m["text"]:
        raise CacheError(f"no cached negative prompt in {Path(run_dir) / 'cache'}: run 02_cache")
    return _text_tensors(_load_checked(Path(run_dir) / "cache", m["text"][m["negative"]], True), dtype)


def no_entries_cause(run_dir) -> str:
    """Why a run has no cached sample to train on, traced back to the first stage that came up empty."""
    from .data.scan import EmptyDatasetError, require_samples

    run_dir = Path(run_dir)
    try:
        require_samples(run_dir)
    except (EmptyDatasetError, FileNotFoundError) as e:
        return str(e)
    m = read_manifest(run_dir)
    if m is None:
        return f"{_manifest_path(run_dir)} does not exist: run 02_cache first"
    failed = m.get("failed") or []
    if failed and not m.get("entries"):
        first = failed[0]
        return (f"{run_dir / 'cache'} holds no entries: every sample failed to encode in 02_cache ({len(failed)}; "
                f"first: {first.get('file')}: {first.get('reason')}); fix them and re-run 02_cache")
    return f"{run_dir / 'cache'} holds no entries: run 02_cache first"


def cache_summary(run_dir) -> list[dict]:
    """One row per bucket (entries, I2V entries, latent shape, size) and a total row, for a table."""
    m = read_manifest(run_dir)
    if m is None:
        return []
    rows: dict = {}
    for e in sorted(m["entries"].values(), key=lambda e: e["index"]):
        r = rows.setdefault(e["bucket"], {"bucket": e["bucket"], "entries": 0, "i2v": 0,
                                          "latent_shape": "x".join(map(str, e["latent_shape"])), "latents_MB": 0.0})
        r["entries"] += 1
        r["i2v"] += e["num_cond_latents"]
        r["latents_MB"] += m["latents"].get(e["latents"], {}).get("bytes", 0) / 1e6
    out = [dict(r, latents_MB=round(r["latents_MB"], 2)) for r in rows.values()]
    used_text = {e["text"] for e in m["entries"].values()} | {m.get("negative")}
    out.append({"bucket": "total", "entries": len(m["entries"]), "i2v": sum(r["i2v"] for r in out), "latent_shape": "",
                "latents_MB": round(sum(r["latents_MB"] for r in out), 2), "captions": len(used_text),
                "text_MB": round(sum(m["text"][k]["bytes"] for k in used_text if k in m["text"]) / 1e6, 2),
                "failed": len(m.get("failed") or []), "encoder": m["encoder"], "complete": m.get("complete", False)})
    return out


def decode_check(run_dir, index: int = 0, device: Optional[str] = None) -> dict:
    """Decode one cached entry back through the VAE next to its source frames (as trained).

    Returns ``source`` and ``decoded`` uint8 [F, H, W, 3], their mean absolute difference and PSNR,
    and for I2V entries ``cond_source`` / ``cond_decoded`` [1, H, W, 3]."""
    import numpy as np

    from .checkpoint import load_vae, pick_device, resolve_checkpoint
    from .data.video import load_condition_image, load_sample_frames
    from .vae import decode_latents, set_tiling, to_uint8_frames

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    ds = CachedDataset(run_dir, check_settings=False, allow_partial=True)
    if len(ds) == 0:
        raise CacheError(no_entries_cause(run_dir))
    item, meta = ds[index], ds.entry_meta(index)
    dev = pick_device(device or cfg.model.device)
    vae = load_vae(resolve_checkpoint(cfg.model.checkpoint), dev, cfg.model.vae_dtype)
    set_tiling(vae, cfg.cache.vae_tiling)
    try:
        out = {"decoded": to_uint8_frames(decode_latents(vae, item["latents"][None]))[0],
               "source": load_sample_frames(meta["record"])}
        if item["cond_latents"] is not None:
            out["cond_decoded"] = to_uint8_frames(decode_latents(vae, item["cond_latents"][None]))[0]
            out["cond_source"] = load_condition_image(meta["record"])
    finally:
        del vae
        _free(dev)
    diff = out["decoded"].astype(np.float64) - out["source"].astype(np.float64)
    mse = float((diff ** 2).mean())
    out.update(mae=float(np.abs(diff).mean()), psnr_db=float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10))),
               caption=item["caption"], key=item["key"], bucket=item["bucket"], file=item["source"])
    return out
