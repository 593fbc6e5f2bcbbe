"""Attention backends of the DiT, chosen in one place.

* ``auto`` (the default): ``bsa`` on grids of 720p and more, ``sdpa`` below (resolve_auto).
* ``sdpa``: torch ``scaled_dot_product_attention`` (CPU, CUDA, MPS). On CUDA in bf16 it runs
  FlashAttention-2 kernels, which is what the checkpoint's ``enable_flashattn2`` asks for.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` when installed.
* ``bsa``: block-sparse self-attention (spec §3) through our Triton kernel on CUDA; on other
  devices, or for single-frame grids, it falls back to dense SDPA. Cross-attention is always dense.
* ``quant8``: dense self-attention with 8-bit operands (int8 Q·Kᵀ, float8 P·V; :mod:`.quant_attention`)
  on GPUs with 8-bit tensor cores (compute capability 8.9+). Training steps use SDPA by default;
  :func:`set_quant8_training` can run them through this forward with a bf16 backward (``cudnn`` or
  ``triton``). SDPA also on the CPU, older GPUs and for cross-attention.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "bsa", "quant8")

# ``auto``: block-sparse self-attention where the official pipeline turns it on (its 720p refinement
# stage), dense SDPA elsewhere. Latent tokens per frame (16x16 pixels each): every 480p bucket has at
# most 1,600 (1280x320), every 720p bucket at least 3,520 (704x1280); the line sits between them.
AUTO_BSA_MIN_TOKENS = 2500

DEFAULT_BSA_PARAMS = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}


def backend_from_config(attention_implementation, enable_xformers: bool, enable_bsa: bool) -> str:
    """The checkpoint's flags name flash-attn/xformers; SDPA is the portable equivalent."""
    if attention_implementation:
        name = str(attention_implementation).lower()
        if name in ("flash_attn", "flash_attention_2", "flashattn2", "flashattn3", "flash_attention_3"):
            name = "sdpa"
        if name not in BACKENDS:
            raise ValueError(
                f"attention_implementation={attention_implementation!r} is not one of {BACKENDS}"
            )
        return name
    if enable_bsa:
        return "bsa"
    if enable_xformers:
        return "xformers"
    return "sdpa"


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


# Which SDPA kernels torch may use on CUDA, in order of preference. cuDNN's fused attention is the
# fastest on Hopper for these shapes (measured in docs/benchmarks.md); torch falls back down the list
# when a kernel does not support the inputs. Override with LONGCAT_NB_SDPA=flash|cudnn|efficient|math.
_SDPA_ORDER = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "MATH"),
    "math": ("MATH",),
}
_sdpa_pref = os.environ.get("LONGCAT_NB_SDPA", "auto")


def set_sdpa_preference(name: str) -> None:
    """'auto' lets torch choose; otherwise one of flash | cudnn | efficient | math."""
    global _sdpa_pref
    if name != "auto" and name not in _SDPA_ORDER:
        raise ValueError(f"SDPA preference {name!r}: choose auto or one of {sorted(_SDPA_ORDER)}")
    _sdpa_pref = name


# Training steps with the quant8 backend: "off" = SDPA (forward and backward in bf16); "cudnn" or
# "triton" = the 8-bit forward and that backward (quant_attention.DEFAULT_CONFIG says what each is);
# "auto" = off (SDPA): see set_quant8_training.
QUANT8_TRAINING = ("auto", "off", "cudnn", "triton")
_quant8_training = os.environ.get("LONGCAT_NB_QUANT8_TRAINING", "auto")
if _quant8_training not in QUANT8_TRAINING:
    raise ValueError(f"LONGCAT_NB_QUANT8_TRAINING={_quant8_training!r}: choose one of {QUANT8_TRAINING}")


def set_quant8_training(name: str) -> str:
    """How a training step runs self-attention under the quant8 backend: one of QUANT8_TRAINING.
    ``auto`` (the default) and ``off``: SDPA. ``cudnn``: the 8-bit forward with cuDNN's bf16 backward
    fed its statistics. ``triton``: with our Triton backward (slower than SDPA).

    ``cudnn`` hands cuDNN operand layouts of its own (run 16 found its gradients wrong before that);
    on an H200 its DiT gradients are within 5% of an fp32 model's (tests/test_quant_attention.py).
    ``auto`` stays on SDPA: in run 17 ``cudnn`` was 1.7% faster a LoRA step at 480x832x93 with
    2 GiB more peak memory, and 1-3% slower at 17-45 frames (docs/benchmarks.md). Returns the
    previous setting."""
    global _quant8_training
    if name not in QUANT8_TRAINING:
        raise ValueError(f"quant8 training {name!r}: choose one of {QUANT8_TRAINING}")
    previous, _quant8_training = _quant8_training, name
    return previous


