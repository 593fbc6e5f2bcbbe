"""Block-sparse attention kernels on a block-major copy of q, k, v (spec §3): forward and backward.

Why a copy: the raster kernels (:mod:`.triton_bsa`) gather each 3-D block row by row, which works for
any strides but leaves every tile load to per-thread address arithmetic. Here q, k and v are first
gathered once into ``[B, H, M·P, D]`` with each block's tokens contiguous (one pass over each tensor,
about 0.35 ms per tensor at 704x1280x93 on an H200), so every tile the kernels touch is one dense
``P x D`` box: one tensor-memory-accelerator (TMA) copy on Hopper, or one run of 16-byte loads.

* **Valid tokens first.** Inside a block the real tokens come first and padding slots (blocks cut by
  the grid edge, e.g. h = 30 at 480x832, and chunk sizes that are not a power of two) last, so "is
  this key real" is ``slot < count[block]``: one compare per score, no lookup table.
* **Padding.** Padded key slots get -inf scores. Padded query rows hold a copy of a real token (finite),
  their log-sum-exp is stored as +inf, so in the backward their probabilities are exactly 0 and they
  add nothing to dK/dV; their own outputs are never copied back.
* **Forward**: one program per (query block, batch·head) walks its kept key blocks with an fp32 online
  softmax in base 2 and writes O and the base-2 log-sum-exp.
* **dQ**: the same walk; its prologue computes delta = rowsum(o·do) for the dK/dV kernel.
* **dK/dV**: one program per (key block, batch·head) walks the query blocks that kept it (the selection
  inverted into CSR by :func:`.triton_bsa.invert_selection`), most-loaded programs first per head.

Selection (mean pooling, block scores, top-k) is plain torch and shared with the reference.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .reference import block_tables, num_blocks

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

# Launch parameters per kernel; ``tma`` uses Hopper's tensor memory accelerator for the tile loads
# (falls back to pointer loads before sm_90 or without TensorDescriptor). Chosen on an H200 with
# benchmarks/bench_bsa.py (docs/benchmarks.md).
DEFAULT_CONFIG = {
    "fwd": {"num_warps": 4, "num_stages": 3, "pair": False},
    "dq": {"num_warps": 4, "num_stages": 2},
    "dkdv": {"num_warps": 4, "num_stages": 2},
    "tma": True,
}

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(X, XD, row0, P: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Rows row0 .. row0+P-1 of the 2-D [rows, D] tensor X (or its descriptor XD)."""
    if TMA:
        x = XD.load([row0, 0])
    else:
        r = (row0 + tl.arange(0, P)).to(tl.int64)
        x = tl.load(X + r[:, None] * D + tl.arange(0, D)[None, :])
    return x


@triton.jit
def _store_tile(X, row0, x, P: tl.constexpr, D: tl.constexpr):
    r = (row0 + tl.arange(0, P)).to(tl.int64)
    tl.store(X + r[:, None] * D + tl.arange(0, D)[None, :], x)


