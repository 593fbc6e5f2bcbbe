"""Loss masks: a same-stem image or video beside a clip (``clip_mask.png``), white = learn, black = ignore.

The mask is cut exactly like its clip (same frames, crop and resize), then averaged onto the latent
grid the loss is computed on: 8x8 pixels per latent cell, and in time the causal VAE's grouping
(latent frame 0 is pixel frame 0 alone, latent frame k the pixel frames 4k-3 .. 4k). Grey is a
partial weight.
"""
from __future__ import annotations

import numpy as np
import torch

from .video import IMAGE_EXTS, crop_resize, decode_frames, load_image

SPATIAL, TEMPORAL = 8, 4  # the Wan VAE's compression


def load_mask_frames(record: dict) -> np.ndarray:
    """float32 [F, H, W] in [0, 1] at the record's frames and bucket size; an image mask holds for every frame."""
    path, frames = record["mask"], int(record["num_frames"])
    if path.lower().endswith(tuple(IMAGE_EXTS)) or record.get("kind") == "image":
        pixels = load_image(path)[None] if path.lower().endswith(tuple(IMAGE_EXTS)) else \
            decode_frames(path, [0])
        pixels = np.repeat(pixels, frames, axis=0)
    else:
        pixels = decode_frames(path, record["frame_indices"])
    pixels = crop_resize(pixels, record["height"], record["width"], record.get("crop", "center"),
                         record.get("crop_offset"))
    return pixels.astype(np.float32).mean(axis=-1) / 255.0


def to_latent_grid(mask: np.ndarray) -> torch.Tensor:
    """[F, H, W] pixel weights -> [1, T, H/8, W/8] latent weights, T = 1 + (F - 1) / 4."""
    m = torch.from_numpy(np.ascontiguousarray(mask))[:, None]  # [F, 1, H, W]
    cells = torch.nn.functional.avg_pool2d(m, SPATIAL)[:, 0]  # [F, h, w]
    groups = [cells[:1]] + [cells[i:i + TEMPORAL] for i in range(1, cells.shape[0], TEMPORAL)]
    return torch.stack([g.mean(0) for g in groups])[None].clamp(0, 1)


def record_loss_mask(record: dict):
    """The record's loss mask on the latent grid, or None when it has none."""
    return to_latent_grid(load_mask_frames(record)) if record.get("mask") else None
