"""``auto`` (the default), resolved per token grid and per call (AttentionBackend.resolve):

* block-sparse self-attention where the official pipeline turns it on (its 720p refinement stage:
  grids of 720p and more);
* below that, steps without gradients (sampling, validation) run ``quant8``, the 8-bit dense
  attention, which is the bf16 kernel's accuracy on the DiT's operands (docs/benchmarks.md: 1.70e-3
  against cuDNN's 1.66e-3, both against fp32) at 1.3x its speed; it runs dense SDPA itself where it
  cannot run (the CPU, GPUs before compute capability 8.9, no Triton);
* training steps (gradients on) run dense SDPA.

``attention="sdpa"`` keeps every step on bf16 SDPA.
"""
from __future__ import annotations

import torch

from . import bsa, quant8, registry
from .registry import AttentionBackend, register

# Latent tokens per frame (16x16 pixels each): every 480p bucket has at most 1,600 (1280x320), every
# 720p bucket at least 3,520 (704x1280); the line sits between them.
BSA_MIN_TOKENS = 2500


def resolve(grid) -> AttentionBackend:
    if grid[1] * grid[2] >= BSA_MIN_TOKENS:
        return registry.get("bsa")
    return quant8.BACKEND if not torch.is_grad_enabled() else registry.get("sdpa")


def _self_attention(q, k, v, grid_q, grid_k, params=None):
    return resolve(grid_q).self_attention(q, k, v, grid_q, grid_k, params)


def _note() -> str:
    why, why8 = bsa.BACKEND.unavailable(), quant8.BACKEND.unavailable()
    below = ("8-bit dense attention (quant8) for sampling and validation, dense SDPA for training steps"
             if why8 is None else f"dense SDPA (quant8 {why8})")
    if why is None:
        return f"block-sparse on grids of 720p and more; below them {below}"
    return f"{below} on every grid here (block-sparse {why})"


register(AttentionBackend("auto", "block-sparse on grids of 720p and more (CUDA); below them 8-bit dense "
                          "attention for sampling and validation (compute capability 8.9+), dense SDPA for "
                          "training steps", _self_attention, resolve=resolve, note=_note))
