"""The cache's reading side, for the trainer: the cached dataset, the manifest's checks against the
run's settings, the negative prompt, summaries and the decode check. Imported through ``longcat_nb.cache``."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from .cache import (CacheError, _dataset_sha256, _free, _manifest_path, load_config, model_identity,
                    read_manifest)
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


def sample_role(record: dict) -> dict:
    """What the trainer needs from a record's dataset entry (records of one folder: train, weight 1)."""
    return {"role": record.get("role", "train"), "loss_weight": float(record.get("loss_weight", 1.0)),
            "repeats": int(record.get("repeats", 1)), "dataset": int(record.get("dataset", 0))}


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
    * ``loss_mask`` [1, T, h, w] float32 (1 = learn) or None; ``role``, ``loss_weight``, ``repeats`` and
      ``dataset`` (its entry in dataset.datasets), from the record.

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
                "bucket": e["bucket"], "key": key, "caption": e["caption"], "source": e["source"],
                "loss_mask": lat["loss_mask"].float() if "loss_mask" in lat else None,
                **sample_role(e.get("record") or {})}


def check_manifest(run_dir, m: dict) -> None:
    """Refuse a cache that does not match the run's settings (never mix encoders, dtypes or models)."""
    from .model_files import resolve_checkpoint

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

    from .model_files import load_vae, pick_device, resolve_checkpoint
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
