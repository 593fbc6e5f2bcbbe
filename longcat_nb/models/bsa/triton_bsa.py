"""Our Triton kernels for block-sparse attention, forward and backward (written from spec §3).

Layout: q, k, v are gathered into block-major order with zero rows for the padding of partial
blocks, as [B·H, M·n, D] with n = 64 tokens per block. The block selection (a small Mq x Mk matmul and
a top-k) runs in torch. Kernels:

* forward: one program per (query block, batch·head); online softmax over its selected key blocks;
  writes O and the log-sum-exp.
* backward dQ: the same iteration, recomputing P from the saved log-sum-exp.
* backward dK/dV: one program per (key block, batch·head), iterating over the query blocks that
  selected it (the inverse of the selection, built with a sort into CSR offsets).

Padded key rows are masked to -inf; padded query rows are zero and receive zero gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import from_blocks, select_blocks, to_blocks

BLOCK = 64


@triton.jit
def _fwd(Q, K, V, O, LSE, SEL, KVALID, sm_scale, n_q, n_k,
         NSEL: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * n_q * D + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    sel_base = SEL + (bh * (n_q // BLOCK) + qb) * NSEL
    for s in range(NSEL):
        kb = tl.load(sel_base + s).to(tl.int64)
        rows = kb * BLOCK + offs_n
        k = tl.load(K + bh * n_k * D + rows[:, None] * D + offs_d[None, :])
        v = tl.load(V + bh * n_k * D + rows[:, None] * D + offs_d[None, :])
        kval = tl.load(KVALID + rows)
        qk = tl.dot(q, tl.trans(k)) * sm_scale
        qk = tl.where(kval[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + bh * n_q * D + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))
    tl.store(LSE + bh * n_q + offs_m, m_i + tl.log(l_i))


@triton.jit
def _bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SEL, KVALID, sm_scale, n_q, n_k,
            NSEL: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * n_q * D + offs_m[:, None] * D + offs_d[None, :])
    do = tl.load(DO + bh * n_q * D + offs_m[:, None] * D + offs_d[None, :])
    lse = tl.load(LSE + bh * n_q + offs_m)
    delta = tl.load(DELTA + bh * n_q + offs_m)
    dq = tl.zeros([BLOCK, D], tl.float32)
    sel_base = SEL + (bh * (n_q // BLOCK) + qb) * NSEL
    for s in range(NSEL):
        kb = tl.load(sel_base + s).to(tl.int64)
        rows = kb * BLOCK + offs_n
        k = tl.load(K + bh * n_k * D + rows[:, None] * D + offs_d[None, :])
        v = tl.load(V + bh * n_k * D + rows[:, None] * D + offs_d[None, :])
        kval = tl.load(KVALID + rows)
        qk = tl.dot(q, tl.trans(k)) * sm_scale
        p = tl.where(kval[None, :] != 0, tl.exp(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + bh * n_q * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, OFFS, QIDX, KVALID, sm_scale, n_q, n_k, mk, total_sel,
              D: tl.constexpr, BLOCK: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    k = tl.load(K + bh * n_k * D + offs_n[:, None] * D + offs_d[None, :])
    v = tl.load(V + bh * n_k * D + offs_n[:, None] * D + offs_d[None, :])
    kval = tl.load(KVALID + offs_n)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    start = tl.load(OFFS + bh * (mk + 1) + kb)
    end = tl.load(OFFS + bh * (mk + 1) + kb + 1)
    for i in range(start, end):
        qb = tl.load(QIDX + bh * total_sel + i).to(tl.int64)
        rows = qb * BLOCK + offs_m0
        q = tl.load(Q + bh * n_q * D + rows[:, None] * D + offs_d[None, :])
        do = tl.load(DO + bh * n_q * D + rows[:, None] * D + offs_d[None, :])
        lse = tl.load(LSE + bh * n_q + rows)
        delta = tl.load(DELTA + bh * n_q + rows)
        qk = tl.dot(q, tl.trans(k)) * sm_scale
        p = tl.where(kval[None, :] != 0, tl.exp(qk - lse[:, None]), 0.0)  # [BLOCK_q, BLOCK_k]
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    tl.store(DK + bh * n_k * D + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + bh * n_k * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty))


def _inverse_selection(sel: torch.Tensor, mk: int):
    """CSR of the query blocks that selected each key block, per batch·head."""
    BH, mq, n = sel.shape
    flat = sel.reshape(BH, mq * n).long()
    order = flat.argsort(dim=1, stable=True)
    qidx = (order // n).to(torch.int32).contiguous()
    counts = torch.zeros(BH, mk, dtype=torch.int32, device=sel.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.zeros(BH, mk + 1, dtype=torch.int32, device=sel.device)
    offs[:, 1:] = counts.cumsum(1)
    return offs.contiguous(), qidx


class _BSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qb, kb, vb, sel, kvalid, sm_scale):
        BH, n_q, D = qb.shape
        n_k = kb.shape[1]
        o = torch.empty_like(qb)
        lse = torch.empty(BH, n_q, device=qb.device, dtype=torch.float32)
        nsel = sel.shape[-1]
        _fwd[(n_q // BLOCK, BH)](qb, kb, vb, o, lse, sel, kvalid, sm_scale, n_q, n_k,
                                 NSEL=nsel, D=D, BLOCK=BLOCK, num_warps=4, num_stages=2)
        ctx.save_for_backward(qb, kb, vb, o, lse, sel, kvalid)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        qb, kb, vb, o, lse, sel, kvalid = ctx.saved_tensors
        do = do.contiguous()
        BH, n_q, D = qb.shape
        n_k = kb.shape[1]
        mk = n_k // BLOCK
        delta = (o.float() * do.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(vb)
        nsel = sel.shape[-1]
        _bwd_dq[(n_q // BLOCK, BH)](qb, kb, vb, do, dq, lse, delta, sel, kvalid, ctx.sm_scale, n_q, n_k,
                                    NSEL=nsel, D=D, BLOCK=BLOCK, num_warps=4, num_stages=2)
        offs, qidx = _inverse_selection(sel, mk)
        _bwd_dkdv[(mk, BH)](qb, kb, vb, do, dk, dv, lse, delta, offs, qidx, kvalid, ctx.sm_scale, n_q, n_k,
                            mk, qidx.shape[1], D=D, BLOCK=BLOCK, num_warps=4, num_stages=2)
        return dq, dk, dv, None, None, None


def bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                  cdf_threshold=None, sel=None) -> torch.Tensor:
    """Block-sparse attention: q [B, H, Sq, D], k/v [B, H, Sk, D] on (T, h, w) grids -> [B, H, Sq, D]."""
    for c in (chunk_q, chunk_k):
        if math.prod(c) != BLOCK:
            raise ValueError(f"chunk {c}: the kernel works on blocks of {BLOCK} tokens (e.g. 4x4x4)")
    B, H, Sq, D = q.shape
    if sel is None:
        with torch.no_grad():
            sel = select_blocks(q, k, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold)
    qb, _, mq = to_blocks(q, grid_q, chunk_q)
    kb, kvalid, mk = to_blocks(k, grid_k, chunk_k)
    vb, _, _ = to_blocks(v, grid_k, chunk_k)
    flat = lambda x: x.reshape(B * H, x.shape[2], D).contiguous()  # noqa: E731
    sel32 = sel.reshape(B * H, mq, -1).to(torch.int32).contiguous()
    o = _BSA.apply(flat(qb), flat(kb), flat(vb), sel32, kvalid.to(torch.int8).contiguous(), 1.0 / math.sqrt(D))
    return from_blocks(o.view(B, H, -1, D), grid_q, chunk_q, Sq)
