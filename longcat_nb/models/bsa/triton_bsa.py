"""Our Triton kernels for block-sparse attention (spec §3), forward and backward.

Design (why it looks like this):

* **No permutation.** The kernels read q, k, v, o, do in their original (t, y, x) raster layout, with
  any strides: a 3-D block of 64 tokens is gathered row by row (each token row is D contiguous
  elements, so the gather costs the same memory transactions as a contiguous tile). This saves the
  block-major copies of q, k, v, the output un-permute and the matching copies in the backward
  (several GB/step at 704x1280), handles partial edge blocks with a load mask, and takes the DiT's
  sliced conditioning views without `.contiguous()`.
* **Selection in torch.** Mean pooling, the Mq x Mk score matmul and the top-k are small (a few ms at
  84k tokens) and live in :mod:`.reference`, so the kernel and the reference share one selection.
* **Forward**: one program per (query block, batch·head); the program walks its list of kept key
  blocks, BLOCK_N key rows per step (128 = two kept blocks side by side in one score tile), with an
  fp32 online softmax in base 2; writes O and the base-2 log-sum-exp.
* **Backward dQ**: the same walk, recomputing P from the log-sum-exp; its prologue also computes
  delta = rowsum(o * do) and stores it for the dK/dV kernel (no separate pre-pass over o and do).
* **Backward dK/dV**: one program per (key block, batch·head) walking the query blocks that kept it
  (the selection inverted with one sort into CSR offsets), BLOCK_M query rows per step. How many
  query blocks keep a key block varies a lot with real data, so programs are launched most-loaded
  first within each head (heads stay in order, which keeps one head's q/do hot in L2).
* The grid order puts consecutive programs on the same head: a head's K and V (43 MB at 704x1280)
  then mostly stay in L2 while its query blocks run.

Padding slots of partial blocks: padded keys get -inf scores (zero probability); padded query rows
are computed on zeros and never stored. Every existing block holds at least one real token, and the
first step of every walk is a real block, so the running max is finite after the first step.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import num_blocks, select_blocks

# Launch parameters per kernel. BLOCK_N: key rows per loop step of the forward / dQ walk (64 = one
# 4x4x4 block, 128 = two kept blocks side by side); BLOCK_M: query rows per step of the dK/dV walk
# (small, because the dK and dV fp32 accumulators already hold most registers).
# From an offline sm_90 compile (Triton 3.9, bf16, D=128; shared memory per program, registers per
# thread, no spills in any of these; an H100 SM has 228 KB and 64K registers):
#   fwd  BLOCK_N=128 w8 s3: 213 KB, <=190 regs, 1 program/SM, K/V prefetched two steps ahead
#        BLOCK_N=64  w4 s3: 115 KB, 180 regs, 2 programs/SM
#   dq   BLOCK_N=64  w4 s2:  98 KB, 208 regs, 2 programs/SM
#   dkdv BLOCK_M=64  w8 s2:  99 KB, 237 regs, 1 program/SM (BLOCK_M=128 spills; w4 at 64 is at 255)
#        BLOCK_M=32  w4 s2:  66 KB, 241 regs, 2 programs/SM
# These defaults are a starting point, not measured: benchmarks/bench_bsa.py times the variants;
# change them here after measuring on the target GPU.
DEFAULT_CONFIG = {
    "fwd": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    "dq": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2},
}

_LOG2E = 1.4426950408889634


@triton.jit
def _rows(blk, lane, T, Hh, W, NBH, NBW, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
          CHECK: tl.constexpr):
    """Raster row of slot ``lane`` of block ``blk`` (same-shape int32 tensors) and whether the slot
    is a real token (always true, at compile time, when CHECK is off: grid divisible by the chunk)."""
    bt = blk // (NBH * NBW)
    rem = blk - bt * (NBH * NBW)
    by = rem // NBW
    bx = rem - by * NBW
    t = bt * CT + lane // (CH * CW)
    y = by * CH + (lane // CW) % CH
    x = bx * CW + lane % CW
    if CHECK:
        ok = (lane < CT * CH * CW) & (t < T) & (y < Hh) & (x < W)
    else:
        ok = tl.full(lane.shape, 1, tl.int1)
    return (t * Hh + y) * W + x, ok


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEL, NSEL,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                H, Sq, Mq, KMAX, qk_scale,
                Tq, Hq, Wq, NBHq, NBWq, Tk, Hk, Wk, NBHk, NBWk,
                D: tl.constexpr, PQ: tl.constexpr, PK: tl.constexpr, BLOCK_N: tl.constexpr,
                CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
                CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
                EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, MASK_K: tl.constexpr, PREC: tl.constexpr,
                IDX64: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    lane_q = tl.arange(0, PQ)
    rq, okq = _rows(qb + lane_q * 0, lane_q, Tq, Hq, Wq, NBHq, NBWq, CQT, CQH, CQW, not EVEN_Q)
    if IDX64:
        rq = rq.to(tl.int64)
    qp = Q + b * sqb + h * sqh + rq[:, None] * sqs + offs_d[None, :]
    if EVEN_Q:
        q = tl.load(qp)
    else:
        q = tl.load(qp, mask=okq[:, None], other=0.0)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    vr = tl.arange(0, BLOCK_N)  # "virtual rows": slot index in the concatenated list of kept blocks
    row_sel = (bh.to(tl.int64) * Mq + qb) * KMAX
    n = tl.load(NSEL + bh.to(tl.int64) * Mq + qb)
    m_i = tl.full([PQ], float("-inf"), tl.float32)
    l_i = tl.zeros([PQ], tl.float32)
    acc = tl.zeros([PQ, D], tl.float32)
    # block ids are loaded one step ahead by hand: the pipeliner then prefetches the next K/V tile
    # without waiting on the index load (it does not pipeline the index load itself)
    blk_next = tl.load(SEL + row_sel + vr // PK, mask=vr // PK < n, other=0)
    for s in range(0, n * PK, BLOCK_N):
        blk = blk_next
        pos = (s + vr) // PK
        inlist = pos < n
        nxt = (s + BLOCK_N + vr) // PK
        blk_next = tl.load(SEL + row_sel + nxt, mask=nxt < n, other=0)
        rk, okk = _rows(blk, (s + vr) % PK, Tk, Hk, Wk, NBHk, NBWk, CKT, CKH, CKW, not EVEN_K)
        if IDX64:
            rk = rk.to(tl.int64)
        okk = okk & inlist
        if EVEN_K:  # every row address is real (a step past the list end re-reads block 0)
            k = tl.load(kbase + rk[:, None] * sks + offs_d[None, :])
            v = tl.load(vbase + rk[:, None] * svs + offs_d[None, :])
        else:
            k = tl.load(kbase + rk[:, None] * sks + offs_d[None, :], mask=okk[:, None], other=0.0)
            v = tl.load(vbase + rk[:, None] * svs + offs_d[None, :], mask=okk[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # base-2 logits
        if MASK_K:
            sc = tl.where(okk[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.exp2(sc - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    op = O + b * sob + h * soh + rq[:, None] * sos + offs_d[None, :]
    lp = LSE + bh.to(tl.int64) * Sq + rq
    if EVEN_Q:
        tl.store(op, acc.to(O.dtype.element_ty))
        tl.store(lp, m_i + tl.log2(l_i))
    else:
        tl.store(op, acc.to(O.dtype.element_ty), mask=okq[:, None])
        tl.store(lp, m_i + tl.log2(l_i), mask=okq)


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, SEL, NSEL,
               sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
               H, Sq, Mq, KMAX, qk_scale, sm_scale,
               Tq, Hq, Wq, NBHq, NBWq, Tk, Hk, Wk, NBHk, NBWk,
               D: tl.constexpr, PQ: tl.constexpr, PK: tl.constexpr, BLOCK_N: tl.constexpr,
               CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
               CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
               EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, MASK_K: tl.constexpr, PREC: tl.constexpr,
               IDX64: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    lane_q = tl.arange(0, PQ)
    rq, okq = _rows(qb + lane_q * 0, lane_q, Tq, Hq, Wq, NBHq, NBWq, CQT, CQH, CQW, not EVEN_Q)
    if IDX64:
        rq = rq.to(tl.int64)
    qp = Q + b * sqb + h * sqh + rq[:, None] * sqs + offs_d[None, :]
    op = O + b * sob + h * soh + rq[:, None] * sos + offs_d[None, :]
    dop = DO + b * sdob + h * sdoh + rq[:, None] * sdos + offs_d[None, :]
    lp = LSE + bh.to(tl.int64) * Sq + rq
    if EVEN_Q:
        q = tl.load(qp)
        o = tl.load(op)
        do = tl.load(dop)
    else:
        q = tl.load(qp, mask=okq[:, None], other=0.0)
        o = tl.load(op, mask=okq[:, None], other=0.0)
        do = tl.load(dop, mask=okq[:, None], other=0.0)
    # padded query rows: lse = +inf makes their probabilities exactly zero
    lse = tl.load(lp, mask=okq, other=float("inf"))
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + rq, delta, mask=okq)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    vr = tl.arange(0, BLOCK_N)  # "virtual rows": slot index in the concatenated list of kept blocks
    row_sel = (bh.to(tl.int64) * Mq + qb) * KMAX
    n = tl.load(NSEL + bh.to(tl.int64) * Mq + qb)
    dq = tl.zeros([PQ, D], tl.float32)
    # block ids one step ahead, as in _fwd_kernel
    blk_next = tl.load(SEL + row_sel + vr // PK, mask=vr // PK < n, other=0)
    for s in range(0, n * PK, BLOCK_N):
        blk = blk_next
        pos = (s + vr) // PK
        inlist = pos < n
        nxt = (s + BLOCK_N + vr) // PK
        blk_next = tl.load(SEL + row_sel + nxt, mask=nxt < n, other=0)
        rk, okk = _rows(blk, (s + vr) % PK, Tk, Hk, Wk, NBHk, NBWk, CKT, CKH, CKW, not EVEN_K)
        if IDX64:
            rk = rk.to(tl.int64)
        okk = okk & inlist
        if EVEN_K:
            k = tl.load(kbase + rk[:, None] * sks + offs_d[None, :])
            v = tl.load(vbase + rk[:, None] * svs + offs_d[None, :])
        else:
            k = tl.load(kbase + rk[:, None] * sks + offs_d[None, :], mask=okk[:, None], other=0.0)
            v = tl.load(vbase + rk[:, None] * svs + offs_d[None, :], mask=okk[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(sc - lse[:, None])
        if MASK_K:
            p = tl.where(okk[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dqp = DQ + b * sdqb + h * sdqh + rq[:, None] * sdqs + offs_d[None, :]
    if EVEN_Q:
        tl.store(dqp, (dq * sm_scale).to(DQ.dtype.element_ty))
    else:
        tl.store(dqp, (dq * sm_scale).to(DQ.dtype.element_ty), mask=okq[:, None])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, ORDER, OFFS, QIDX,
                 sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
                 sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                 H, Sq, Mk, qk_scale, sm_scale,
                 Tq, Hq, Wq, NBHq, NBWq, Tk, Hk, Wk, NBHk, NBWk,
                 D: tl.constexpr, PQ: tl.constexpr, PK: tl.constexpr, BLOCK_M: tl.constexpr,
                 CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
                 CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
                 EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, IDX64: tl.constexpr):
    item = tl.load(ORDER + tl.program_id(0)).to(tl.int64)  # = bh * Mk + key block
    bh = item // Mk
    kb = item - bh * Mk
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    lane_k = tl.arange(0, PK)
    rk, okk = _rows(kb.to(tl.int32) + lane_k * 0, lane_k, Tk, Hk, Wk, NBHk, NBWk, CKT, CKH, CKW, not EVEN_K)
    if IDX64:
        rk = rk.to(tl.int64)
    kp = K + b * skb + h * skh + rk[:, None] * sks + offs_d[None, :]
    vp = V + b * svb + h * svh + rk[:, None] * svs + offs_d[None, :]
    if EVEN_K:
        k = tl.load(kp)
        v = tl.load(vp)
    else:  # padded key rows are never stored, so their (finite) values do not matter
        k = tl.load(kp, mask=okk[:, None], other=0.0)
        v = tl.load(vp, mask=okk[:, None], other=0.0)
    qbase = Q + b * sqb + h * sqh
    dobase = DO + b * sdob + h * sdoh
    vr = tl.arange(0, BLOCK_M)  # virtual rows over the concatenated list of query blocks
    start = tl.load(OFFS + item)
    end = tl.load(OFFS + item + 1)
    dk = tl.zeros([PK, D], tl.float32)
    dv = tl.zeros([PK, D], tl.float32)
    cnt = end - start
    qlist = QIDX + start.to(tl.int64)
    # the walk counts rows from this list's start (<= Mq·PQ, int32-safe at any batch size)
    qb_next = tl.load(qlist + vr // PQ, mask=vr // PQ < cnt, other=0)  # ids one step ahead (see _fwd_kernel)
    for i in range(0, cnt * PQ, BLOCK_M):
        qb = qb_next
        inlist = (i + vr) // PQ < cnt
        nxt = (i + BLOCK_M + vr) // PQ
        qb_next = tl.load(qlist + nxt, mask=nxt < cnt, other=0)
        rq, okq = _rows(qb, (i + vr) % PQ, Tq, Hq, Wq, NBHq, NBWq, CQT, CQH, CQW, not EVEN_Q)
        if IDX64:
            rq = rq.to(tl.int64)
        okq = okq & inlist
        if EVEN_Q:
            q = tl.load(qbase + rq[:, None] * sqs + offs_d[None, :])
            do = tl.load(dobase + rq[:, None] * sdos + offs_d[None, :])
        else:
            q = tl.load(qbase + rq[:, None] * sqs + offs_d[None, :], mask=okq[:, None], other=0.0)
            do = tl.load(dobase + rq[:, None] * sdos + offs_d[None, :], mask=okq[:, None], other=0.0)
        # rows that are padding or past the list end: lse = +inf -> probability 0 -> no contribution
        lse = tl.load(LSE + bh * Sq + rq, mask=okq, other=float("inf"))
        delta = tl.load(DELTA + bh * Sq + rq, mask=okq, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [PK, BLOCK_M], transposed scores
        pt = tl.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    dkp = DK + b * sdkb + h * sdkh + rk[:, None] * sdks + offs_d[None, :]
    dvp = DV + b * sdvb + h * sdvh + rk[:, None] * sdvs + offs_d[None, :]
    if EVEN_K:
        tl.store(dkp, (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(dvp, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dkp, (dk * sm_scale).to(DK.dtype.element_ty), mask=okk[:, None])
        tl.store(dvp, dv.to(DV.dtype.element_ty), mask=okk[:, None])


# ---------------------------------------------------------------------------------------------
# host side


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot needs every tile side >= 16


def _geometry(grid, chunk):
    T, h, w = grid
    ct, ch, cw = chunk
    even = T % ct == 0 and h % ch == 0 and w % cw == 0 and _pow2(ct * ch * cw) == ct * ch * cw
    return (T, h, w, -(-h // ch), -(-w // cw)), even


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _prep(x):
    # the kernels need unit stride along D only; batch/head/token strides are free
    return x if x.stride(-1) == 1 else x.contiguous()


def _idx64(*xs) -> bool:
    # token offsets inside one (batch, head) are int32 in the kernels unless they could overflow
    return any(x.shape[2] * x.stride(2) + x.shape[3] >= 2**31 for x in xs)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact, not tf32


class Plan:
    """Everything the three kernels need besides the tensors: geometry, selection, launch config."""

    def __init__(self, q, k, grid_q, grid_k, chunk_q, chunk_k, sel, uniform, config):
        B, H, _, D = q.shape
        self.B, self.H, self.D = B, H, D
        self.gq, self.even_q = _geometry(grid_q, chunk_q)
        self.gk, self.even_k = _geometry(grid_k, chunk_k)
        self.mq, self.mk = num_blocks(grid_q, chunk_q), num_blocks(grid_k, chunk_k)
        self.pq, self.pk = _pow2(math.prod(chunk_q)), _pow2(math.prod(chunk_k))
        self.cq = dict(CQT=chunk_q[0], CQH=chunk_q[1], CQW=chunk_q[2])
        self.ck = dict(CKT=chunk_k[0], CKH=chunk_k[1], CKW=chunk_k[2])
        self.sm_scale = 1.0 / math.sqrt(D)
        sel = sel.reshape(B * H, self.mq, -1)
        self.kmax = sel.shape[-1]
        self.nsel = (sel >= 0).sum(-1, dtype=torch.int32).contiguous()  # -1 padding sits at row ends
        self.sel = sel.clamp(min=0).to(torch.int32).contiguous()
        self.uniform = uniform
        self.config = {name: dict(val) for name, val in DEFAULT_CONFIG.items()}
        for name, val in (config or {}).items():
            if name not in self.config or set(val) - set(self.config[name]):
                raise ValueError(f"config {name}: {val}; known: {DEFAULT_CONFIG}")
            self.config[name].update(val)
        self._inverse = None

    def mask_k(self, block_n: int) -> bool:
        # scores need a mask when keys can be padding slots, or when a step wider than one block can
        # run past the end of a row's list (rows of different lengths, or lengths not a multiple)
        whole_steps = self.uniform and (self.kmax * self.pk) % block_n == 0
        return (not self.even_k) or (block_n > self.pk and not whole_steps)

    def consts(self, dtype, *tensors):
        return dict(D=self.D, PQ=self.pq, PK=self.pk, **self.cq, **self.ck, EVEN_Q=self.even_q,
                    EVEN_K=self.even_k, PREC=_prec(dtype), IDX64=_idx64(*tensors))

    def inverse(self):
        if self._inverse is None:
            self._inverse = invert_selection(self.sel, self.nsel, self.mk)
        return self._inverse


def invert_selection(sel: torch.Tensor, nsel: torch.Tensor, mk: int):
    """CSR inverse of the selection: for each (batch·head, key block) the query blocks that kept it.

    sel [BH, Mq, KMAX] int32, nsel [BH, Mq] int32. Returns ``order`` (launch order of the BH·Mk
    dK/dV programs: head by head, most-loaded key block first), ``offs`` [BH·Mk + 1] and ``qidx``
    (query block ids, ascending within each key block)."""
    BH, mq, kmax = sel.shape
    dev = sel.device
    live = torch.arange(kmax, device=dev, dtype=torch.int32) < nsel[..., None]
    kdt = torch.int32 if BH * mk < 2**31 - 1 else torch.int64  # 32-bit keys sort faster
    bh = torch.arange(BH, device=dev, dtype=kdt).view(BH, 1, 1)
    key = torch.where(live, bh * mk + sel.to(kdt), BH * mk).flatten()  # dead slots sort to the end
    order_flat = key.argsort(stable=True)
    counts = torch.bincount(key, minlength=BH * mk + 1)[: BH * mk]
    offs = torch.zeros(BH * mk + 1, dtype=torch.int32, device=dev)
    offs[1:] = counts.cumsum(0)
    qidx = ((order_flat % (mq * kmax)) // kmax).to(torch.int32).contiguous()
    # most-loaded first inside each head, heads in order (see the module docstring)
    load_key = torch.arange(BH, device=dev).repeat_interleave(mk) * (mq * kmax + 1) + (mq * kmax - counts)
    order = load_key.argsort().to(torch.int32)
    return order, offs, qidx


def launch_fwd(plan: Plan, q, k, v):
    """O (laid out [B, Sq, H, D], returned as the [B, H, Sq, D] view) and the base-2 LSE [B·H, Sq]."""
    B, H, Sq, D = q.shape
    o = torch.empty(B, Sq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * H, Sq, device=q.device, dtype=torch.float32)
    cfg = plan.config["fwd"]
    _fwd_kernel[(plan.mq, B * H)](
        q, k, v, o, lse, plan.sel, plan.nsel, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Sq, plan.mq, plan.kmax, plan.sm_scale * _LOG2E, *plan.gq, *plan.gk,
        BLOCK_N=cfg["BLOCK_N"], MASK_K=plan.mask_k(cfg["BLOCK_N"]), **plan.consts(q.dtype, q, k, v, o),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def launch_dq(plan: Plan, q, k, v, o, do, lse):
    """dQ, and delta = rowsum(o * do) [B·H, Sq] for the dK/dV kernel."""
    B, H, Sq, D = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    cfg = plan.config["dq"]
    _dq_kernel[(plan.mq, B * H)](
        q, k, v, o, do, dq, lse, delta, plan.sel, plan.nsel,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq),
        H, Sq, plan.mq, plan.kmax, plan.sm_scale * _LOG2E, plan.sm_scale, *plan.gq, *plan.gk,
        BLOCK_N=cfg["BLOCK_N"], MASK_K=plan.mask_k(cfg["BLOCK_N"]), **plan.consts(q.dtype, q, k, v, o, do, dq),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, delta


def launch_dkdv(plan: Plan, q, k, v, do, lse, delta):
    B, H, Sq, D = q.shape
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    order, offs, qidx = plan.inverse()
    cfg = plan.config["dkdv"]
    _dkdv_kernel[(B * H * plan.mk,)](
        q, k, v, do, dk, dv, lse, delta, order, offs, qidx,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Sq, plan.mk, plan.sm_scale * _LOG2E, plan.sm_scale, *plan.gq, *plan.gk,
        BLOCK_M=cfg["BLOCK_M"], **plan.consts(q.dtype, q, k, v, do, dk, dv),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dk, dv


class _BSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        o, lse = launch_fwd(plan, q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        do = _prep(do)
        dq, delta = launch_dq(plan, q, k, v, o, do, lse)
        dk = dv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = launch_dkdv(plan, q, k, v, do, lse, delta)
        return dq, dk, dv, None


def make_plan(q, k, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
              cdf_threshold=None, sel=None, config=None) -> Plan:
    """Validate the arguments and select blocks (unless ``sel`` is given); see :func:`bsa_attention`."""
    B, H, Sq, D = q.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernels need a power of two >= 16")
    if k.shape[:2] != (B, H) or k.shape[-1] != D:
        raise ValueError(f"shapes q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    grid_q, grid_k = tuple(int(g) for g in grid_q), tuple(int(g) for g in grid_k)
    chunk_q, chunk_k = tuple(int(c) for c in chunk_q), tuple(int(c) for c in chunk_k)
    if math.prod(grid_q) != Sq or math.prod(grid_k) != k.shape[2]:
        raise ValueError(f"grids {grid_q}, {grid_k} do not match Sq={Sq}, Sk={k.shape[2]}")
    if sel is None:
        sel = select_blocks(q.detach(), k.detach(), grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold)
        uniform = cdf_threshold is None  # top-k: every row keeps exactly K blocks
    else:
        uniform = not bool((sel < 0).any())  # one sync; only when the caller brings a selection
    mq = num_blocks(grid_q, chunk_q)
    if tuple(sel.shape[:3]) != (B, H, mq):
        raise ValueError(f"sel {tuple(sel.shape)} does not match [B, H, Mq={mq}, K]")
    return Plan(q, k, grid_q, grid_k, chunk_q, chunk_k, sel, uniform, config)


def bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                  cdf_threshold=None, sel=None, config=None) -> torch.Tensor:
    """Block-sparse attention with our Triton kernels (CUDA; or CPU tensors under TRITON_INTERPRET=1).

    q [B, H, Sq, D], k/v [B, H, Sk, D] (any strides; unit stride along D avoids a copy), tokens in
    (t, y, x) raster order of ``grid_q`` = (Tq, h, w) and ``grid_k`` = (Tk, h, w). Same semantics as
    :func:`.reference.reference_bsa_attention`, differentiable in q, k, v. ``sel`` ([B, H, Mq, K] from
    :func:`select_blocks`, -1 = no block, only at the end of a row) fixes the selection; ``config``
    overrides entries of :data:`DEFAULT_CONFIG` (e.g. ``{"fwd": {"BLOCK_N": 64}}``). D must be a
    power of two >= 16 (64 and 128 in the model).

    The output is laid out as [B, Sq, H, D] in memory (a transposed view is returned), so the usual
    ``o.transpose(1, 2).reshape(B, Sq, H·D)`` before the output projection is free.
    """
    if v.shape != k.shape or not (q.dtype == k.dtype == v.dtype):
        raise ValueError("k and v must have one shape, and q, k, v one dtype")
    q, k, v = _prep(q), _prep(k), _prep(v)
    plan = make_plan(q, k, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold, sel, config)
    return _BSAFunction.apply(q, k, v, plan)
