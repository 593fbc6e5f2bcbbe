"""Block-sparse attention kernels over block-major copies of the tensors walked in the inner loops
(spec §3): forward and backward.

Why copies: the raster kernels (:mod:`.triton_bsa`) gather every tile row by row, which works for any
strides but leaves each tile load to per-thread address arithmetic. A tensor that an inner loop walks
(K and V in the forward and dQ walks, Q and dO in the dK/dV walk) is first gathered once into
``[B, H, M·P, D]`` with each block's tokens contiguous, so every tile the loops touch is one dense
``P x D`` box: one tensor-memory-accelerator (TMA) copy on Hopper, or one run of 16-byte loads. What a
program reads or writes once (its own Q, O, dO rows in the forward and dQ kernels, its own K, V, dK,
dV rows in the dK/dV kernel) stays in raster layout, read and written through the block's row list:
four copies per forward + backward instead of eight (measured on an H200 at 704x1280x93: the eight
copies of the first version cost 10.7 of its 80 ms).

* **Real tokens first.** Inside a block the real tokens come first and padding slots (blocks cut by
  the grid edge, e.g. h = 30 at 480x832, and chunk sizes that are not a power of two) last, so "is
  this key real" is ``slot < count[block]``: one compare per score, no lookup table.
* **Padding.** Padded key slots get -inf scores. Padded query slots hold a copy of a real token
  (finite); their log-sum-exp is stored as +inf, so in the backward their probabilities are exactly
  0 and they add nothing to dK/dV; their outputs are never stored.
* **Forward**: one program per (query block, batch·head) walks its kept key blocks with an fp32 online
  softmax in base 2 and writes O (raster) and the base-2 log-sum-exp (block-major slots).
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

# Launch parameters per kernel; ``tma`` uses Hopper's tensor memory accelerator for the block-major
# tile loads (pointer loads before sm_90 or without TensorDescriptor). Chosen on an H200 with
# benchmarks/bench_bsa.py (docs/benchmarks.md): 4 warps beat 8 for every kernel (fwd 17.6 vs
# 26.6 ms, dq 22.0 vs 37.1, dkdv 27.3 vs 55.0 at 704x1280x93), 3 stages for the forward, 2 for the
# backward; TMA and pointer loads are within 3%.
DEFAULT_CONFIG = {
    "fwd": {"num_warps": 4, "num_stages": 3},
    "dq": {"num_warps": 4, "num_stages": 2},
    "dkdv": {"num_warps": 4, "num_stages": 2},
    "gather": {"num_warps": 4},
    "tma": True,
}

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(X, XD, row0, P: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Rows row0 .. row0+P-1 of a block-major 2-D [rows, D] tensor X (or its descriptor XD)."""
    if TMA:
        x = XD.load([row0, 0])
    else:
        r = (row0 + tl.arange(0, P)).to(tl.int64)
        x = tl.load(X + r[:, None] * D + tl.arange(0, D)[None, :])
    return x


@triton.jit
def _raster_ptrs(X, sb, sh, ss, b, h, rows, D: tl.constexpr):
    """Pointers to rows ``rows`` (raster token indices) of X[b, h] with strides (sb, sh, ss, 1)."""
    return X + b * sb + h * sh + rows.to(tl.int64)[:, None] * ss + tl.arange(0, D)[None, :]


