"""Speed options applied to a plain DiT (the model file knows nothing of them).

* ``apply_compile``: ``torch.compile`` of the blocks or of their float32 element-wise glue. Measured
  on an H100 (docs/benchmarks.md): the glue is about a third of a sampling step's time; compiling a
  whole block inside ``torch.utils.checkpoint`` fails its recompute check, so training compiles the
  glue functions only.
* ``set_sdpa_preference`` (re-exported): which fused attention kernel torch should use on CUDA.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from .models.attention import set_sdpa_preference  # noqa: F401



def apply_compile(model: nn.Module, scope: str = "auto", mode: str | None = None) -> nn.Module:
    """Compile for speed. scope='blocks': each whole block (sampling: one graph shared by the 48
    identical blocks); scope='glue': only the float32 element-wise functions (norms, modulation,
    gated residuals, RoPE), which composes with gradient checkpointing, activation offload and block
    swap. 'auto' = blocks without gradient checkpointing, glue with it."""
    from .models import dit as dit_module

    if scope == "auto":
        scope = "glue" if getattr(model, "gradient_checkpointing", False) else "blocks"
    if scope == "glue":
        for name in dit_module.GLUE:
            if name not in dit_module._compiled_glue:
                dit_module._compiled_glue[name] = torch.compile(getattr(dit_module, name), mode=mode)
    elif scope == "blocks":
        for block in model.blocks:
            block.compile(mode=mode, dynamic=False)
    else:
        raise ValueError(f"compile scope {scope!r}: choose auto, glue or blocks")
    return model


def disable_compile() -> None:
    from .models import dit as dit_module

    dit_module._compiled_glue.clear()


def default_sdpa_preference() -> str:
    """cuDNN fused attention on Hopper and newer (1.6-1.75x the flash kernel's speed there,
    docs/benchmarks.md); torch's own choice elsewhere."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "cudnn"
    return "auto"


__all__ = ["apply_compile", "set_sdpa_preference", "default_sdpa_preference"]
