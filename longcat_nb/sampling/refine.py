"""The 720p refinement stage (spec §7.9): a stage-1 clip upsampled to 704x1280 (and 30 fps), re-noised to
t_thresh and denoised with the checkpoint's refinement_lora and block-sparse attention."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import BASE_FPS
from ..lora.adapters import temporary_loras
from ..resolution import refine_bucket
from ..vae import check_size, decode_latents, encode_video, to_uint8_frames
from .load import _exec_device, _memory, dit_dtype, placed, vae_tiling
from .pipeline import _oom_error, denoise, encode_text, run_record
from .request import (DEFAULT_STEPS, REFINE_LORA, SampleError, SampleResult, _as_uint8_frames, load_image_frames,
                      load_video_frames, preprocess_frames)


# ---------------------------------------------------------------------------------------------
# 720p refinement stage (spec §7.9): stage-1 clip -> 704x1280 at 30 fps, refinement_lora + BSA
# ---------------------------------------------------------------------------------------------
BSA_LATENT_GRANULARITY = 4  # BSA's 4x4x4 blocks: latent frame counts are padded to multiples of 4


def upsample_for_refinement(frames: np.ndarray, height: int, width: int, double_frames: bool = True) -> torch.Tensor:
    """uint8 [F1, H, W, 3] -> [1, 3, F2, height, width] in [−1, 1]: bilinear in space, then linear in
    time to F2 = 2·F1 (or F1) frames, both with align_corners=True, as the pipeline's input."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True) / 255.0
    x = x.permute(1, 0, 2, 3)[None]  # [1, 3, F1, H, W]
    f2 = 2 * x.shape[2] if double_frames else x.shape[2]
    x = F.interpolate(x, size=(f2, height, width), mode="trilinear", align_corners=True)
    return x * 2 - 1


def refinement_padding(num_frames: int, num_cond_frames: int = 0) -> dict:
    """Latent counts in multiples of 4 (spec §7.9 step 3) for F2 frames with k conditioning frames:
    n = ⌈(1 + ⌈(k−1)/4⌉)/4⌉·4 conditioning latents (0 when k = 0) made of 1 + 4(n−1) frames (the
    first frame repeated in front), m = ⌈⌈(F2−k)/4⌉/4⌉·4 noisy latents (last frame repeated at the end)."""
    k, f2, g = num_cond_frames, num_frames, BSA_LATENT_GRANULARITY
    n = math.ceil((1 + math.ceil((k - 1) / 4)) / g) * g if k > 0 else 0
    front = 1 + 4 * (n - 1) - k if k > 0 else 0
    m = math.ceil(math.ceil((f2 - k) / 4) / g) * g
    back = 4 * m - (f2 - k)
    return {"cond_latents": n, "noisy_latents": m, "front": front, "back": back}


def _stage1(stage1, prompt: Optional[str]) -> tuple[np.ndarray, str, float]:
    """(frames, prompt, fps) of a stage-1 SampleResult or uint8 frames."""
    if isinstance(stage1, SampleResult):
        src = stage1.settings
        return stage1.video, src.get("prompt", "") if prompt is None else prompt, float(src.get("fps", BASE_FPS))
    return _as_uint8_frames(stage1, "stage1"), prompt or "", float(BASE_FPS)


def _refine_loras(components, loras: Optional[Sequence[tuple]]) -> Sequence[tuple]:
    if loras is not None:
        return loras
    if REFINE_LORA not in (components.loras or {}):
        raise SampleError(f"refinement needs {Path(components.folder) / 'lora' / (REFINE_LORA + '.safetensors')} "
                          "(from meituan-longcat/LongCat-Video), or pass loras=[(path, scale)]")
    return [(components.loras[REFINE_LORA], 1.0)]


def _refine_conditioning(image, video, num_cond_frames: int) -> tuple[Optional[np.ndarray], int]:
    """(uint8 frames held clean, k): the image (k = 1), the video's last k frames, or none (k = 0)."""
    if image is not None:
        return load_image_frames(image), 1
    if video is None:
        return None, 0
    if num_cond_frames < 1:
        raise SampleError("refine with video conditioning needs num_cond_frames >= 1 (official: 26 at 30 fps)")
    cond = load_video_frames(video, None)
    if len(cond) < num_cond_frames:
        raise SampleError(f"conditioning video has {len(cond)} frames < num_cond_frames={num_cond_frames}")
    return cond[-num_cond_frames:], num_cond_frames


