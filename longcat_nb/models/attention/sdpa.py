"""``sdpa``: torch ``scaled_dot_product_attention`` (CPU, CUDA, MPS); the dense attention every other
backend falls back to. On CUDA in bf16 it runs fused kernels (FlashAttention-2, cuDNN), which is what
the checkpoint's ``enable_flashattn2`` asks for.

Option ``preference`` (env LONGCAT_NB_SDPA): which fused kernel torch should try first on CUDA;
``auto`` lets torch choose. cuDNN's fused attention is the fastest on Hopper for the DiT's shapes
(docs/benchmarks.md); torch falls back down the list when a kernel does not support the inputs.
"""
from __future__ import annotations

import torch.nn.functional as F

from .registry import AttentionBackend, Option, register

# the kernels torch may use on CUDA for each preference, in order
ORDER = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "MATH"),
    "math": ("MATH",),
}
PREFERENCES = ("auto", *ORDER)

# their outputs are what selective checkpointing keeps: dense attention over the video tokens is the
# most expensive thing to recompute (about half of a block's forward at 480x832x93)
KEPT_OPS = ("aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")


def sdpa(q, k, v, attn_mask=None):
    """q [B, H, Sq, D], k/v [B, H, Sk, D] -> [B, H, Sq, D]; softmax scale 1/sqrt(D)."""
    pref = BACKEND.options["preference"].value
    if pref == "auto" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, n) for n in ORDER[pref]], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def self_attention(q, k, v, grid_q, grid_k, params=None):
    return sdpa(q, k, v)


BACKEND = register(AttentionBackend(
    name="sdpa",
    description="torch scaled_dot_product_attention (fused kernels on CUDA; CPU, MPS)",
    self_attention=self_attention,
    cross_attention=sdpa,
    kept_ops=KEPT_OPS,
    options={"preference": Option("auto", PREFERENCES, env="LONGCAT_NB_SDPA")},
))


def set_sdpa_preference(name: str) -> str:
    """'auto' lets torch choose; otherwise one of flash | cudnn | efficient | math. Returns the previous one."""
    return BACKEND.set_option("preference", name)


def sdpa_preference() -> str:
    return BACKEND.option("preference")
