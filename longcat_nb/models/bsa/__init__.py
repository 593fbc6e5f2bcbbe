"""Block-sparse attention (spec §3): our Triton kernels (CUDA) and the plain-torch reference (anywhere).

* :func:`bsa_attention` - Triton forward + backward (block-major kernels in torch custom ops, or the
  raster kernels); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). Triton is
  imported on first call only.
* :func:`reference_bsa_attention` - the same math in plain torch (differentiable; for tests and checks).
* :func:`select_blocks` - the kept key blocks per query block, shared by both.
* :func:`bsa_available` - True when CUDA and Triton are both usable.
"""
from .reference import reference_bsa_attention, select_blocks


def bsa_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                  cdf_threshold=None, sel=None, config=None, layout="blocked"):
    """Block-sparse attention with our Triton kernels, differentiable in q, k, v.

    q [B, H, Sq, D], k/v [B, H, Sk, D] in (t, y, x) raster order of ``grid_q`` / ``grid_k`` (any
    strides). ``layout="blocked"`` (default) copies q, k, v into block-major order once and runs
    :mod:`.blocked` (torch custom ops: compiles as one node); ``"raster"`` runs :mod:`.triton_bsa`
    on the raster layout without copies. ``sel`` fixes the selection (see :func:`select_blocks`).
    """
    if layout == "raster":
        from .triton_bsa import bsa_attention as _impl

        return _impl(q, k, v, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold, sel=sel, config=config)
    if layout != "blocked":
        raise ValueError(f"layout {layout!r}: choose blocked or raster")
    from .blocked import blocked_bsa_attention

    if v.shape != k.shape or not (q.dtype == k.dtype == v.dtype):
        raise ValueError("k and v must have one shape, and q, k, v one dtype")
    if sel is None:
        sel = select_blocks(q.detach(), k.detach(), tuple(grid_q), tuple(grid_k), sparsity, tuple(chunk_q),
                            tuple(chunk_k), cdf_threshold)
    return blocked_bsa_attention(q, k, v, grid_q, grid_k, sel, chunk_q, chunk_k, config)


__all__ = ["bsa_attention", "bsa_available", "reference_bsa_attention", "select_blocks"]