@triton.jit
def _query_walk(NSEL, SEL, Mq, Mk, KMAX, P: tl.constexpr):
    """This program's query block: its first row, its kept-block count and list, its head's first key row."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    item = bh * Mq + qb
    return qb, item * P, tl.load(NSEL + item), SEL + item.to(tl.int64) * KMAX, bh * Mk * P


@triton.jit
def _fwd_scores(q, K, KD, CNTK, blk, kbase, lane, P: tl.constexpr, D: tl.constexpr, MASK_K: tl.constexpr,
                TMA: tl.constexpr, PREC: tl.constexpr):
    k = _tile(K, KD, kbase + blk * P, P, D, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK_K:
        s = tl.where(lane[None, :] < tl.load(CNTK + blk), s, float("-inf"))
    return s


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEL, NSEL, CNTQ, CNTK, QD, KD, VD,
                Mq, Mk, KMAX, qk_scale,
                D: tl.constexpr, P: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
                TMA: tl.constexpr, PREC: tl.constexpr, PAIR: tl.constexpr):
    qb, row_q, n, sel, kbase = _query_walk(NSEL, SEL, Mq, Mk, KMAX, P)
    lane = tl.arange(0, P)
    q = _tile(Q, QD, row_q, P, D, TMA)
    m_i = tl.full([P], float("-inf"), tl.float32)
    l_i = tl.zeros([P], tl.float32)
    acc = tl.zeros([P, D], tl.float32)
    start = 0
    if PAIR:  # two kept blocks per step: one softmax rescale of the accumulator per 2·P keys
        for i in range(0, n // 2):
            b0 = tl.load(sel + 2 * i)
            b1 = tl.load(sel + 2 * i + 1)
            s0 = _fwd_scores(q, K, KD, CNTK, b0, kbase, lane, P, D, MASK_K, TMA, PREC)
            s1 = _fwd_scores(q, K, KD, CNTK, b1, kbase, lane, P, D, MASK_K, TMA, PREC)
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)) * qk_scale)
            p0 = tl.exp2(s0 * qk_scale - m_new[:, None])
            p1 = tl.exp2(s1 * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
            v0 = _tile(V, VD, kbase + b0 * P, P, D, TMA)
            v1 = _tile(V, VD, kbase + b1 * P, P, D, TMA)
            acc = tl.dot(p0.to(v0.dtype), v0, acc * alpha[:, None], input_precision=PREC)
            acc = tl.dot(p1.to(v1.dtype), v1, acc, input_precision=PREC)
            m_i = m_new
        start = n // 2 * 2
    blk_next = tl.load(sel + start, mask=start < n, other=0)  # ids one step ahead (see _dq_kernel)
    for i in range(start, n):
        blk = blk_next
        blk_next = tl.load(sel + i + 1, mask=i + 1 < n, other=0)
        s = _fwd_scores(q, K, KD, CNTK, blk, kbase, lane, P, D, MASK_K, TMA, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, VD, kbase + blk * P, P, D, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    _store_tile(O, row_q, (acc / l_i[:, None]).to(O.dtype.element_ty), P, D)
    lse = m_i + tl.log2(l_i)
    if MASK_Q:
        lse = tl.where(lane < tl.load(CNTQ + qb), lse, float("inf"))
    tl.store(LSE + row_q + lane, lse)


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, SEL, NSEL, CNTK, QD, KD, VD, OD, DOD,
               Mq, Mk, KMAX, qk_scale, sm_scale,
               D: tl.constexpr, P: tl.constexpr, MASK_K: tl.constexpr, TMA: tl.constexpr,
               PREC: tl.constexpr):
    qb, row_q, n, sel, kbase = _query_walk(NSEL, SEL, Mq, Mk, KMAX, P)
    lane = tl.arange(0, P)
    q = _tile(Q, QD, row_q, P, D, TMA)
    o = _tile(O, OD, row_q, P, D, TMA)
    do = _tile(DO, DOD, row_q, P, D, TMA)
    lse = tl.load(LSE + row_q + lane)  # +inf on padded rows: their probabilities are 0
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_q + lane, delta)
    dq = tl.zeros([P, D], tl.float32)
    blk_next = tl.load(sel)
    for i in range(0, n):
        blk = blk_next
        blk_next = tl.load(sel + i + 1, mask=i + 1 < n, other=0)
        row_k = kbase + blk * P
        k = _tile(K, KD, row_k, P, D, TMA)
        v = _tile(V, VD, row_k, P, D, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK_K:
            p = tl.where(lane[None, :] < tl.load(CNTK + blk), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    _store_tile(DQ, row_q, (dq * sm_scale).to(DQ.dtype.element_ty), P, D)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, ORDER, OFFS, QIDX, QD, KD, VD, DOD,
                 Mq, Mk, qk_scale, sm_scale,
                 D: tl.constexpr, P: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    item = tl.load(ORDER + tl.program_id(0))  # = bh * Mk + key block
    bh = item // Mk
    lane = tl.arange(0, P)
    row_k = item * P
    k = _tile(K, KD, row_k, P, D, TMA)
    v = _tile(V, VD, row_k, P, D, TMA)
    start = tl.load(OFFS + item)
    end = tl.load(OFFS + item + 1)
    qbase = bh * Mq * P
    dk = tl.zeros([P, D], tl.float32)
    dv = tl.zeros([P, D], tl.float32)
    qb_next = tl.load(QIDX + start, mask=start < end, other=0)
    for j in range(start, end):
        qb = qb_next
        qb_next = tl.load(QIDX + j + 1, mask=j + 1 < end, other=0)
        row_q = qbase + qb * P
        q = _tile(Q, QD, row_q, P, D, TMA)
        lse = tl.load(LSE + row_q + lane)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)  # [keys, queries]
        pt = tl.exp2(st * qk_scale - lse[None, :])
        do = _tile(DO, DOD, row_q, P, D, TMA)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(DELTA + row_q + lane)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    _store_tile(DK, row_k, (dk * sm_scale).to(DK.dtype.element_ty), P, D)
    _store_tile(DV, row_k, dv.to(DV.dtype.element_ty), P, D)


# ---------------------------------------------------------------------------------------------
# host side


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot needs every tile side >= 16


@lru_cache(maxsize=64)
def layout(grid: tuple, chunk: tuple, device_str: str):
    """Block-major layout of a (T, h, w) grid: ``gather`` [M·P] (the raster token each slot copies;
    real tokens first in every block, padding slots copy the block's first token), ``scatter`` [S]
    (the slot of every raster token), ``count`` [M] int32 (real tokens per block) and P (slots per
    block, a power of two)."""
    rows, valid = block_tables(grid, chunk, "cpu")
    M, P0 = rows.shape
    P = _pow2(P0)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    rows, valid = rows.gather(1, order), valid.gather(1, order)
    first = rows[:, :1]
    gather = torch.cat([torch.where(valid, rows, first), first.expand(M, P - P0)], 1)
    valid = torch.cat([valid, torch.zeros(M, P - P0, dtype=torch.bool)], 1)
    scatter = torch.empty(math.prod(grid), dtype=torch.long)
    scatter[gather[valid]] = torch.arange(M * P).view(M, P)[valid]
    count = valid.sum(1, dtype=torch.int32)
    dev = torch.device(device_str)
    return gather.reshape(-1).to(dev), scatter.to(dev), count.to(dev), P, bool((count < P).any())


def to_blocks(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] (any strides) -> contiguous [B, H, M·P, D] in block-major order."""
    return x.index_select(2, gather)


def from_blocks(xb: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """Block-major [B, H, M·P, D] -> raster [B, H, S, D], laid out [B, S, H, D] in memory so the
    DiT's ``transpose(1, 2).reshape(B, S, H·D)`` after attention is free."""
    return xb.transpose(1, 2).index_select(1, scatter).transpose(1, 2)


def _use_tma(config, *xs) -> bool:
    if not config.get("tma") or TensorDescriptor is None:
        return False
    x = xs[0]
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return True  # Triton's interpreter emulates the descriptors (tests)


def _desc(x2d, P, D, tma):
    return TensorDescriptor.from_tensor(x2d, [P, D]) if tma else None


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


class BlockedPlan:
    """Geometry, selection and launch configuration for one call."""

    def __init__(self, q, k, grid_q, grid_k, chunk_q, chunk_k, sel, config=None):
        B, H, _, D = q.shape
        dev = str(q.device)
        self.B, self.H, self.D = B, H, D
        self.gather_q, self.scatter_q, self.count_q, self.pq, self.mask_q = layout(grid_q, chunk_q, dev)
        self.gather_k, self.scatter_k, self.count_k, self.pk, self.mask_k = layout(grid_k, chunk_k, dev)
        if self.pq != self.pk:
            raise ValueError(f"chunks {chunk_q} and {chunk_k} need the same padded block size")
        self.P = self.pq
        self.mq, self.mk = num_blocks(grid_q, chunk_q), num_blocks(grid_k, chunk_k)
        sel = sel.reshape(B * H, self.mq, -1)
        self.kmax = sel.shape[-1]
        self.nsel = (sel >= 0).sum(-1, dtype=torch.int32).contiguous()  # -1 padding sits at row ends
        self.sel = sel.clamp(min=0).to(torch.int32).contiguous()
        self.config = {name: (dict(val) if isinstance(val, dict) else val) for name, val in DEFAULT_CONFIG.items()}
        for name, val in (config or {}).items():
            if name not in self.config:
                raise ValueError(f"config {name}: {val}; known: {DEFAULT_CONFIG}")
            if isinstance(val, dict):
                self.config[name].update(val)
            else:
                self.config[name] = val
        self.sm_scale = 1.0 / math.sqrt(D)
        self._inverse = None

    def inverse(self):
        if self._inverse is None:
            from .triton_bsa import invert_selection

            self._inverse = invert_selection(self.sel, self.nsel, self.mk)
        return self._inverse


def launch_fwd(plan: BlockedPlan, qb, kb, vb):
    """Blocked q/k/v [B, H, M·P, D] -> blocked O and the base-2 LSE [B·H·Mq·P] (+inf on padding)."""
    P, D = plan.P, plan.D
    ob = torch.empty_like(qb)
    lse = torch.empty(qb.shape[0] * qb.shape[1] * qb.shape[2], device=qb.device, dtype=torch.float32)
    tma = _use_tma(plan.config, qb)
    q2, k2, v2 = (t.view(-1, D) for t in (qb, kb, vb))
    cfg = plan.config["fwd"]
    _fwd_kernel[(plan.mq, plan.B * plan.H)](
        q2, k2, v2, ob, lse, plan.sel, plan.nsel, plan.count_q, plan.count_k,
        _desc(q2, P, D, tma), _desc(k2, P, D, tma), _desc(v2, P, D, tma),
        plan.mq, plan.mk, plan.kmax, plan.sm_scale * _LOG2E,
        D=D, P=P, MASK_Q=plan.mask_q, MASK_K=plan.mask_k, TMA=tma, PREC=_prec(qb.dtype), PAIR=cfg["pair"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return ob, lse


def launch_dq(plan: BlockedPlan, qb, kb, vb, ob, dob, lse):
    P, D = plan.P, plan.D
    dqb = torch.empty_like(qb)
    delta = torch.empty_like(lse)
    tma = _use_tma(plan.config, qb)
    q2, k2, v2, o2, do2 = (t.view(-1, D) for t in (qb, kb, vb, ob, dob))
    cfg = plan.config["dq"]
    _dq_kernel[(plan.mq, plan.B * plan.H)](
        q2, k2, v2, o2, do2, dqb, lse, delta, plan.sel, plan.nsel, plan.count_k,
        *(_desc(t, P, D, tma) for t in (q2, k2, v2, o2, do2)),
        plan.mq, plan.mk, plan.kmax, plan.sm_scale * _LOG2E, plan.sm_scale,
        D=D, P=P, MASK_K=plan.mask_k, TMA=tma, PREC=_prec(qb.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dqb, delta


def launch_dkdv(plan: BlockedPlan, qb, kb, vb, dob, lse, delta):
    P, D = plan.P, plan.D
    dkb, dvb = torch.empty_like(kb), torch.empty_like(vb)
    order, offs, qidx = plan.inverse()
    tma = _use_tma(plan.config, qb)
    q2, k2, v2, do2 = (t.view(-1, D) for t in (qb, kb, vb, dob))
    cfg = plan.config["dkdv"]
    _dkdv_kernel[(plan.B * plan.H * plan.mk,)](
        q2, k2, v2, do2, dkb, dvb, lse, delta, order, offs, qidx,
        *(_desc(t, P, D, tma) for t in (q2, k2, v2, do2)),
        plan.mq, plan.mk, plan.sm_scale * _LOG2E, plan.sm_scale,
        D=D, P=P, TMA=tma, PREC=_prec(qb.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dkb, dvb


# The kernels run inside torch custom ops, so torch.compile treats attention as one opaque node (a
# whole compiled block keeps BSA) and selective activation checkpointing can name it. The forward op
# also returns the blocked tensors the backward needs; they are not differentiable outputs.
def _plan(q, k, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    return BlockedPlan(q, k, tuple(grid_q), tuple(grid_k), tuple(chunk_q), tuple(chunk_k), sel,
                       json.loads(config) if config else None)


@torch.library.custom_op("longcat_nb::bsa_forward", mutates_args=())
def _bsa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, grid_q: list[int],
                 grid_k: list[int], chunk_q: list[int], chunk_k: list[int], config: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, sel, grid_q, grid_k, chunk_q, chunk_k, config)
    qb, kb, vb = to_blocks(q, plan.gather_q), to_blocks(k, plan.gather_k), to_blocks(v, plan.gather_k)
    ob, lse = launch_fwd(plan, qb, kb, vb)
    return from_blocks(ob, plan.scatter_q), qb, kb, vb, ob, lse


@_bsa_forward.register_fake
def _(q, k, v, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    B, H, Sq, D = q.shape
    P = _pow2(math.prod(chunk_q))
    rq, rk = num_blocks(grid_q, chunk_q) * P, num_blocks(grid_k, chunk_k) * P
    o = q.new_empty(B, Sq, H, D).transpose(1, 2)
    return (o, q.new_empty(B, H, rq, D), k.new_empty(B, H, rk, D), v.new_empty(B, H, rk, D),
            q.new_empty(B, H, rq, D), q.new_empty(B * H * rq, dtype=torch.float32))


@torch.library.custom_op("longcat_nb::bsa_backward", mutates_args=())
def _bsa_backward(do: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, ob: torch.Tensor,
                  lse: torch.Tensor, sel: torch.Tensor, grid_q: list[int], grid_k: list[int], chunk_q: list[int],
                  chunk_k: list[int], config: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(qb, kb, sel, grid_q, grid_k, chunk_q, chunk_k, config)
    dob = to_blocks(do, plan.gather_q)
    dqb, delta = launch_dq(plan, qb, kb, vb, ob, dob, lse)
    dkb, dvb = launch_dkdv(plan, qb, kb, vb, dob, lse, delta)
    return tuple(from_blocks(x, s) for x, s in ((dqb, plan.scatter_q), (dkb, plan.scatter_k), (dvb, plan.scatter_k)))


@_bsa_backward.register_fake
def _(do, qb, kb, vb, ob, lse, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    B, H, _, D = qb.shape
    sq, sk = math.prod(grid_q), math.prod(grid_k)
    return tuple(x.new_empty(B, s, H, D).transpose(1, 2) for x, s in ((qb, sq), (kb, sk), (vb, sk)))


def _setup_context(ctx, inputs, output):
    _, _, _, sel, grid_q, grid_k, chunk_q, chunk_k, config = inputs
    _, qb, kb, vb, ob, lse = output
    ctx.mark_non_differentiable(qb, kb, vb, ob, lse)
    ctx.save_for_backward(qb, kb, vb, ob, lse, sel)
    ctx.args = (grid_q, grid_k, chunk_q, chunk_k, config)


def _backward(ctx, do, *_unused):
    qb, kb, vb, ob, lse, sel = ctx.saved_tensors
    dq, dk, dv = _bsa_backward(do, qb, kb, vb, ob, lse, sel, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_bsa_forward.register_autograd(_backward, setup_context=_setup_context)


def blocked_bsa_attention(q, k, v, grid_q, grid_k, sel, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), config=None):
    """Block-sparse attention of q [B, H, Sq, D] and k/v [B, H, Sk, D] (raster token order, any
    strides) for a fixed selection ``sel`` [B, H, Mq, K] (-1 = no block, only at row ends).
    ``config`` overrides entries of :data:`DEFAULT_CONFIG`. The output is laid out [B, Sq, H, D] in
    memory (a transposed view is returned)."""
    D = q.shape[-1]
    if math.prod(grid_q) != q.shape[2] or math.prod(grid_k) != k.shape[2]:
        raise ValueError(f"grids {tuple(grid_q)}, {tuple(grid_k)} do not match Sq={q.shape[2]}, Sk={k.shape[2]}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernels need a power of two >= 16")
    if _pow2(math.prod(chunk_q)) != _pow2(math.prod(chunk_k)):
        raise ValueError(f"chunks {tuple(chunk_q)} and {tuple(chunk_k)} need the same padded block size")
    cfg = json.dumps(config, sort_keys=True) if config else ""
    return _bsa_forward(q, k, v, sel, list(grid_q), list(grid_k), list(chunk_q), list(chunk_k), cfg)[0]
