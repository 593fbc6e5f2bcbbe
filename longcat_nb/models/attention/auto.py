"""``auto`` (the default): block-sparse self-attention where the official pipeline turns it on (its 720p
refinement stage), dense SDPA elsewhere; resolved per token grid (AttentionBackend.resolve)."""
from __future__ import annotations

from . import bsa, registry
from .registry import AttentionBackend, register

# Latent tokens per frame (16x16 pixels each): every 480p bucket has at most 1,600 (1280x320), every
# 720p bucket at least 3,520 (704x1280); the line sits between them.
BSA_MIN_TOKENS = 2500


def resolve(grid) -> AttentionBackend:
    return registry.get("bsa" if grid[1] * grid[2] >= BSA_MIN_TOKENS else "sdpa")


def _self_attention(q, k, v, grid_q, grid_k, params=None):
    return resolve(grid_q).self_attention(q, k, v, grid_q, grid_k, params)


def _note() -> str:
    why = bsa.BACKEND.unavailable()
    if why is None:
        return "block-sparse on grids of 720p and more, dense SDPA below"
    return f"dense SDPA on every grid here (block-sparse {why})"


register(AttentionBackend("auto", "block-sparse on grids of 720p and more (CUDA), dense SDPA below",
                          _self_attention, resolve=resolve, note=_note))
