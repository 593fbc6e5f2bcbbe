"""Attention backends of the DiT as registered objects (registry.py); one module per backend:

* ``auto`` (the default): ``bsa`` on grids of 720p and more, ``sdpa`` below (auto.py).
* ``sdpa``: torch scaled_dot_product_attention; option ``preference`` (sdpa.py).
* ``xformers``: xformers' memory-efficient attention when installed (xformers.py).
* ``bsa``: block-sparse self-attention, our Triton kernels in models/bsa/ (bsa.py).
* ``quant8``: 8-bit dense self-attention, models/quant_attention.py; option ``training`` (quant8.py).

The DiT holds the object (``set_attention_backend`` takes its name); memory.py keeps the outputs of
:func:`kept_ops` under selective checkpointing; notebook 00 shows :func:`availability`.
"""
from __future__ import annotations

from ...config import field_choices
from .registry import (AttentionBackend, Option, availability, backend_from_config, cross_backend, get, kept_ops,
                       load_builtin, names, register, select, unregister)

BACKENDS = field_choices("model")["attention"]  # config.py's choices: the one list of built-in names
load_builtin(BACKENDS)

from .quant8 import QUANT8_TRAINING, quant8_training, set_quant8_training  # noqa: E402
from .sdpa import sdpa_preference, set_sdpa_preference  # noqa: E402


def self_attention(q, k, v, grid_q, grid_k, backend: str, params: dict | None = None):
    """Self-attention of video tokens through the backend named ``backend``; ``grid_*`` = (T, h, w)."""
    return get(backend).self_attention(q, k, v, tuple(grid_q), tuple(grid_k), params)


def dense_attention(q, k, v, backend: str = "sdpa", attn_mask=None):
    """The cross-attention of the backend named ``backend`` (dense): q [B, H, Sq, D], k/v [B, H, Sk, D]."""
    return cross_backend(get(backend)).cross_attention(q, k, v, attn_mask)


__all__ = ["AttentionBackend", "BACKENDS", "Option", "QUANT8_TRAINING", "availability", "backend_from_config",
           "cross_backend", "dense_attention", "get", "kept_ops", "names", "quant8_training", "register", "select",
           "self_attention", "set_quant8_training", "set_sdpa_preference", "sdpa_preference", "unregister"]
