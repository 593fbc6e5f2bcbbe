"""The cache: VAE latents and text embeddings on disk, so training never runs the VAE or UMT5-XXL.

Layout under ``run_dir/cache/``::

    manifest.json                 identity of the cache + one entry per dataset.jsonl record
    text/<caption-hash>.safetensors   text_embeds [1, L, C], text_mask [L] (shared by equal captions)
    text/negative.safetensors         the empty prompt, for caption dropout
    latents/<entry-key>.safetensors   latents [16, T, h, w] (normalized), cond_latents [16, 1, h, w]?

An entry's key hashes everything its tensors depend on: the source file (size, mtime and a content
hash of its first and last MiB), caption, frame indices, bucket, crop, conditioning image, model
identity (VAE and text-encoder configs), stored dtype and encoder. Re-running skips valid entries,
re-makes stale or damaged ones (sha256 of every file is in the manifest), and reports entries no
longer in the dataset (orphans), deleting them only when asked. Files are written atomically and
the manifest after each entry, so a killed run resumes; encoding is seeded per entry, so the resumed
cache equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import load_config
from .io import atomic_save_safetensors, atomic_write_json

CACHE_VERSION = 1
ENCODERS = ("umt5", "qwen2.5-vl")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CacheError(RuntimeError):
    """The cache cannot be used as it is (wrong encoder, damaged file, missing build)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_identity(path: str | os.PathLike) -> dict:
    """Cheap but content-aware: size, mtime, and a hash of the first and last MiB."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def _config_hash(folder: Path) -> str:
    f = folder / "config.json"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else "none"


def model_identity(checkpoint_folder: Path, encoder: str) -> dict:
    return {"checkpoint": str(checkpoint_folder), "vae": _config_hash(checkpoint_folder / "vae"),
            "text_encoder": encoder, "text_encoder_config": _config_hash(checkpoint_folder / "text_encoder")}


def caption_key(caption: str, identity: dict, dtype: str) -> str:
    blob = json.dumps({"caption": caption, "enc": identity["text_encoder"], "cfg": identity["text_encoder_config"],
                       "ckpt": identity["checkpoint"], "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def entry_key(record: dict, identity: dict, dtype: str) -> str:
    src = source_identity(record["file"])
    cond = source_identity(record["condition_image"]) if record.get("condition_image") else None
    blob = json.dumps({
        "v": CACHE_VERSION, "src": src, "cond": cond, "caption": record["caption"],
        "frames": record.get("frame_indices"), "bucket": record["bucket"], "crop": record.get("crop"),
        "identity": identity, "dtype": dtype,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class CacheResult:
    entries: int = 0
    encoded: int = 0
    skipped: int = 0
    remade: int = 0
    failed: list = field(default_factory=list)  # (file, reason)
    orphans: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    bytes_on_disk: int = 0
    estimated_bytes: int = 0
    seconds: float = 0.0


def _manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "cache" / "manifest.json"


def read_manifest(run_dir) -> Optional[dict]:
    p = _manifest_path(Path(run_dir))
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{p} is damaged ({e}); delete it and re-run 02_cache (entries are re-checked)") from None


def _file_ok(path: Path, sha: str) -> bool:
    return path.exists() and _sha256_file(path) == sha


def estimate_bytes(records: list[dict], text_dim: int, dtype: str) -> int:
    per = torch.tensor([], dtype=_DTYPES[dtype]).element_size()
    total = 0
    for r in records:
        t = 1 + (r["num_frames"] - 1) // 4
        lat = 16 * t * (r["height"] // 8) * (r["width"] // 8) * per
        cond = 16 * (r["height"] // 8) * (r["width"] // 8) * per if r.get("condition_image") else 0
        total += lat + cond
    captions = {r["caption"] for r in records}
    return total + (len(captions) + 1) * 512 * text_dim * per


def build_cache(run_dir, progress: Optional[Callable] = None, log: Callable[[str], None] = print,
                stop_after: Optional[int] = None, device: Optional[str] = None) -> CacheResult:
    """Encode every record of ``run_dir/dataset.jsonl`` that is not validly cached yet."""
    from .checkpoint import load_text_encoder, load_tokenizer, load_vae, pick_device, resolve_checkpoint
    from .data.scan import read_dataset_jsonl

    t0 = time.time()
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    cs = cfg.cache
    if cs.text_encoder not in ENCODERS:
        raise CacheError(f"cache.text_encoder={cs.text_encoder!r}: choose one of {ENCODERS}")
    if cs.latent_dtype not in _DTYPES:
        raise CacheError(f"cache.latent_dtype={cs.latent_dtype!r}: choose one of {sorted(_DTYPES)}")
    folder = resolve_checkpoint(cfg.model.checkpoint)
    dev = pick_device(device or cfg.model.device)
    identity = model_identity(folder, cs.text_encoder)
    records = read_dataset_jsonl(run_dir)
    cache_dir = run_dir / "cache"
    (cache_dir / "latents").mkdir(parents=True, exist_ok=True)
    (cache_dir / "text").mkdir(parents=True, exist_ok=True)

    old = read_manifest(run_dir)
    if old is not None and old.get("identity", {}).get("text_encoder") not in (None, cs.text_encoder):
        log(f"cache was built with text encoder {old['identity']['text_encoder']!r}; "
            f"now {cs.text_encoder!r}: every text embedding is re-made")
    manifest = {"version": CACHE_VERSION, "identity": identity, "latent_dtype": cs.latent_dtype,
                "entries": {}, "text": {}, "negative": None}
    old_entries = {**(old or {}).get("orphans", {}), **(old or {}).get("entries", {})}
    old_text = (old or {}).get("text", {})
    res = CacheResult(entries=len(records))

    keys = []
    for r in records:
        try:
            keys.append(entry_key(r, identity, cs.latent_dtype))
        except FileNotFoundError as e:
            keys.append(None)
            res.failed.append((r["file"], f"source missing: {e}"))
    wanted = {k for k in keys if k}
    res.orphans = sorted(k for k in old_entries if k not in wanted)

    # -- phase 1: text (the encoder is loaded, used, freed) -----------------------------------------
    need_text = {}
    for r in records:
        ck = caption_key(r["caption"], identity, cs.latent_dtype)
        prev = old_text.get(ck)
        if prev and _file_ok(cache_dir / prev["file"], prev["sha256"]):
            manifest["text"][ck] = prev
        else:
            need_text[ck] = r["caption"]
    neg_key = caption_key("", identity, cs.latent_dtype)
    prev_neg = (old or {}).get("negative")
    neg_ok = prev_neg and prev_neg.get("key") == neg_key and _file_ok(cache_dir / prev_neg["file"], prev_neg["sha256"])
    if need_text or not neg_ok:
        tok = load_tokenizer(folder)
        enc, encode = _text_encoder(cs.text_encoder, folder, dev, tok, load_text_encoder)
        items = list(need_text.items()) + ([] if neg_ok else [(neg_key, "")])
        it = progress(items, desc="text embeddings", unit="caption") if progress else items
        for ck, caption in it:
            emb, mask = encode([caption])
            rel = "text/negative.safetensors" if ck == neg_key and caption == "" else f"text/{ck}.safetensors"
            path = cache_dir / rel
            atomic_save_safetensors(path, {"text_embeds": emb[0].to(_DTYPES[cs.latent_dtype]).cpu(),
                                           "text_mask": mask[0].cpu()})
            entry = {"file": rel, "sha256": _sha256_file(path), "caption": caption}
            if ck == neg_key and caption == "":
                manifest["negative"] = {**entry, "key": neg_key}
            if caption in need_text.values():
                manifest["text"][ck] = entry
            atomic_write_json(_manifest_path(run_dir), manifest)
        del enc
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    else:
        manifest["negative"] = prev_neg

    # -- phase 2: latents (the VAE is loaded only if something needs encoding) -------------------------
    res.estimated_bytes = estimate_bytes(records, _text_dim(folder, cs.text_encoder), cs.latent_dtype)
    vae = None
    todo = []
    for r, k in zip(records, keys):
        if k is None:
            continue
        prev = old_entries.get(k)
        if prev and _file_ok(cache_dir / prev["file"], prev["sha256"]):
            manifest["entries"][k] = prev
            res.skipped += 1
        else:
            if prev:
                res.remade += 1
            todo.append((r, k))
    atomic_write_json(_manifest_path(run_dir), manifest)
    it = progress(todo, desc="latents", unit="clip") if progress else todo
    for n, (r, k) in enumerate(it):
        if stop_after is not None and n >= stop_after:
            break
        if vae is None:
            vae = load_vae(folder, dev, "float32" if dev.type == "cpu" else "bfloat16")
            from .vae import set_tiling

            set_tiling(vae, cs.vae_tiling)
        try:
            tensors = _encode_entry(vae, r, k, cs.latent_dtype)
        except Exception as e:  # one bad clip must not lose the others
            res.failed.append((r["file"], f"{type(e).__name__}: {e}"))
            continue
        rel = f"latents/{k}.safetensors"
        path = cache_dir / rel
        atomic_save_safetensors(path, tensors)
        ck = caption_key(r["caption"], identity, cs.latent_dtype)
        manifest["entries"][k] = {
            "file": rel, "sha256": _sha256_file(path), "text": ck, "source": r["file"], "caption": r["caption"],
            "bucket": r["bucket"], "num_cond_latents": 1 if "cond_latents" in tensors else 0,
            "shape": list(tensors["latents"].shape), "window": r.get("window", 0),
        }
        atomic_write_json(_manifest_path(run_dir), manifest)
        res.encoded += 1
    if cs.remove_orphans:
        for k in res.orphans:
            f = cache_dir / old_entries[k]["file"]
            if f.exists():
                f.unlink()
            res.removed.append(k)
    else:  # keep orphans listed so a later run can still remove them
        for k in res.orphans:
            manifest.setdefault("orphans", {})[k] = old_entries[k]
    atomic_write_json(_manifest_path(run_dir), manifest)
    del vae
    gc.collect()
    res.bytes_on_disk = sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors"))
    res.seconds = time.time() - t0
    return res


def _text_dim(folder: Path, encoder: str) -> int:
    if encoder == "qwen2.5-vl":
        return 4096
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    return int(cfg.get("d_model", 4096))


def _text_encoder(name: str, folder: Path, dev, tok, load_text_encoder):
    from .text import encode_prompts

    if name == "umt5":
        enc = load_text_encoder(folder, dev, "float32" if dev.type == "cpu" else "bfloat16")
        return enc, lambda prompts: encode_prompts(tok, enc, prompts)
    # SimpleTuner's choice, kept as a named alternative: Qwen2.5-VL-7B hidden states zero-padded from
    # 3584 to 4096. The checkpoint's caption projection was trained on UMT5, so expect worse results.
    try:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    except ImportError as e:
        raise CacheError("text_encoder='qwen2.5-vl' needs a transformers version with Qwen2.5-VL") from e
    qdir = os.environ.get("LONGCAT_NB_QWEN", "Qwen/Qwen2.5-VL-7B-Instruct")
    qtok = AutoTokenizer.from_pretrained(qdir)
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(qdir, torch_dtype=torch.bfloat16).to(dev).eval()

    @torch.no_grad()
    def encode(prompts):
        t = qtok(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").to(dev)
        h = enc(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True).hidden_states[-1]
        h = torch.nn.functional.pad(h, (0, 4096 - h.shape[-1]))
        return h[:, None], t.attention_mask

    return enc, encode


def _encode_entry(vae, record: dict, key: str, dtype: str) -> dict:
    from .data.video import load_condition_image, load_sample_frames
    from .vae import encode_video, from_uint8_frames

    g = torch.Generator().manual_seed(int(key[:15], 16))  # per-entry seed: resumable, reproducible
    frames = load_sample_frames(record)
    video = from_uint8_frames(frames)
    z = _encode(vae, video, g)
    out = {"latents": z[0].to(_DTYPES[dtype]).cpu()}
    img = load_condition_image(record)
    if img is not None:
        out["cond_latents"] = _encode(vae, from_uint8_frames(img), g)[0].to(_DTYPES[dtype]).cpu()
    return out


def _encode(vae, video: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """encode_video, with the posterior noise drawn on the CPU generator so every device agrees."""
    from .vae import normalize_latents

    param = next(vae.parameters())
    dist = vae.encode(video.to(param.device, param.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=g, dtype=torch.float32).to(dist.mean.device)
    z = dist.mean.float() + dist.std.float() * noise
    return normalize_latents(vae, z)


# ---------------------------------------------------------------------------------------------
# reading, for the trainer
# ---------------------------------------------------------------------------------------------
class CachedDataset:
    """The cached samples of a run. Item: latents [16, T, h, w] float32 (normalized), text_embeds
    [1, L, C], text_mask [L], cond_latents [16, 1, h, w] or None, num_cond_latents (1 for samples
    with a conditioning image: the trainer puts cond_latents in latent frame 0), bucket, key, caption."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        m = read_manifest(self.run_dir)
        if m is None:
            raise CacheError(f"{_manifest_path(self.run_dir)} does not exist: run 02_cache first")
        want = load_config(self.run_dir).cache.text_encoder
        got = m["identity"]["text_encoder"]
        if got != want:
            raise CacheError(f"the cache in {self.run_dir / 'cache'} was built with text encoder {got!r} but the "
                             f"run is set to {want!r}; re-run 02_cache (the two are never mixed)")
        self.manifest = m
        self.keys = sorted(m["entries"])
        for k in self.keys:
            f = self.run_dir / "cache" / m["entries"][k]["file"]
            if not f.exists() or f.stat().st_size < 16:
                raise CacheError(f"{f} is missing or truncated: re-run 02_cache (it re-makes damaged entries)")
        self._text: dict = {}

    def __len__(self) -> int:
        return len(self.keys)

    def entry_meta(self, i: int) -> dict:
        return self.manifest["entries"][self.keys[i]]

    def buckets(self) -> dict:
        out: dict = {}
        for i, k in enumerate(self.keys):
            out.setdefault(self.manifest["entries"][k]["bucket"], []).append(i)
        return out

    def _load(self, rel: str) -> dict:
        from safetensors.torch import load_file

        path = self.run_dir / "cache" / rel
        try:
            return load_file(str(path))
        except Exception as e:
            raise CacheError(f"{path} cannot be read ({e}); re-run 02_cache to re-make it") from None

    def __getitem__(self, i: int) -> dict:
        e = self.manifest["entries"][self.keys[i]]
        t = self._load(e["file"])
        tk = e["text"]
        if tk not in self._text:
            self._text[tk] = self._load(self.manifest["text"][tk]["file"])
        text = self._text[tk]
        return {
            "latents": t["latents"].float(), "cond_latents": t["cond_latents"].float() if "cond_latents" in t else None,
            "num_cond_latents": e["num_cond_latents"], "text_embeds": text["text_embeds"],
            "text_mask": text["text_mask"], "bucket": e["bucket"], "key": self.keys[i], "caption": e["caption"],
        }


def load_negative(run_dir) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    m = read_manifest(run_dir)
    if m is None or not m.get("negative"):
        raise CacheError(f"no cached negative prompt in {Path(run_dir) / 'cache'}: run 02_cache")
    t = load_file(str(Path(run_dir) / "cache" / m["negative"]["file"]))
    return t["text_embeds"], t["text_mask"]


def cache_summary(run_dir) -> list[dict]:
    m = read_manifest(run_dir) or {"entries": {}}
    rows: dict = {}
    for e in m["entries"].values():
        r = rows.setdefault(e["bucket"], {"bucket": e["bucket"], "entries": 0, "i2v": 0, "latent_shape": e["shape"], "MB": 0.0})
        r["entries"] += 1
        r["i2v"] += e["num_cond_latents"]
        f = Path(run_dir) / "cache" / e["file"]
        r["MB"] += f.stat().st_size / 1e6 if f.exists() else 0
    return [dict(r, MB=round(r["MB"], 2)) for r in rows.values()]
