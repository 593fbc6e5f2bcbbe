"""Block-sparse attention: our Triton kernel (CUDA) and the plain-torch reference (anywhere)."""
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


def bsa_attention(*args, **kwargs):
    from .triton_bsa import bsa_attention as _impl

    return _impl(*args, **kwargs)


__all__ = ["bsa_attention", "bsa_available", "reference_bsa_attention", "select_blocks"]