def _noised_latents(vae, up: torch.Tensor, cond, pad: dict, size: tuple, t_thresh: float,
                    g: torch.Generator) -> torch.Tensor:
    """The padded upsampled clip encoded and re-noised to σ = t_thresh, x = (1 − t)·z + t·ε, with the
    conditioning frames (padded in front) encoded clean into the first latents. On the CPU, float32."""
    n, m = pad["cond_latents"], pad["noisy_latents"]
    up = torch.cat([up[:, :, :1].expand(-1, -1, pad["front"], -1, -1), up,
                    up[:, :, -1:].expand(-1, -1, pad["back"], -1, -1)], dim=2)
    up = up[:, :, : 1 + 4 * (n + m - 1)]  # the VAE reads 1 + 4(L − 1) frames for L latents (k = 0: 3 unused)
    z = encode_video(vae, up, generator=g).float().cpu()
    noise = torch.randn(z.shape, generator=g, dtype=torch.float32)
    latents = (1 - t_thresh) * z + t_thresh * noise
    if cond is not None:
        pixels = preprocess_frames(cond, *size)
        pixels = torch.cat([pixels[:, :, :1].expand(-1, -1, pad["front"], -1, -1), pixels], dim=2)
        latents[:, :, :n] = encode_video(vae, pixels, generator=g).float().cpu()
    return latents


@torch.no_grad()
def refine(components, stage1, prompt: Optional[str] = None, *, image=None, video=None, num_cond_frames: int = 0,
           steps: int = DEFAULT_STEPS, t_thresh: float = 0.5, spatial_refine_only: bool = False,
           size: Optional[tuple] = None, seed: int = 0, loras: Optional[Sequence[tuple]] = None,
           use_bsa: bool = True, progress=True, callback=None, offload: str = "none", device=None,
           text_encoder_to_cpu: bool = True, vae_tiling_enabled: Optional[bool] = None) -> SampleResult:
    """Refine a stage-1 clip (a SampleResult or uint8 [F1, H, W, 3], normally the 480p/15 fps
    distilled output) to the 720p 64-px bucket (480x832 -> 704x1280) and, unless
    ``spatial_refine_only``, twice the frames (30 fps).

    The checkpoint's ``refinement_lora`` (or ``loras``) is applied for the call, block-sparse
    attention is switched on (dense where BSA cannot run), the positive prompt only, no guidance.
    The upsampled clip is encoded, then re-noised to σ = t_thresh: x = (1 − t)·z + t·ε, and denoised
    with the refine schedule (5 steps from t = 500 for steps = 50). For I2V/continuation give
    ``image`` (k = 1) or ``video`` (its last ``num_cond_frames`` frames at the refined frame rate): they
    are encoded at the target size and held clean in front, padded to 4 latents. ε and the posterior
    samples come from a seeded generator (the official code draws them unseeded)."""
    t0 = time.time()
    frames, prompt, base_fps = _stage1(stage1, prompt)
    if not 0 < t_thresh < 1:
        raise SampleError(f"t_thresh={t_thresh}: use a value in (0, 1) (official 0.5)")
    if steps < 1:
        raise SampleError(f"steps={steps}: use at least 1 (official 50, which gives 5 refinement steps)")
    if image is not None and video is not None:
        raise SampleError("refine: give image or video for conditioning, not both")
    dit, vae = components.dit, components.vae
    dev = _exec_device(dit, offload, device)
    dtype = dit_dtype(dit)
    loras = _refine_loras(components, loras)
    h, w = tuple(size) if size else refine_bucket(frames.shape[1], frames.shape[2])
    try:
        check_size(h, w, 64, "refinement size")  # 64-px grid: the latent grid splits into BSA's 4x4 blocks
    except ValueError as e:
        raise SampleError(str(e)) from None
    cond, num_cond_frames = _refine_conditioning(image, video, num_cond_frames)

    emb, mask = encode_text(components, prompt, None, False, dev, dtype, offload, text_encoder_to_cpu)
    up = upsample_for_refinement(frames, h, w, not spatial_refine_only)
    f2 = up.shape[2]
    pad = refinement_padding(f2, num_cond_frames)
    n, m = pad["cond_latents"], pad["noisy_latents"]
    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        latents = _noised_latents(vae, up, cond, pad, (h, w), t_thresh, torch.Generator().manual_seed(int(seed)))
    del up
    latents = latents.to(dev)

    previous = getattr(dit, "attention_backend", "sdpa")
    try:
        with temporary_loras(dit, loras), placed(dit, dev, offload == "model"):
            if use_bsa:
                dit.enable_bsa()
            latents, timesteps = denoise(dit, components.scheduler, latents, emb, mask, steps, "refine", 1.0, n,
                                         t_thresh=t_thresh, progress=progress, callback=callback)
    except torch.cuda.OutOfMemoryError as e:
        raise _oom_error(e, dev, h, w, f2, False, _memory(components)) from e
    finally:
        dit.set_attention_backend(previous)

    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        out = to_uint8_frames(decode_latents(vae, latents))[0]
    out = out[pad["front"]: pad["front"] + f2]
    settings = {
        "mode": "refine", "prompt": prompt, "height": h, "width": w, "num_frames": int(len(out)), "steps": steps,
        "t_thresh": t_thresh, "seed": seed, "fps": base_fps if spatial_refine_only else 2 * base_fps,
        "spatial_refine_only": spatial_refine_only, "num_cond_frames": num_cond_frames, "num_cond_latents": n,
        "latent_frames": n + m, "padding": pad, "bsa": use_bsa, **run_record(components, loras, timesteps, dev, dtype),
    }
    return SampleResult(video=out, latents=latents.cpu(), settings=settings, seconds=time.time() - t0)
