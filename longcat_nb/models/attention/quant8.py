"""``quant8``: dense self-attention with 8-bit operands (int8 Q·Kᵀ, float8 P·V; models/quant_attention.py)
on GPUs with 8-bit tensor cores (compute capability 8.9+); SDPA on the CPU, older GPUs and for
cross-attention.

Option ``training`` (env LONGCAT_NB_QUANT8_TRAINING): how a training step runs self-attention.
``auto`` (the default) and ``off``: SDPA, forward and backward in bf16 (the 8-bit forward pays only on
long clips, and costs memory: docs/benchmarks.md). ``cudnn``: the 8-bit forward with cuDNN's bf16
backward fed its statistics; its DiT gradients are checked against an fp32 model in
tests/test_quant_attention.py. ``triton``: the 8-bit forward with our Triton backward (slower than SDPA).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import sdpa
from .registry import AttentionBackend, Option, register

QUANT8_TRAINING = ("auto", "off", "cudnn", "triton")
FWD_OP = "longcat_nb::attention_quant8_fwd"  # the training forward: its output is worth keeping


def _unavailable() -> Optional[str]:
    try:
        from ..quant_attention import available

        ok = available("cuda")
    except Exception:
        ok = False
    return None if ok else "needs a CUDA GPU of compute capability 8.9+ and Triton"


def _training_backward() -> Optional[str]:
    """The backward a training step runs after the 8-bit forward, or None for SDPA."""
    mode = BACKEND.options["training"].value
    return None if mode in ("auto", "off") else mode


def self_attention(q, k, v, grid_q, grid_k, params=None):
    if q.is_cuda:
        from ..quant_attention import available, quant8_attention

        if available(q.device):
            if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
                return quant8_attention(q, k, v)
            mode = _training_backward()
            if mode is not None:  # the config as a string: json.dumps would break a compiled graph
                return quant8_attention(q, k, v, f'{{"backward": "{mode}"}}')
    return sdpa.sdpa(q, k, v)


def _note() -> str:
    mode = _training_backward()
    steps = "SDPA" if mode is None else f"the 8-bit forward with the {mode} backward"
    return f"8-bit attention for sampling and validation; training steps: {steps}"


BACKEND = register(AttentionBackend(
    name="quant8",
    description="8-bit dense self-attention for sampling (CUDA, compute capability 8.9+)",
    self_attention=self_attention,
    unavailable=_unavailable,
    falls_back_per_call=True,
    kept_ops=(*sdpa.KEPT_OPS, FWD_OP),
    options={"training": Option("auto", QUANT8_TRAINING, env="LONGCAT_NB_QUANT8_TRAINING")},
    note=_note,
))


def set_quant8_training(name: str) -> str:
    """How a training step runs self-attention under quant8: one of QUANT8_TRAINING (see the module's
    docstring). Returns the previous setting."""
    return BACKEND.set_option("training", name)


@contextlib.contextmanager
def quant8_training(name: str):
    """``with quant8_training("cudnn"):`` set_quant8_training for the block, restored after it."""
    previous = set_quant8_training(name)
    try:
        yield
    finally:
        set_quant8_training(previous)