@triton.jit
def _gather_kernel(X, Y, G, sxb, sxh, sxs, H, M, D: tl.constexpr, P: tl.constexpr):
    """Y[b, h, m·P + i] = X[b, h, G[m·P + i]]: one block of P rows per program."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    lane = tl.arange(0, P)
    rows = tl.load(G + m * P + lane)
    x = tl.load(_raster_ptrs(X, sxb, sxh, sxs, (bh // H).to(tl.int64), (bh % H).to(tl.int64), rows, D))
    out = (bh.to(tl.int64) * M + m) * P + lane
    tl.store(Y + out[:, None] * D + tl.arange(0, D)[None, :], x)


@triton.jit
def _query_walk(NSEL, SEL, GQ, Mq, Mk, KMAX, H, P: tl.constexpr):
    """This program's query block: batch, head, raster rows of its slots, first slot row, its
    kept-block count and list, and its head's first key slot row."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    item = bh * Mq + qb
    rows = tl.load(GQ + qb * P + tl.arange(0, P))
    return ((bh // H).to(tl.int64), (bh % H).to(tl.int64), rows, item * P, tl.load(NSEL + item),
            SEL + item.to(tl.int64) * KMAX, bh * Mk * P)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEL, NSEL, GQ, CNTQ, CNTK, KD, VD,
                sqb, sqh, sqs, sob, soh, sos,
                H, Mq, Mk, KMAX, qk_scale,
                D: tl.constexpr, P: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
                TMA: tl.constexpr, PREC: tl.constexpr):
    b, h, rows, row_q, n, sel, kbase = _query_walk(NSEL, SEL, GQ, Mq, Mk, KMAX, H, P)
    lane = tl.arange(0, P)
    q = tl.load(_raster_ptrs(Q, sqb, sqh, sqs, b, h, rows, D))
    m_i = tl.full([P], float("-inf"), tl.float32)
    l_i = tl.zeros([P], tl.float32)
    acc = tl.zeros([P, D], tl.float32)
    blk_next = tl.load(sel)  # ids one step ahead, so the next tile's copy need not wait on them
    for i in range(0, n):
        blk = blk_next
        blk_next = tl.load(sel + i + 1, mask=i + 1 < n, other=0)
        k = _tile(K, KD, kbase + blk * P, P, D, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASK_K:
            s = tl.where(lane[None, :] < tl.load(CNTK + blk), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, VD, kbase + blk * P, P, D, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    lse = m_i + tl.log2(l_i)
    if MASK_Q:
        real = lane < tl.load(CNTQ + tl.program_id(0))
        tl.store(_raster_ptrs(O, sob, soh, sos, b, h, rows, D), out, mask=real[:, None])
        lse = tl.where(real, lse, float("inf"))
    else:
        tl.store(_raster_ptrs(O, sob, soh, sos, b, h, rows, D), out)
    tl.store(LSE + row_q + lane, lse)


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, SEL, NSEL, GQ, CNTQ, CNTK, KD, VD,
               sqb, sqh, sqs, sob, soh, sos, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
               H, Mq, Mk, KMAX, qk_scale, sm_scale,
               D: tl.constexpr, P: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
               TMA: tl.constexpr, PREC: tl.constexpr):
    b, h, rows, row_q, n, sel, kbase = _query_walk(NSEL, SEL, GQ, Mq, Mk, KMAX, H, P)
    lane = tl.arange(0, P)
    q = tl.load(_raster_ptrs(Q, sqb, sqh, sqs, b, h, rows, D))
    o = tl.load(_raster_ptrs(O, sob, soh, sos, b, h, rows, D))
    do = tl.load(_raster_ptrs(DO, sdob, sdoh, sdos, b, h, rows, D))
    lse = tl.load(LSE + row_q + lane)  # +inf on padded slots: their probabilities are 0
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_q + lane, delta)
    dq = tl.zeros([P, D], tl.float32)
    blk_next = tl.load(sel)
    for i in range(0, n):
        blk = blk_next
        blk_next = tl.load(sel + i + 1, mask=i + 1 < n, other=0)
        k = _tile(K, KD, kbase + blk * P, P, D, TMA)
        v = _tile(V, VD, kbase + blk * P, P, D, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK_K:
            p = tl.where(lane[None, :] < tl.load(CNTK + blk), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    dq = (dq * sm_scale).to(DQ.dtype.element_ty)
    if MASK_Q:
        real = lane < tl.load(CNTQ + tl.program_id(0))
        tl.store(_raster_ptrs(DQ, sdqb, sdqh, sdqs, b, h, rows, D), dq, mask=real[:, None])
    else:
        tl.store(_raster_ptrs(DQ, sdqb, sdqh, sdqs, b, h, rows, D), dq)


@triton.jit
def _dkdv_kernel(QB, KB, VB, DOB, DK, DV, LSE, DELTA, ORDER, OFFS, QIDX, GK, CNTK, QD, KD, VD, DOD,
                 sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                 H, Mq, Mk, qk_scale, sm_scale,
                 D: tl.constexpr, P: tl.constexpr, MASK_K: tl.constexpr, TMA: tl.constexpr,
                 PREC: tl.constexpr):
    item = tl.load(ORDER + tl.program_id(0))  # = bh * Mk + key block
    bh = item // Mk
    kblk = item - bh * Mk
    lane = tl.arange(0, P)
    k = _tile(KB, KD, item * P, P, D, TMA)
    v = _tile(VB, VD, item * P, P, D, TMA)
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
        q = _tile(QB, QD, row_q, P, D, TMA)
        lse = tl.load(LSE + row_q + lane)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)  # [keys, queries]
        pt = tl.exp2(st * qk_scale - lse[None, :])
        do = _tile(DOB, DOD, row_q, P, D, TMA)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(DELTA + row_q + lane)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.load(GK + kblk * P + lane)
    dk = (dk * sm_scale).to(DK.dtype.element_ty)
    dv = dv.to(DV.dtype.element_ty)
    if MASK_K:  # padded key slots copy a real token: never store them over it
        real = (lane < tl.load(CNTK + kblk))[:, None]
        tl.store(_raster_ptrs(DK, sdkb, sdkh, sdks, b, h, rows, D), dk, mask=real)
        tl.store(_raster_ptrs(DV, sdvb, sdvh, sdvs, b, h, rows, D), dv, mask=real)
    else:
        tl.store(_raster_ptrs(DK, sdkb, sdkh, sdks, b, h, rows, D), dk)
        tl.store(_raster_ptrs(DV, sdvb, sdvh, sdvs, b, h, rows, D), dv)


# ---------------------------------------------------------------------------------------------
# host side


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot needs every tile side >= 16


@lru_cache(maxsize=64)
def layout(grid: tuple, chunk: tuple, device_str: str):
    """Block-major layout of a (T, h, w) grid: ``gather`` [M·P] int32 (the raster token each slot
    holds; real tokens first in every block, padding slots repeat the block's first token),
    ``count`` [M] int32 (real tokens per block), P (slots per block, a power of two) and whether any
    block has padding."""
    rows, valid = block_tables(grid, chunk, "cpu")
    M, P0 = rows.shape
    P = _pow2(P0)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    rows, valid = rows.gather(1, order), valid.gather(1, order)
    first = rows[:, :1]
    gather = torch.cat([torch.where(valid, rows, first), first.expand(M, P - P0)], 1)
    count = valid.sum(1, dtype=torch.int32)
    dev = torch.device(device_str)
    return gather.reshape(-1).to(torch.int32).to(dev), count.to(dev), P, bool((count < P).any())


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _prep(x):
    # the kernels need unit stride along D only; batch/head/token strides are free
    return x if x.stride(-1) == 1 else x.contiguous()


def to_blocks(x: torch.Tensor, gather: torch.Tensor, P: int, config=None) -> torch.Tensor:
    """[B, H, S, D] (any strides, unit stride along D) -> contiguous [B, H, M·P, D] block-major."""
    B, H, _, D = x.shape
    M = gather.numel() // P
    y = torch.empty(B, H, M * P, D, device=x.device, dtype=x.dtype)
    _gather_kernel[(M, B * H)](x, y, gather, *_strides(x), H, M, D=D, P=P,
                               num_warps=(config or DEFAULT_CONFIG)["gather"]["num_warps"])
    return y


def _use_tma(config, x) -> bool:
    if not config.get("tma") or TensorDescriptor is None:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return True  # Triton's interpreter emulates the descriptors (tests)


def _desc(x, P, D, tma):
    return TensorDescriptor.from_tensor(x.view(-1, D), [P, D]) if tma else None


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


class BlockedPlan:
    """Geometry, selection and launch configuration for one call."""

    def __init__(self, q, k, grid_q, grid_k, chunk_q, chunk_k, sel, config=None):
        B, H, _, D = q.shape
        dev = str(q.device)
        self.B, self.H, self.D = B, H, D
        self.gather_q, self.count_q, self.pq, self.mask_q = layout(grid_q, chunk_q, dev)
        self.gather_k, self.count_k, self.pk, self.mask_k = layout(grid_k, chunk_k, dev)
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
                if set(val) - set(self.config[name]):
                    raise ValueError(f"config {name}: {val}; known keys: {sorted(self.config[name])}")
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


def launch_fwd(plan: BlockedPlan, q, kb, vb):
    """q [B, H, Sq, D] raster, kb/vb block-major -> O (laid out [B, Sq, H, D], returned as the
    [B, H, Sq, D] view) and the base-2 LSE per query slot [B·H·Mq·P] (+inf on padding)."""
    B, H, Sq, D = q.shape
    P = plan.P
    o = torch.empty(B, Sq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * H * plan.mq * P, device=q.device, dtype=torch.float32)
    tma = _use_tma(plan.config, q)
    cfg = plan.config["fwd"]
    _fwd_kernel[(plan.mq, B * H)](
        q, kb, vb, o, lse, plan.sel, plan.nsel, plan.gather_q, plan.count_q, plan.count_k,
        _desc(kb, P, D, tma), _desc(vb, P, D, tma), *_strides(q), *_strides(o),
        H, plan.mq, plan.mk, plan.kmax, plan.sm_scale * _LOG2E,
        D=D, P=P, MASK_Q=plan.mask_q, MASK_K=plan.mask_k, TMA=tma, PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def launch_dq(plan: BlockedPlan, q, kb, vb, o, do, lse):
    """dQ (raster, like q) and delta = rowsum(o·do) per query slot for the dK/dV kernel."""
    B, H, Sq, D = q.shape
    P = plan.P
    dq = torch.empty(B, Sq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    delta = torch.empty_like(lse)
    tma = _use_tma(plan.config, q)
    cfg = plan.config["dq"]
    _dq_kernel[(plan.mq, B * H)](
        q, kb, vb, o, do, dq, lse, delta, plan.sel, plan.nsel, plan.gather_q, plan.count_q, plan.count_k,
        _desc(kb, P, D, tma), _desc(vb, P, D, tma),
        *_strides(q), *_strides(o), *_strides(do), *_strides(dq),
        H, plan.mq, plan.mk, plan.kmax, plan.sm_scale * _LOG2E, plan.sm_scale,
        D=D, P=P, MASK_Q=plan.mask_q, MASK_K=plan.mask_k, TMA=tma, PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, delta


def launch_dkdv(plan: BlockedPlan, qb, kb, vb, dob, lse, delta, sk):
    """dK, dV (raster [B, H, Sk, D], laid out [B, Sk, H, D]) from block-major q, k, v, do."""
    B, H, _, D = kb.shape
    P = plan.P
    dk = torch.empty(B, sk, H, D, device=kb.device, dtype=kb.dtype).transpose(1, 2)
    dv = torch.empty_like(dk)
    order, offs, qidx = plan.inverse()
    tma = _use_tma(plan.config, kb)
    cfg = plan.config["dkdv"]
    _dkdv_kernel[(B * H * plan.mk,)](
        qb, kb, vb, dob, dk, dv, lse, delta, order, offs, qidx, plan.gather_k, plan.count_k,
        *(_desc(t, P, D, tma) for t in (qb, kb, vb, dob)), *_strides(dk), *_strides(dv),
        H, plan.mq, plan.mk, plan.sm_scale * _LOG2E, plan.sm_scale,
        D=D, P=P, MASK_K=plan.mask_k, TMA=tma, PREC=_prec(kb.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dk, dv


# The kernels run inside torch custom ops, so torch.compile treats attention as one opaque node (a
# whole compiled block keeps BSA) and selective activation checkpointing can name it. The forward op
# also returns the block-major K, V and the LSE the backward needs; they are not differentiable.
def _plan(q, k, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    return BlockedPlan(q, k, tuple(grid_q), tuple(grid_k), tuple(chunk_q), tuple(chunk_k), sel,
                       json.loads(config) if config else None)


@torch.library.custom_op("longcat_nb::bsa_forward", mutates_args=())
def _bsa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, grid_q: list[int],
                 grid_k: list[int], chunk_q: list[int], chunk_k: list[int], config: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, sel, grid_q, grid_k, chunk_q, chunk_k, config)
    kb = to_blocks(_prep(k), plan.gather_k, plan.P, plan.config)
    vb = to_blocks(_prep(v), plan.gather_k, plan.P, plan.config)
    o, lse = launch_fwd(plan, _prep(q), kb, vb)
    return o, kb, vb, lse


@_bsa_forward.register_fake
def _(q, k, v, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    B, H, Sq, D = q.shape
    P = _pow2(math.prod(chunk_q))
    rq, rk = num_blocks(grid_q, chunk_q) * P, num_blocks(grid_k, chunk_k) * P
    return (q.new_empty(B, Sq, H, D).transpose(1, 2), k.new_empty(B, H, rk, D), v.new_empty(B, H, rk, D),
            q.new_empty(B * H * rq, dtype=torch.float32))


@torch.library.custom_op("longcat_nb::bsa_backward", mutates_args=())
def _bsa_backward(do: torch.Tensor, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, sel: torch.Tensor, grid_q: list[int], grid_k: list[int], chunk_q: list[int],
                  chunk_k: list[int], config: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, kb, sel, grid_q, grid_k, chunk_q, chunk_k, config)
    q, do = _prep(q), _prep(do)
    dq, delta = launch_dq(plan, q, kb, vb, o, do, lse)
    qb = to_blocks(q, plan.gather_q, plan.P, plan.config)
    dob = to_blocks(do, plan.gather_q, plan.P, plan.config)
    dk, dv = launch_dkdv(plan, qb, kb, vb, dob, lse, delta, math.prod(grid_k))
    return dq, dk, dv


@_bsa_backward.register_fake
def _(do, q, kb, vb, o, lse, sel, grid_q, grid_k, chunk_q, chunk_k, config):
    B, H, Sq, D = q.shape
    sk = math.prod(grid_k)
    return (q.new_empty(B, Sq, H, D).transpose(1, 2), kb.new_empty(B, sk, H, D).transpose(1, 2),
            vb.new_empty(B, sk, H, D).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    q, _, _, sel, grid_q, grid_k, chunk_q, chunk_k, config = inputs
    o, kb, vb, lse = output
    ctx.mark_non_differentiable(kb, vb, lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the block-major outputs
    ctx.save_for_backward(q, kb, vb, o, lse, sel)
    ctx.args = (grid_q, grid_k, chunk_q, chunk_k, config)


def _backward(ctx, do, *_unused):
    q, kb, vb, o, lse, sel = ctx.saved_tensors
    dq, dk, dv = _bsa_backward(do, q, kb, vb, o, lse, sel, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_bsa_forward.register_autograd(_backward, setup_context=_setup_context)


def blocked_bsa_attention(q, k, v, grid_q, grid_k, sel, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), config=None):
    """Block-sparse attention of q [B, H, Sq, D] and k/v [B, H, Sk, D] (raster token order, any
    strides) for a fixed selection ``sel`` [B, H, Mq, K] (-1 = no block, only at row ends).
    ``config`` overrides entries of :data:`DEFAULT_CONFIG`. The output is laid out [B, Sq, H, D] in
    memory (a transposed view is returned), so ``o.transpose(1, 2).reshape(B, Sq, H·D)`` is free."""
    D = q.shape[-1]
    if math.prod(grid_q) != q.shape[2] or math.prod(grid_k) != k.shape[2]:
        raise ValueError(f"grids {tuple(grid_q)}, {tuple(grid_k)} do not match Sq={q.shape[2]}, Sk={k.shape[2]}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernels need a power of two >= 16")
    if _pow2(math.prod(chunk_q)) != _pow2(math.prod(chunk_k)):
        raise ValueError(f"chunks {tuple(chunk_q)} and {tuple(chunk_k)} need the same padded block size")
    cfg = json.dumps(config, sort_keys=True) if config else ""
    return _bsa_forward(q, k, v, sel, list(grid_q), list(grid_k), list(chunk_q), list(chunk_k), cfg)[0]