def _quant8_training_backward() -> str | None:
    """The backward a quant8 training step runs after the 8-bit forward, or None for SDPA."""
    return None if _quant8_training in ("auto", "off") else _quant8_training


@contextlib.contextmanager
def quant8_training(name: str):
    """``with quant8_training("cudnn"):`` set_quant8_training for the block, restored after it."""
    previous = set_quant8_training(name)
    try:
        yield
    finally:
        set_quant8_training(previous)


def _sdpa(q, k, v, attn_mask=None):
    if _sdpa_pref == "auto" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, n) for n in _SDPA_ORDER[_sdpa_pref]]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def dense_attention(q, k, v, backend: str = "sdpa", attn_mask=None):
    """q [B, H, Sq, D], k/v [B, H, Sk, D] -> [B, H, Sq, D]; softmax scale 1/sqrt(D)."""
    if backend == "xformers" and q.is_cuda and attn_mask is None:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)
    return _sdpa(q, k, v, attn_mask=attn_mask)


def resolve_auto(backend: str, grid) -> str:
    """The backend ``auto`` stands for on a (T, h, w) token grid; any other backend as it is."""
    if backend != "auto":
        return backend
    return "bsa" if grid[1] * grid[2] >= AUTO_BSA_MIN_TOKENS else "sdpa"


def self_attention(q, k, v, grid_q, grid_k, backend: str, bsa_params: dict | None):
    """Self-attention of video tokens; ``grid_*`` = (T, h, w) of the queries / keys."""
    backend = resolve_auto(backend, grid_q)
    if backend == "bsa" and grid_q[0] > 1 and q.is_cuda:
        from .bsa import bsa_attention, bsa_available

        if bsa_available():
            params = dict(DEFAULT_BSA_PARAMS if bsa_params is None else bsa_params)
            return bsa_attention(
                q,
                k,
                v,
                tuple(grid_q),
                tuple(grid_k),
                sparsity=params.get("sparsity", 0.9375),
                chunk_q=tuple(params.get("chunk_3d_shape_q", (4, 4, 4))),
                chunk_k=tuple(params.get("chunk_3d_shape_k", (4, 4, 4))),
                cdf_threshold=params.get("cdf_threshold"),
            )
    if backend == "quant8" and q.is_cuda:
        from .quant_attention import available, quant8_attention

        if available(q.device):
            if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
                return quant8_attention(q, k, v)
            mode = _quant8_training_backward()
            if mode is not None:  # the config as a string: json.dumps would break a compiled graph
                return quant8_attention(q, k, v, f'{{"backward": "{mode}"}}')
    return dense_attention(q, k, v, "xformers" if backend == "xformers" else "sdpa")


def check_backend_available(backend: str) -> str:
    """Resolve a requested backend to the one that will run, with a log line saying which."""
    if backend == "xformers" and not _xformers_available():
        logger.warning("xformers is not installed; using torch SDPA attention instead")
        return "sdpa"
    if backend == "auto":
        logger.info("attention auto: block-sparse on grids of 720p and more (CUDA), dense SDPA below")
    if backend == "bsa":
        try:
            from .bsa import bsa_available

            ok = bsa_available()
        except Exception:
            ok = False
        if not ok:
            logger.warning("block-sparse attention needs CUDA and Triton; using dense SDPA instead")
    if backend == "quant8":
        try:
            from .quant_attention import available

            ok = available("cuda")
        except Exception:
            ok = False
        if not ok:
            logger.warning("8-bit attention needs a CUDA GPU of compute capability 8.9+ and Triton; "
                           "using dense SDPA instead")
        else:
            mode = _quant8_training_backward()
            steps = "SDPA" if mode is None else f"the 8-bit forward with the {mode} backward"
            logger.info("8-bit attention for sampling and validation; training steps: %s", steps)
    return backend
