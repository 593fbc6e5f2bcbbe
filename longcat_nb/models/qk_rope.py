"""The self-attention's q/k RMS norms and 3D RoPE in one Triton kernel, for steps without gradients
(sampling, validation).

Same arithmetic as the eager path (``rms_norm_fp32`` then ``rope.apply_rope``): the sum of squares
and the rotation in float32, the normalised value rounded to the input dtype, times the norm's weight
rounded again, rotated, rounded. One program reads a tile of tokens of one head for q and k straight
from the qkv projection's output ([B, N, 3, H, D], any strides with unit stride along D) and writes
q and k as contiguous [B, H, N, D]. Under torch.compile, inductor's fusion of the same ops writes
through a permute and ran about 3.5x below the memory bandwidth on an H200 (about 2.7 ms a block at
480x832x93, CFG batch); this kernel is opaque to inductor (a torch custom op).

Training keeps the eager/inductor path: this kernel has no backward. ``LONGCAT_NB_FUSED_QK=0`` (or
``set_enabled(False)``) turns it off everywhere.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the eager path runs
    triton = None

_enabled = os.environ.get("LONGCAT_NB_FUSED_QK", "1") != "0"
BLOCK_N = 64


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def usable(y: torch.Tensor, q_norm, k_norm, head_dim: int) -> bool:
    """The fused kernel can stand in for the norms ``q_norm``/``k_norm`` (RMSNormFP32) and RoPE on
    the qkv output ``y``: CUDA, bf16/fp16 with weights of that dtype, one eps, a power-of-2 head
    dim, and no gradient to carry."""
    return (_enabled and triton is not None and y.is_cuda and y.dtype in (torch.bfloat16, torch.float16)
            and q_norm.weight.dtype == k_norm.weight.dtype == y.dtype and q_norm.eps == k_norm.eps
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and not (torch.is_grad_enabled() and y.requires_grad))


if triton is not None:

    @triton.jit
    def _norm_rope(X, W, O, cols, m, c, s, eps, D: tl.constexpr, BLOCK: tl.constexpr):
        # whole rows in and out (coalesced); the (even, odd) pairs are split and joined in registers
        x = tl.load(X + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
        w = tl.load(W + cols).to(tl.float32)
        dt = O.dtype.element_ty
        y = ((x * r[:, None]).to(dt).to(tl.float32) * w[None, :]).to(dt).to(tl.float32)
        a, b = tl.split(tl.reshape(y, [BLOCK, D // 2, 2]))
        out = tl.reshape(tl.join(a * c - b * s, b * c + a * s), [BLOCK, D])
        tl.store(O + cols[None, :], out.to(dt), mask=m)

    @triton.jit
    def _qk_norm_rope_kernel(X, WQ, WK, COS, SIN, Q, K, N, H, sxb, sxn, sx3, sxh, eps,
                             D: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        half = tl.arange(0, D // 2)
        m = rows[:, None] < N
        tab = rows[:, None] * (D // 2) + half[None, :]
        c = tl.load(COS + tab, mask=m, other=0.0)
        s = tl.load(SIN + tab, mask=m, other=0.0)
        x = X + b.to(tl.int64) * sxb + rows[:, None].to(tl.int64) * sxn + h * sxh
        o = bh.to(tl.int64) * N * D + rows[:, None] * D
        _norm_rope(x, WQ, Q + o, cols, m, c, s, eps, D, BLOCK)
        _norm_rope(x + sx3, WK, K + o, cols, m, c, s, eps, D, BLOCK)


@torch.library.custom_op("longcat_nb::qk_norm_rope", mutates_args=())
def _qk_norm_rope(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _, H, D = y.shape
    q = torch.empty(B, H, N, D, dtype=y.dtype, device=y.device)
    k = torch.empty_like(q)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    _qk_norm_rope_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
        y, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q, k, N, H,
        y.stride(0), y.stride(1), y.stride(2), y.stride(3), eps, D=D, BLOCK=BLOCK_N, num_warps=4)
    return q, k


@_qk_norm_rope.register_fake
def _(y, q_weight, k_weight, cos, sin, eps):
    B, N, _, H, D = y.shape
    q = y.new_empty(B, H, N, D)
    return q, torch.empty_like(q)


def qk_norm_rope(y: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ([B, H, N, D], contiguous) from the qkv output viewed as ``y`` [B, N, 3, H, D]: each
    RMS-normed with its weight, then rotated by the RoPE tables ``cos``/``sin`` [N, D/2]."""
    if y.stride(-1) != 1:
        y = y.contiguous()
    return _qk_norm_rope(y, q_weight, k_weight, cos, sin, float(eps))
