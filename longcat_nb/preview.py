"""A cheap look at a clip while it forms: the denoiser's current estimate of the clean latents, projected
to RGB by one 16 -> 3 linear map, no VAE. About a millisecond a frame, so sampling and validation can
show it every few steps.

The map is the Wan 2.1 VAE's least-squares latent-to-RGB projection on normalised latents (the
published figures that ComfyUI's Wan21 previewer uses). It shows layout, colour and motion; texture
and fine detail need the VAE. On the tiny test VAE (random weights) it shows colour noise only.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

# rows: the 16 latent channels; columns: R, G, B
WAN21_LATENT_RGB = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def clean_estimate(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 from x_σ = (1 − σ)·x0 + σ·ε and the predicted velocity v = x0 − ε: x0 = x_σ + σ·v."""
    return latents.float() + float(sigma) * velocity.float()


def latent_rgb(latents: torch.Tensor, upscale: int = 4) -> np.ndarray:
    """Normalised latents [C=16, T, h, w] (or [1, 16, T, h, w]) -> uint8 frames [T, h·upscale, w·upscale, 3]."""
    z = latents[0] if latents.dim() == 5 else latents
    if z.shape[0] != len(WAN21_LATENT_RGB):
        raise ValueError(f"latent preview: expected {len(WAN21_LATENT_RGB)} latent channels, got {z.shape[0]}")
    w = torch.tensor(WAN21_LATENT_RGB, dtype=torch.float32, device=z.device)
    b = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float32, device=z.device)
    rgb = torch.einsum("cthw,cr->thwr", z.float(), w) + b  # about [-1, 1]
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def preview_every(n: int, show: Callable[[int, np.ndarray], None]) -> Optional[Callable]:
    """A denoise callback ``(step, sigma, latents, velocity)`` that calls ``show(step, frames)`` with the
    projected clean estimate every ``n`` steps (n = 0: no preview, None)."""
    if n <= 0:
        return None

    def callback(step: int, sigma: float, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        if (step + 1) % n == 0:
            show(step, latent_rgb(clean_estimate(latents, velocity, sigma)))
    return callback
