"""The Wan 2.1 VAE: frame and size rules, latent normalisation, tiled encode/decode (spec §5)."""
from __future__ import annotations

import torch

TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8


def check_num_frames(num_frames: int, where: str = "num_frames") -> int:
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        lower = max(1, (num_frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)
        raise ValueError(
            f"{where}={num_frames}: the VAE needs 4k+1 frames (…, 81, 85, 89, 93, 97, …); "
            f"use {lower} or {lower + TEMPORAL_STRIDE}"
        )
    return num_frames


def check_size(height: int, width: int, multiple: int = 16, where: str = "size") -> None:
    bad = [f"{n}={v}" for n, v in (("height", height), ("width", width)) if v <= 0 or v % multiple]
    if bad:
        fix = ", ".join(f"{n.split('=')[0]}={round(int(n.split('=')[1]) / multiple) * multiple or multiple}" for n in bad)
        raise ValueError(f"{where}: {', '.join(bad)} must be divisible by {multiple}; e.g. {fix}")


def latent_frames(num_frames: int) -> int:
    return 1 + (check_num_frames(num_frames) - 1) // TEMPORAL_STRIDE


def latent_shape(num_frames: int, height: int, width: int, channels: int = 16) -> tuple[int, int, int, int]:
    return channels, latent_frames(num_frames), height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


def _stats(vae, like: torch.Tensor):
    c = like.shape[1]
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(1, c, 1, 1, 1)
    return mean, std


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return (z.float() * std + mean).to(z.dtype)


def set_tiling(vae, enabled: bool, height: int | None = None, width: int | None = None) -> None:
    """diffusers' spatial tiling keeps a 480x832x93 clip within a 24 GB card."""
    if enabled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, 16, T, H/8, W/8] (float32).

    The pipeline samples the posterior (not its mode) for conditioning and refinement inputs.
    """
    check_num_frames(video.shape[2], "frames")
    param = next(vae.parameters())
    dist = vae.encode(video.to(param.device, param.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return normalize_latents(vae, z.float())


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """normalized latents -> video [B, 3, F, H, W] in [-1, 1] (float32)."""
    param = next(vae.parameters())
    z = denormalize_latents(vae, latents.float()).to(param.device, param.dtype)
    return vae.decode(z).sample.float().clamp(-1, 1)


def to_uint8_frames(video: torch.Tensor):
    """[B, 3, F, H, W] in [-1, 1] -> numpy uint8 [B, F, H, W, 3]."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def from_uint8_frames(frames) -> torch.Tensor:
    """numpy/tensor uint8 [F, H, W, 3] -> [1, 3, F, H, W] in [-1, 1] float32."""
    x = torch.as_tensor(frames)
    return (x.float() / 127.5 - 1).permute(3, 0, 1, 2)[None]
