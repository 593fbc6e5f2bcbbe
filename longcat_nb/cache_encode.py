"""The cache's encoders: the text encoder (UMT5, or Qwen2.5-VL), and the VAE with one record's latents
and its loss mask on the latent grid. Imported through ``longcat_nb.cache``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import cache as _cache  # atomic_save_safetensors is looked up there at call time (tests replace it)
from .cache import (_DTYPES, MAX_TEXT_TOKENS, QWEN_DEFAULT, CacheError, _deterministic_cudnn, _file_info, _free,
                    _meta, _seed)
# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------
def _load_text_encoder(cfg, cs, folder: Path, dev: torch.device, identity: dict) -> Callable:
    """Returns encode(caption) -> (embeddings [L, C] float, mask [L] int64), L = 512."""
    from .model_files import load_text_encoder, load_tokenizer, pick_dtype
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
    I2V pipeline encodes its input image), with its own posterior draw. ``loss_mask`` [1, T, h, w]
    (records with a mask only) weights the loss on the latent grid (data/masks.py).
    """
    from .data.masks import record_loss_mask
    from .data.video import load_condition_image, load_sample_frames
    from .vae import from_uint8_frames

    out = {"latents": encode_latents(vae, from_uint8_frames(load_sample_frames(record)), _seed(lkey), posterior)[0]}
    img = load_condition_image(record)
    if img is not None:
        out["cond_latents"] = encode_latents(vae, from_uint8_frames(img), _seed(lkey, 1), posterior)[0]
    mask = record_loss_mask(record)
    if mask is not None:
        out["loss_mask"] = mask
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
# the build's encode phases (build_cache): each file is saved, then recorded; an error or
# interrupt writes the manifest with every finished file
# ---------------------------------------------------------------------------------------------
def _encode_texts(b) -> None:
    """Every missing caption embedding, with the text encoder loaded for this phase only."""
    if not b.text_todo:
        return
    cs, cache_dir = b.cs, b.cache_dir
    encode = _load_text_encoder(b.cfg, cs, b.folder, b.dev, b.identity)
    bar = b.progress(total=len(b.text_todo), desc="text embeddings", unit="caption") if b.progress else None
    try:
        for tk, caption in b.text_todo.items():
            emb, mask = encode(caption)  # [L, C], [L]
            rel = f"text/{tk}.safetensors"
            _cache.atomic_save_safetensors(cache_dir / rel, {
                "text_embeds": emb[mask.bool()][None].to(_DTYPES[cs.latent_dtype]).contiguous(),
                "text_mask": mask.to(torch.int64)}, metadata=_meta(key=tk, kind="text"))
            b.m["text"][tk] = {**_file_info(cache_dir, rel), "caption": caption, "tokens": int(mask.sum())}
            b.res.text_encoded += 1
            b.file_added()
            if bar is not None:
                bar.update(1)
    finally:
        del encode
        _end_phase(b, bar)


def _encode_clips(b) -> None:
    """Every missing latent file, with the VAE loaded for this phase only; a clip that fails is listed
    in ``b.res.failed`` and the others go on (out of GPU memory stops the build with the fix)."""
    if not b.latent_todo:
        return
    from .model_files import load_vae
    from .vae import set_tiling

    vae = load_vae(b.folder, b.dev, b.cfg.model.vae_dtype)
    set_tiling(vae, b.cs.vae_tiling)
    vae_dtype = str(next(vae.parameters()).dtype).replace("torch.", "")
    frames_total = sum(int(r["num_frames"]) for _, r in b.latent_todo.values())
    bar = b.progress(total=frames_total, desc="latents", unit="frame") if b.progress else None
    try:
        with _deterministic_cudnn():
            for lk, (i, r) in b.latent_todo.items():
                try:
                    tensors = encode_record(vae, r, lk, b.cs.posterior)
                except torch.OutOfMemoryError:
                    raise CacheError(
                        f"out of GPU memory encoding {r['file']} ({r['bucket']}): set vae_tiling=True "
                        "(or a smaller resolution/num_frames in 01_dataset) and re-run; finished "
                        "entries are kept") from None
                except Exception as e:  # one bad clip must not lose the others
                    b.res.failed.append({"file": r["file"], "window": r.get("window", 0),
                                         "reason": f"{type(e).__name__}: {e}"[:300]})
                    continue
                _save_latents(b, lk, r, tensors, vae_dtype)
                if bar is not None:
                    bar.update(int(r["num_frames"]))
                    bar.set_postfix(clip=Path(r["file"]).name[:24], refresh=False)
    finally:
        del vae
        _end_phase(b, bar)


def _end_phase(b, bar) -> None:
    """After a phase, also on an error or interrupt: the manifest gets every finished file, the
    caller's model (already dropped) leaves the device memory."""
    b.manifest.flush(only_pending=True)
    if bar is not None:
        bar.close()
    _free(b.dev)


def _save_latents(b, lk: str, r: dict, tensors: dict, vae_dtype: str) -> None:
    cs, rel = b.cs, f"latents/{lk}.safetensors"
    stored = {n: t.to(_DTYPES[cs.latent_dtype]) for n, t in tensors.items()}
    _cache.atomic_save_safetensors(b.cache_dir / rel, stored,
                                   metadata=_meta(key=lk, kind="latents", source=str(r["file"])))
    b.m["latents"][lk] = {
        **_file_info(b.cache_dir, rel), "source": r["file"], "window": r.get("window", 0),
        "shape": list(tensors["latents"].shape),
        "cond_shape": list(tensors["cond_latents"].shape) if "cond_latents" in tensors else None,
        "seed": _seed(lk) if cs.posterior == "sample" else None,
        "computed": {"device": b.dev.type, "vae_dtype": vae_dtype, "vae_tiling": cs.vae_tiling},
    }
    b.res.encoded += 1
    b.file_added()
