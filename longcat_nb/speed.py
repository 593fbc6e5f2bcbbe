"""Speed options applied to a plain DiT (the model file knows nothing of them).

* ``apply_compile``: ``torch.compile`` of each block, fusing the float32 modulation/norm glue and
  layout copies around the matmuls and attention. With gradient checkpointing the checkpointed call
  itself is compiled (compiling only the block inside a checkpoint makes the recompute save other
  tensors than the first pass, which torch.utils.checkpoint rejects).
* ``set_sdpa_preference`` (re-exported): which fused attention kernel torch should use on CUDA.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from .models.attention import set_sdpa_preference  # noqa: F401


def _checkpointed_call(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def apply_compile(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile every block (one graph shared by the 48 identical blocks)."""
    if getattr(model, "gradient_checkpointing", False):
        compiled = torch.compile(_checkpointed_call, mode=mode, dynamic=False)
        model._gradient_checkpointing_func = compiled
        for m in model.modules():
            if hasattr(m, "_gradient_checkpointing_func"):
                m._gradient_checkpointing_func = compiled
    else:
        for block in model.blocks:
            block.compile(mode=mode, dynamic=False)
    return model


def default_sdpa_preference() -> str:
    """cuDNN fused attention on Hopper and newer (1.6-1.75x the flash kernel's speed there,
    docs/benchmarks.md); torch's own choice elsewhere."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "cudnn"
    return "auto"


__all__ = ["apply_compile", "set_sdpa_preference", "default_sdpa_preference"]
