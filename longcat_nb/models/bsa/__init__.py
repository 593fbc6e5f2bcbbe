"""Block-sparse attention (spec §3): our Triton kernels (CUDA) and the plain-torch reference (anywhere).

* :func:`bsa_attention` - Triton forward + backward (``torch.autograd.Function``); CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1`` (tests). Triton is imported on first call only.
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
                  cdf_threshold=None, sel=None, config=None):
    """Block-sparse attention with our Triton kernels; see :func:`.triton_bsa.bsa_attention`."""
    from .triton_bsa import bsa_attention as _impl

    return _impl(q, k, v, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold, sel=sel, config=config)


__all__ = ["bsa_attention", "bsa_available", "reference_bsa_attention", "select_blocks"]
