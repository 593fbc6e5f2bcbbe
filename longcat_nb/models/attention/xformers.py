"""``xformers``: ``xformers.ops.memory_efficient_attention`` when installed (self- and cross-attention
on CUDA without a mask; torch SDPA otherwise). Selecting it without xformers selects ``sdpa``."""
from __future__ import annotations

from typing import Optional

from . import sdpa
from .registry import AttentionBackend, register


def _unavailable() -> Optional[str]:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a build that fails on import
        return f"xformers cannot be imported ({type(e).__name__})"
    return None


def cross_attention(q, k, v, attn_mask=None):
    if not q.is_cuda or attn_mask is not None:
        return sdpa.sdpa(q, k, v, attn_mask=attn_mask)
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def self_attention(q, k, v, grid_q, grid_k, params=None):
    return cross_attention(q, k, v)


register(AttentionBackend(
    name="xformers",
    description="xformers memory_efficient_attention (CUDA, when installed)",
    self_attention=self_attention,
    cross_attention=cross_attention,
    unavailable=_unavailable,
    kept_ops=sdpa.KEPT_OPS,  # its SDPA fallback's
))
