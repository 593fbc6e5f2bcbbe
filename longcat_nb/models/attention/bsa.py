"""``bsa``: block-sparse self-attention (spec §3) through our Triton kernels (models/bsa/) on CUDA;
dense SDPA for single-frame grids and tensors off CUDA. Cross-attention is dense (``sdpa``'s).
Selective checkpointing keeps none of its outputs: at the default sparsity it costs a few percent of
dense attention to recompute."""
from __future__ import annotations

from typing import Optional

from . import sdpa
from .registry import AttentionBackend, register

DEFAULT_PARAMS = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}


def _unavailable() -> Optional[str]:
    try:
        from ..bsa import bsa_available

        return None if bsa_available() else "needs CUDA and Triton"
    except Exception as e:
        return f"kernels cannot be imported ({type(e).__name__}: {e})"


def self_attention(q, k, v, grid_q, grid_k, params: Optional[dict] = None):
    """``params``: the model config's ``bsa_params`` (None: DEFAULT_PARAMS)."""
    if grid_q[0] > 1 and q.is_cuda:
        from ..bsa import bsa_attention, bsa_available

        if bsa_available():
            params = dict(DEFAULT_PARAMS if params is None else params)
            return bsa_attention(
                q, k, v, tuple(grid_q), tuple(grid_k),
                sparsity=params.get("sparsity", 0.9375),
                chunk_q=tuple(params.get("chunk_3d_shape_q", (4, 4, 4))),
                chunk_k=tuple(params.get("chunk_3d_shape_k", (4, 4, 4))),
                cdf_threshold=params.get("cdf_threshold"),
            )
    return sdpa.sdpa(q, k, v)


BACKEND = register(AttentionBackend(
    name="bsa",
    description="block-sparse self-attention, our Triton kernels (CUDA); dense elsewhere",
    self_attention=self_attention,
    unavailable=_unavailable,
    falls_back_per_call=True,
    strided_v=lambda grid: grid[0] > 1,  # its kernels take any strides with unit stride along D
))
