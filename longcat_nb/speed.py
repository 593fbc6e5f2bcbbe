"""Speed options applied to a plain DiT (the model file knows nothing of them).

* ``apply_compile``: ``torch.compile`` of each whole block's forward (one graph shared by the 48
  identical blocks), or only of the float32 element-wise glue. Module hooks (block swap) stay outside
  the compiled code, and the kit's own activation checkpointing (:func:`.memory.apply_gradient_checkpointing`)
  runs compiled blocks in both passes, so whole blocks compile for training too. (torch's own
  ``checkpoint`` around a compiled block fails its recompute check: the no-grad and training graphs
  save different tensors.)
* ``set_sdpa_preference`` (re-exported): which fused attention kernel torch should use on CUDA (the
  ``sdpa`` attention backend's ``preference`` option, models/attention/sdpa.py).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from .config import AUTO_ON_OFF
from .models.attention import set_sdpa_preference  # noqa: F401



def apply_compile(model: nn.Module, scope: str = "auto", mode: str | None = None) -> nn.Module:
    """Compile for speed. scope='blocks' (= 'auto'): each block's forward as one graph (the glue,
    the matmuls' epilogues and, with BSA, the block selection fuse; attention stays one opaque op);
    scope='glue': only the float32 element-wise functions (norms, modulation, gated residuals, RoPE).
    Apply after LoRA injection, quantization and checkpointing: the compiled forward is the one
    they leave (a selective-checkpointing wrapper is compiled with the block)."""
    from .models import dit as dit_module

    # The float32 regions (modulation, gated residuals, final layer: the official fp32 autocast) run in full
    # float32 when sampling, on purpose (training's step turns TF32 on itself: train._tf32); Inductor's hint
    # to turn TF32 on everywhere would change the samples.
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication",
                            category=UserWarning)
    if scope == "auto":
        scope = "blocks"
    if scope == "glue":
        for name in dit_module.GLUE:
            if name not in dit_module._compiled_glue:
                dit_module._compiled_glue[name] = torch.compile(getattr(dit_module, name), mode=mode)
    elif scope == "blocks":
        # a compiled graph serves every block: their parameters are graph inputs, not constants
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in model.blocks:
            if not hasattr(block.forward, "_longcat_eager"):
                eager = block.forward
                block.forward = torch.compile(eager, mode=mode, dynamic=False)
                block.forward._longcat_eager = eager
    else:
        raise ValueError(f"compile scope {scope!r}: choose auto, glue or blocks")
    return model


def disable_compile(model: nn.Module | None = None) -> None:
    """Back to eager: the glue functions, and the blocks of ``model`` if given."""
    from .models import dit as dit_module

    dit_module._compiled_glue.clear()
    for block in getattr(model, "blocks", []):
        eager = getattr(block.forward, "_longcat_eager", None)
        if eager is not None:
            block.forward = eager
            if getattr(eager, "__self__", None) is block and eager.__func__ is type(block).forward:
                del block.forward  # the plain bound method again


COMPILE_CHOICES = AUTO_ON_OFF  # config.py's choices of the setting
_ON, _OFF = ("on", "true", "1", "yes"), ("off", "false", "0", "no", "")


def compile_choice(value) -> str:
    """A ``compile`` setting as one of COMPILE_CHOICES; true/false (config files written before
    the setting had ``auto``) map to on/off."""
    text = str(value).strip().lower()
    if text in _ON:
        return "on"
    if text in _OFF:
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"compile={value!r}: choose auto (CUDA with a working Triton), on or off")


def compile_unavailable(device) -> str | None:
    """Why torch.compile of the blocks cannot run on ``device``, or None when it can: it pays only on
    CUDA, and inductor's GPU kernels are Triton kernels."""
    if torch.device(device).type != "cuda":
        return "not a CUDA device"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({torch.__version__})"
    try:
        import triton  # noqa: F401
    except Exception as e:  # an ImportError, or a broken install that fails on import
        return f"Triton cannot be imported ({type(e).__name__}: {e}); pip install triton"
    if torch.cuda.get_device_capability(torch.device(device))[0] < 7:
        return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def compile_wanted(value, device, log=None) -> bool:
    """Whether to compile the DiT's blocks for a ``compile`` setting (auto | on | off) on ``device``.

    auto: on wherever it can run (CUDA with Triton), with one line saying why not elsewhere; a
    failure inside the compiler then runs that block eagerly instead of stopping the run. on: the
    same, but a failure is an error. A CPU run never compiles (it would only add compile time)."""
    choice = compile_choice(value)
    if choice == "off":
        return False
    why = compile_unavailable(device)
    if why is not None:
        if log is not None and (choice == "on" or torch.device(device).type == "cuda"):
            log(f"compile={choice}: running eagerly ({why})")
        return False
    if choice == "auto":
        torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager, with a warning
    return True


def default_sdpa_preference() -> str:
    """LONGCAT_NB_SDPA when set; else cuDNN fused attention on Hopper and newer (1.6-1.75x the flash
    kernel's speed there, docs/benchmarks.md); torch's own choice elsewhere."""
    if os.environ.get("LONGCAT_NB_SDPA"):
        return os.environ["LONGCAT_NB_SDPA"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "cudnn"
    return "auto"


__all__ = ["apply_compile", "compile_choice", "compile_wanted", "set_sdpa_preference", "default_sdpa_preference"]
