"""Dense attention with 8-bit operands on GPUs with 8-bit tensor cores (Ada, Hopper and newer):
Q·Kᵀ in int8, P·V in float8 e4m3 (or bf16), softmax and accumulation in fp32.

Why: at 480x832x93 the DiT's 48 self-attentions are more than half of a bf16 sampling step, and
they already run at the bf16 kernel's roof (cuDNN, docs/benchmarks.md); 8-bit tensor cores have
twice the rate. :func:`quant8_attention` is differentiable: a training step runs this forward and a
bf16 backward, either cuDNN's fused one fed this forward's output and log-sum-exp (``backward="cudnn"``:
0.96x cuDNN's own forward+backward at the kernel level, its gradients as accurate) or our Triton one
(``"triton"``: correct, more accurate in dQ, but slower; docs/benchmarks.md). In the DiT the cudnn
one's gradients were wrong until its operands got layouts of their own (:func:`_private_layout`;
checked on an H200, docs/benchmarks.md). It pays only on long clips, so the DiT trains
through SDPA unless asked (attention.set_quant8_training).

Quantization (one Triton pass, :func:`quantize`), chosen so the rounding stays small where it matters:

* **Q**: int8 with one scale per token (its absolute maximum / 127), so no token loses precision to
  another; the softmax scale and log2(e) are folded into it. int8, not e4m3: with 3 mantissa bits
  e4m3 puts ~4% of noise on every element, int8 under 1% of the row's maximum.
* **K**: the mean over tokens is subtracted first. That leaves every query's softmax unchanged
  (q·(k - m) = q·k - q·m, a constant per query) and takes out the offset shared by all keys, so the
  scale covers only their spread. int8, one scale per block of 128 keys.
* **V**: the mean over tokens is subtracted (added back to the output, exact since each row of the
  softmax sums to 1), then e4m3 with one scale per channel, applied to the output at the end.
* **P**: exp2 of the running-max-shifted scores times 448, i.e. in [0, 448], which e4m3 spans
  without a per-tile scale; the factor cancels against the row sum. Each tile's P·V starts from a
  fresh accumulator and is added to the fp32 output accumulator, so the tensor cores' reduced-precision
  fp8 accumulation never spans more than one tile.

The kernels run inside a torch custom op (``longcat_nb::attention_quant8``), so a compiled block keeps
attention as one node; the quantization is a Triton kernel too, so eager mode makes no fp32 copies.
"""
from __future__ import annotations

import json
import math

import torch

try:
    import triton
    import triton.language as tl

    # the BSA kernels' host helpers: TMA only on sm_90+ (or the interpreter), unit stride along D
    from .bsa.blocked import TensorDescriptor, _prep, _use_tma
except ImportError:  # pragma: no cover - CPU machines without Triton never reach the kernels
    triton = None

FP8_MAX = 448.0  # largest finite float8 e4m3fn
QUANT_BLOCK = 128  # tokens per K scale (and per quantization program)
_LOG2E = 1.4426950408889634

# Launch parameters (block_m and block_n divide QUANT_BLOCK); ``tma`` loads the tiles through
# Hopper's tensor memory accelerator; ``pv`` = bf16 keeps P·V in bf16 (int8 Q·Kᵀ only: more accurate
# on unstructured inputs, but slower than cuDNN). Chosen on an H200 with
# ``benchmarks/bench_dit.py --cases attention8`` (docs/benchmarks.md): at 2x37440 tokens, 32
# heads, forward 61.1 ms against cuDNN's 79.8 (64x128 tiles, 4 warps, 3 stages; TMA 63.7, 128x128
# tiles with 8 warps 70.9, 4 stages 89.7, pv bf16 102.4).
DEFAULT_CONFIG = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3, "tma": False,
                  "pv": "fp8",
                  # the backward (training): the dQ walk over key tiles and the dK/dV walk over query
                  # tiles; ``dv`` = bf16 keeps Pᵀ·dO in bf16
                  "dq": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
                  "dkdv": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
                  "dv": "fp8",
                  # triton: our kernels above (int8 Q·Kᵀ recompute, dV per ``dv``); measured correct, but
                  # 174-353 ms against cuDNN's 104 at 37440 tokens (docs/benchmarks.md).
                  # cudnn: cuDNN's fused bf16 backward fed this forward's O and log-sum-exp: 106 ms, errors
                  # those of cuDNN's own backward (docs/benchmarks.md); in layouts of its own
                  # (_private_layout). The DiT's training steps take it only when asked
                  # (attention.set_quant8_training)
                  "backward": "triton"}


def available(device) -> bool:
    """8-bit tensor-core attention can run on this device (CUDA, compute capability 8.9+, Triton)."""
    device = torch.device(device)
    return (triton is not None and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


if triton is not None:

    @triton.jit
    def _to_int8(x):
        """Round half away from zero (|x| <= 127 here), then int8."""
        return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)

    @triton.jit
    def _quant_q_kernel(Q, Q8, QS, sqb, sqh, sqs, H, S, SP, qk_scale, D: tl.constexpr, BLOCK: tl.constexpr):
        """Q -> int8 with a scale per token, the softmax scale (base 2) folded in; zero rows past S."""
        bh = tl.program_id(1).to(tl.int64)
        rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        real = rows < S
        cols = tl.arange(0, D)
        q = tl.load(Q + (bh // H) * sqb + (bh % H) * sqh + rows[:, None] * sqs + cols[None, :],
                    mask=real[:, None], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(q), 1), 1e-30)
        tl.store(Q8 + (bh * SP + rows)[:, None] * D + cols[None, :], _to_int8(q * (127.0 / amax)[:, None]))
        tl.store(QS + bh * SP + rows, amax / 127.0 * qk_scale)

    @triton.jit
    def _quant_kv_kernel(K, V, K8, KS, V8T, KMEAN, VMEAN, VSCALE, skb, skh, sks, svb, svh, svs,
                         H, S, SP, NB, D: tl.constexpr, BLOCK: tl.constexpr, WITH_V: tl.constexpr):
        """K - mean -> int8 with a scale per block of BLOCK keys; (V - mean) / scale per channel ->
        e4m3, stored transposed [D, SP] (the 8-bit tensor cores want P·V's right operand contiguous
        along the reduced token axis); zero rows past S."""
        blk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        rows = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        real = rows < S
        cols = tl.arange(0, D)
        mean = tl.load(KMEAN + bh * D + cols)
        k = tl.load(K + b * skb + h * skh + rows[:, None] * sks + cols[None, :], mask=real[:, None], other=0.0)
        k = tl.where(real[:, None], k.to(tl.float32) - mean[None, :], 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-30)
        tl.store(K8 + (bh * SP + rows)[:, None] * D + cols[None, :], _to_int8(k * (127.0 / amax)))
        tl.store(KS + bh * NB + blk, amax / 127.0)
        if WITH_V:
            vs = tl.load(VSCALE + bh * D + cols)
            vm = tl.load(VMEAN + bh * D + cols)
            v = tl.load(V + b * svb + h * svh + rows[:, None] * svs + cols[None, :], mask=real[:, None],
                        other=0.0)
            v = tl.where(real[:, None], v.to(tl.float32) - vm[None, :], 0.0)
            tl.store(V8T + (bh * D + cols)[None, :] * SP + rows[:, None], (v / vs[None, :]).to(tl.float8e4nv))

    @triton.jit
    def _tile(X, XD, r0, c0, ld, R: tl.constexpr, C: tl.constexpr, TMA: tl.constexpr):
        """The [R, C] box at (r0, c0) of a contiguous 2-D tensor X with row length ld (or its descriptor)."""
        if TMA:
            x = XD.load([r0, c0])
        else:
            r = (r0 + tl.arange(0, R)).to(tl.int64)
            x = tl.load(X + r[:, None] * ld + c0 + tl.arange(0, C)[None, :])
        return x

    @triton.jit
    def _step(q, qs, m_i, l_i, acc, K8, KD, KS, V8T, VD, V, svb, svh, svs, b, h, bh, n0, S, SP, NB,
              D: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr, MASK: tl.constexpr,
              TMA: tl.constexpr, PV_FP8: tl.constexpr):
        k = _tile(K8, KD, bh * SP + n0, 0, D, BLOCK_N, D, TMA)
        s = tl.dot(q, tl.trans(k)).to(tl.float32)  # int8 x int8 -> int32 [BLOCK_M, BLOCK_N]
        c = qs * tl.load(KS + bh.to(tl.int64) * NB + n0 // QBLOCK)  # base-2 softmax scale of each row
        if MASK:
            s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        # p in [0, 448]: e4m3's range without a tile scale; 8.807 = log2(448) cancels in acc / l
        p = tl.exp2(s * c[:, None] - (m_new - 8.807354922057604)[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            vt = _tile(V8T, VD, bh * D, n0, SP, D, BLOCK_N, TMA)  # [D, BLOCK_N]
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
        else:  # bf16 P·V straight from the raster V
            r = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            v = tl.load(V + b * svb + h * svh + r[:, None] * svs + tl.arange(0, D)[None, :],
                        mask=(r < S)[:, None], other=0.0)
            pv = tl.dot(p.to(v.dtype), v)  # p <= 448 is exact enough in bf16; the 448 cancels in acc / l
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _fwd_kernel(Q8, QD, QS, K8, KD, KS, V8T, VD, VMEAN, VSCALE, V, O, LSE, MROW,
                    svb, svh, svs, sob, soh, sos,
                    H, SQ, SPQ, S, SP, NB,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr,
                    TMA: tl.constexpr, PV_FP8: tl.constexpr, STATS: tl.constexpr):
        pid = tl.program_id(0)
        bh32 = tl.program_id(1)  # descriptor coordinates are 32-bit
        bh = bh32.to(tl.int64)
        b = bh // H
        h = bh % H
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _tile(Q8, QD, bh32 * SPQ + pid * BLOCK_M, 0, D, BLOCK_M, D, TMA)
        qs = tl.load(QS + bh * SPQ + rows)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = S // BLOCK_N
        for j in range(0, n_full):
            m_i, l_i, acc = _step(q, qs, m_i, l_i, acc, K8, KD, KS, V8T, VD, V, svb, svh, svs, b, h, bh32,
                                  j * BLOCK_N, S, SP, NB, D, BLOCK_N, QBLOCK, False, TMA, PV_FP8)
        if n_full * BLOCK_N < S:
            m_i, l_i, acc = _step(q, qs, m_i, l_i, acc, K8, KD, KS, V8T, VD, V, svb, svh, svs, b, h, bh32,
                                  n_full * BLOCK_N, S, SP, NB, D, BLOCK_N, QBLOCK, True, TMA, PV_FP8)
        cols = tl.arange(0, D)
        if PV_FP8:  # scale back per channel, add the mean taken out of V
            acc = acc * tl.load(VSCALE + bh * D + cols)[None, :]
            out = acc / l_i[:, None] + tl.load(VMEAN + bh * D + cols)[None, :]
        else:
            out = acc / l_i[:, None]
        out = out.to(O.dtype.element_ty)
        ptrs = O + b * sob + h * soh + rows.to(tl.int64)[:, None] * sos + cols[None, :]
        tl.store(ptrs, out, mask=(rows < SQ)[:, None])
        if STATS:  # for the backward, base 2 with the 448 of P taken out; +inf on padded rows (P = 0)
            m2 = m_i - 8.807354922057604
            real = rows < SQ
            tl.store(LSE + bh * SPQ + rows, tl.where(real, m2 + tl.log2(l_i), float("inf")))
            tl.store(MROW + bh * SPQ + rows, tl.where(real, m2, float("inf")))


    # ---- backward (training): P recomputed from the same int8 Q·Kᵀ as the forward, so it matches
    # the forward's log-sum-exp exactly; dV = Pᵀ·dO in float8 e4m3; dP = dO·Vᵀ, dQ = dS·K and
    # dK = dSᵀ·Q in bf16 (dS carries the sign changes and the dynamic range that 8 bits lose).

    @triton.jit
    def _bwd_prep_kernel(O, DO, LSE, MROW, DELTA, W, DO8T, DOS, sob, soh, sos, sdb, sdh, sds,
                         H, SQ, SPQ, NBQ, D: tl.constexpr, BLOCK: tl.constexpr):
        """delta = rowsum(O·dO); w = 1/l (P = e·w with e = exp2(s - m) in [0, 448]); dO·w in e4m3
        with a scale per (block of BLOCK queries, channel), stored transposed [D, SPQ] for dV."""
        blk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        rows = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        real = rows < SQ
        cols = tl.arange(0, D)
        o = _raster(O, sob, soh, sos, b, h, blk * BLOCK, BLOCK, D, SQ, True)
        do = _raster(DO, sdb, sdh, sds, b, h, blk * BLOCK, BLOCK, D, SQ, True).to(tl.float32)
        tl.store(DELTA + bh * SPQ + rows, tl.sum(o.to(tl.float32) * do, 1))
        w = tl.where(real, tl.exp2(tl.load(MROW + bh * SPQ + rows) - tl.load(LSE + bh * SPQ + rows)), 0.0)
        tl.store(W + bh * SPQ + rows, w)
        dw = do * w[:, None]
        amax = tl.maximum(tl.max(tl.abs(dw), 0), 1e-30)
        tl.store(DOS + (bh * NBQ + blk) * D + cols, amax / 448.0)
        tl.store(DO8T + (bh * D + cols)[None, :] * SPQ + rows[:, None], (dw * (448.0 / amax)[None, :]).to(tl.float8e4nv))

    @triton.jit
    def _raster(X, sb, sh, ss, b, h, r0, R: tl.constexpr, D: tl.constexpr, N, MASK: tl.constexpr):
        """Rows r0 .. r0+R-1 of X[b, h] (strides sb, sh, ss, 1); zeros past N when MASK."""
        r = (r0 + tl.arange(0, R)).to(tl.int64)
        ptrs = X + b * sb + h * sh + r[:, None] * ss + tl.arange(0, D)[None, :]
        if MASK:
            x = tl.load(ptrs, mask=(r < N)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _dq_step(q, qs, lse, delta, do, dq, dsum, K8, KS, K, V, skb, skh, sks, svb, svh, svs, b, h, bh,
                 n0, S, SP, NB, D: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr, MASK: tl.constexpr):
        k8 = tl.load(K8 + (bh * SP + n0 + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :])
        s = tl.dot(q, tl.trans(k8)).to(tl.float32)
        c = qs * tl.load(KS + bh * NB + n0 // QBLOCK)
        p = tl.exp2(s * c[:, None] - lse[:, None])
        if MASK:
            p = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < S, p, 0.0)
        v = _raster(V, svb, svh, svs, b, h, n0, BLOCK_N, D, S, MASK)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dsum += tl.sum(ds, 1)
        k = _raster(K, skb, skh, sks, b, h, n0, BLOCK_N, D, S, MASK)
        dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq, dsum

    @triton.jit
    def _dq_kernel(Q8, QS, K8, KS, K, V, DO, DQ, LSE, DELTA, KMEAN,
                   skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sqb, sqh, sqs,
                   H, SQ, SPQ, S, SP, NB, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.arange(0, D)
        q = tl.load(Q8 + (bh * SPQ + rows)[:, None] * D + cols[None, :])
        qs = tl.load(QS + bh * SPQ + rows)
        lse = tl.load(LSE + bh * SPQ + rows)  # +inf past SQ: P = 0 there
        delta = tl.load(DELTA + bh * SPQ + rows)
        do = _raster(DO, sdb, sdh, sds, b, h, pid * BLOCK_M, BLOCK_M, D, SQ, True)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        dsum = tl.zeros([BLOCK_M], tl.float32)
        n_full = S // BLOCK_N
        for j in range(0, n_full):
            dq, dsum = _dq_step(q, qs, lse, delta, do, dq, dsum, K8, KS, K, V, skb, skh, sks, svb, svh, svs,
                                b, h, bh, j * BLOCK_N, S, SP, NB, D, BLOCK_N, QBLOCK, False)
        if n_full * BLOCK_N < S:
            dq, dsum = _dq_step(q, qs, lse, delta, do, dq, dsum, K8, KS, K, V, skb, skh, sks, svb, svh, svs,
                                b, h, bh, n_full * BLOCK_N, S, SP, NB, D, BLOCK_N, QBLOCK, True)
        # dS·K = dS·(K - mean) exactly when each row of dS sums to 0; with O from 8-bit operands it
        # sums to nearly 0, and subtracting the mean keeps that residue off keys with a large offset
        dq = (dq - dsum[:, None] * tl.load(KMEAN + bh * D + cols)[None, :]) * sm_scale
        tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqs + cols[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(rows < SQ)[:, None])

    @triton.jit
    def _dkdv_kernel(Q8, QS, K8, KS, Q, V, DO, DO8T, DOS, DK, DV, LSE, MROW, DELTA, W,
                     sqb, sqh, sqs, svb, svh, svs, sdb, sdh, sds, skb, skh, sks, svgb, svgh, svgs,
                     H, SQ, SPQ, NBQ, S, SP, NB, sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr,
                     DV_FP8: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        n0 = pid * BLOCK_N
        krows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = tl.arange(0, D)
        k8 = tl.load(K8 + (bh * SP + krows)[:, None] * D + cols[None, :])
        ks = tl.load(KS + bh * NB + n0 // QBLOCK)
        v = _raster(V, svb, svh, svs, b, h, n0, BLOCK_N, D, S, True)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for i in range(0, tl.cdiv(SQ, BLOCK_M)):
            m0 = i * BLOCK_M
            qr = (bh * SPQ + m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            q8 = tl.load(Q8 + qr[:, None] * D + cols[None, :])
            st = tl.dot(k8, tl.trans(q8)).to(tl.float32)  # [keys, queries]
            e = tl.exp2(st * (tl.load(QS + qr) * ks)[None, :] - tl.load(MROW + qr)[None, :])  # [0, 448]
            pt = e * tl.load(W + qr)[None, :]
            do = _raster(DO, sdb, sdh, sds, b, h, m0, BLOCK_M, D, SQ, True)
            if DV_FP8:
                dot8 = tl.load(DO8T + (bh * D + cols)[:, None] * SPQ + (m0 + tl.arange(0, BLOCK_M))[None, :])
                dv += tl.dot(e.to(tl.float8e4nv), tl.trans(dot8)) * tl.load(DOS + (bh * NBQ + m0 // QBLOCK) * D + cols)[None, :]
            else:
                dv = tl.dot(pt.to(do.dtype), do, dv)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - tl.load(DELTA + qr)[None, :])
            q = _raster(Q, sqb, sqh, sqs, b, h, m0, BLOCK_M, D, SQ, True)
            dk = tl.dot(dst.to(q.dtype), q, dk)
        real = (krows < S)[:, None]
        tl.store(DK + b * skb + h * skh + krows[:, None] * sks + cols[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=real)
        tl.store(DV + b * svgb + h * svgh + krows[:, None] * svgs + cols[None, :], dv.to(DV.dtype.element_ty),
                 mask=real)

def quantize(q, k, v, with_v: bool = True):
    """q [B, H, Sq, D], k, v [B, H, Sk, D] (any strides, unit stride along D) -> the kernel's 8-bit
    operands: int8 Q8 [B·H, SPq, D] and K8 [B·H, SPk, D], e4m3 V8ᵀ [B·H, D, SPk] (SP = S rounded up
    to 128, zero rows beyond S); the per-token Q scales (softmax scale folded in) [B·H, SPq], the
    per-block K scales [B·H, SPk/128], and the per-channel mean and scale of V [B·H, D]
    (V8 = (V - mean) / scale). ``with_v=False`` (the backward) quantizes Q and K only."""
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    BH = B * H
    NBQ, NBK = triton.cdiv(SQ, QUANT_BLOCK), triton.cdiv(SK, QUANT_BLOCK)
    SPQ, SPK = NBQ * QUANT_BLOCK, NBK * QUANT_BLOCK
    dev = q.device
    kmean = torch.mean(k, dim=2, dtype=torch.float32).reshape(BH, D).contiguous()
    if with_v:
        vmean = torch.mean(v, dim=2, dtype=torch.float32)
        vmin, vmax = torch.aminmax(v, dim=2)
        vscale = torch.maximum(vmax.float() - vmean, vmean - vmin.float()).clamp_min(1e-30) / FP8_MAX
        vmean, vscale = vmean.reshape(BH, D).contiguous(), vscale.reshape(BH, D).contiguous()
        v8t = torch.empty(BH, D, SPK, device=dev, dtype=torch.float8_e4m3fn)
    else:
        vmean = vscale = v8t = kmean  # not touched by the kernel
    q8 = torch.empty(BH, SPQ, D, device=dev, dtype=torch.int8)
    qs = torch.empty(BH, SPQ, device=dev, dtype=torch.float32)
    k8 = torch.empty(BH, SPK, D, device=dev, dtype=torch.int8)
    ks = torch.empty(BH, NBK, device=dev, dtype=torch.float32)
    _quant_q_kernel[(NBQ, BH)](q, q8, qs, *q.stride()[:3], H, SQ, SPQ, _LOG2E / math.sqrt(D),
                               D=D, BLOCK=QUANT_BLOCK, num_warps=8)
    _quant_kv_kernel[(NBK, BH)](k, v, k8, ks, v8t, kmean, vmean, vscale, *k.stride()[:3], *v.stride()[:3],
                                H, SK, SPK, NBK, D=D, BLOCK=QUANT_BLOCK, WITH_V=with_v, num_warps=8)
    if not with_v:
        return q8, k8, qs, ks, kmean
    return q8, k8, v8t, qs, ks, vmean, vscale


def _config(config: str | dict | None) -> dict:
    cfg = {name: (dict(val) if isinstance(val, dict) else val) for name, val in DEFAULT_CONFIG.items()}
    extra = json.loads(config) if isinstance(config, str) and config else (config or {})
    unknown = set(extra) - set(cfg)
    if unknown:
        raise ValueError(f"8-bit attention config {extra}: unknown keys {sorted(unknown)}; known: {DEFAULT_CONFIG}")
    for name, val in extra.items():
        if isinstance(cfg[name], dict):
            if not isinstance(val, dict) or set(val) - set(cfg[name]):
                raise ValueError(f"8-bit attention config {name}: {val}; known keys: {sorted(cfg[name])}")
            cfg[name].update(val)
        else:
            cfg[name] = val
    blocks = [cfg["block_m"], cfg["block_n"]] + [cfg[n][t] for n in ("dq", "dkdv") for t in ("block_m", "block_n")]
    if (any(QUANT_BLOCK % b for b in blocks) or cfg["pv"] not in ("fp8", "bf16") or cfg["dv"] not in ("fp8", "bf16")
            or cfg["backward"] not in ("cudnn", "triton")):
        raise ValueError(f"8-bit attention config {cfg}: every block_m and block_n must divide {QUANT_BLOCK}, "
                         "pv and dv are fp8 or bf16, backward is cudnn or triton")
    return cfg


def _check(q, k, v):
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape != k.shape:
        raise ValueError(f"8-bit attention needs q [B, H, Sq, D] and k, v [B, H, Sk, D]: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[3]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the 8-bit attention kernel needs a power of two >= 16")


def _run(q, k, v, config: str | dict | None, stats: bool = False):
    """The forward; with ``stats`` also the base-2 log-sum-exp and row maximum per query [B·H, SPq]
    (the 448 of P taken out, +inf past Sq) that the backward needs."""
    cfg = _config(config)
    q, k, v = _prep(q), _prep(k), _prep(v)
    _check(q, k, v)
    B, H, S, D = q.shape
    SK = k.shape[2]
    q8, k8, v8t, qs, ks, vmean, vscale = quantize(q, k, v)
    SPQ, SP = q8.shape[1], k8.shape[1]
    BM, BN = cfg["block_m"], cfg["block_n"]
    tma = _use_tma(cfg, q)
    qd = TensorDescriptor.from_tensor(q8.view(-1, D), [BM, D]) if tma else None
    kd = TensorDescriptor.from_tensor(k8.view(-1, D), [BN, D]) if tma else None
    vd = TensorDescriptor.from_tensor(v8t.view(-1, SP), [D, BN]) if tma else None
    o = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)  # like SDPA's layout in the DiT
    lse = torch.empty(B * H, SPQ, device=q.device, dtype=torch.float32) if stats else qs
    mrow = torch.empty_like(lse) if stats else qs
    _fwd_kernel[(triton.cdiv(S, BM), B * H)](
        q8, qd, qs, k8, kd, ks, v8t, vd, vmean, vscale, v, o, lse, mrow,
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, S, SPQ, SK, SP, ks.shape[1], D=D, BLOCK_M=BM, BLOCK_N=BN, QBLOCK=QUANT_BLOCK, TMA=tma,
        PV_FP8=cfg["pv"] == "fp8", STATS=stats, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (o, lse, mrow) if stats else o


def _run_backward(do, q, k, v, o, lse, mrow, config: str | dict | None):
    """dQ, dK, dV (in the layouts of q, k, v) from the forward's O and stats."""
    cfg = _config(config)
    q, k, v, do = _prep(q), _prep(k), _prep(v), _prep(do)
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    if cfg["backward"] == "cudnn" and q.is_cuda:  # (Triton's CPU interpreter runs ours)
        return _cudnn_backward(do, q, k, v, o, lse)
    q8, k8, qs, ks, kmean = quantize(q, k, v, with_v=False)  # the forward's operands, bit for bit
    BH, SPQ, SP = B * H, q8.shape[1], k8.shape[1]
    NBQ = SPQ // QUANT_BLOCK
    dev = q.device
    delta = torch.empty(BH, SPQ, device=dev, dtype=torch.float32)
    w = torch.empty_like(delta)
    do8t = torch.empty(BH, D, SPQ, device=dev, dtype=torch.float8_e4m3fn)
    dos = torch.empty(BH, NBQ, D, device=dev, dtype=torch.float32)
    _bwd_prep_kernel[(NBQ, BH)](o, do, lse, mrow, delta, w, do8t, dos, o.stride(0), o.stride(1), o.stride(2),
                                do.stride(0), do.stride(1), do.stride(2), H, SQ, SPQ, NBQ,
                                D=D, BLOCK=QUANT_BLOCK, num_warps=8)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the layouts of q, k, v
    sm_scale = 1.0 / math.sqrt(D)
    c = cfg["dq"]
    _dq_kernel[(triton.cdiv(SQ, c["block_m"]), BH)](
        q8, qs, k8, ks, k, v, do, dq, lse, delta, kmean,
        *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        H, SQ, SPQ, SK, SP, ks.shape[1], sm_scale, D=D, BLOCK_M=c["block_m"], BLOCK_N=c["block_n"],
        QBLOCK=QUANT_BLOCK, num_warps=c["num_warps"], num_stages=c["num_stages"])
    c = cfg["dkdv"]
    _dkdv_kernel[(triton.cdiv(SK, c["block_n"]), BH)](
        q8, qs, k8, ks, q, v, do, do8t, dos, dk, dv, lse, mrow, delta, w,
        *q.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, SQ, SPQ, NBQ, SK, SP, ks.shape[1], sm_scale, D=D, BLOCK_M=c["block_m"], BLOCK_N=c["block_n"],
        QBLOCK=QUANT_BLOCK, DV_FP8=cfg["dv"] == "fp8", num_warps=c["num_warps"], num_stages=c["num_stages"])
    return dq, dk, dv


_PRIVATE_PAD = 8  # elements past D in each row of _private_layout's buffers (16 bytes in bf16)


def _private_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of t [B, H, S, D] with strides no caller of SDPA produces: [B, S, H, D + 8] memory,
    the first D of each row used.

    torch caches cuDNN's attention graphs by the shapes and strides of Q, K and V only (its
    MHAParams), not by those of O, dO or the statistics. On an H200 (docs/benchmarks.md) this backward returned
    garbage gradients when it ran after an SDPA training step whose Q, K, V had the same shapes and
    strides but whose dO was laid out otherwise: in a 2-block DiT and in the full-size benchmark.
    The likely cause is that it reused SDPA's graph. Under strides of their own, every one of our
    calls hands its graph the same O and dO layout, and neither side picks up the other's graphs."""
    B, H, S, D = t.shape
    buf = torch.empty(B, S, H, D + _PRIVATE_PAD, device=t.device, dtype=t.dtype)
    return buf[..., :D].transpose(1, 2).copy_(t)


def _cudnn_backward(do, q, k, v, o, lse):
    """cuDNN's fused bf16 backward with this forward's O and its log-sum-exp in cuDNN's convention
    (natural log of the raw scaled scores: ours is base 2 of the scores against the keys' mean)."""
    B, H, SQ, D = q.shape
    scale = 1.0 / math.sqrt(D)
    kmean = torch.mean(k, dim=2, dtype=torch.float32)  # [B, H, D]
    shift = torch.einsum("bhsd,bhd->bhs", q.float(), kmean) * scale
    lse_nat = (lse.view(B, H, -1)[:, :, :SQ] * math.log(2.0) + shift).unsqueeze(-1).contiguous()
    philox = torch.empty(0, device=q.device)  # no dropout; bias and sequence offsets undefined
    q_, k_, v_, o, do = (_private_layout(t) for t in (q, k, v, o, do))
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q_, k_, v_, o, lse_nat, philox, philox, None, None, None, SQ, k.shape[2], 0.0, False, scale=scale)
    return tuple(g if g.stride() == x.stride() else torch.empty_like(x).copy_(g) for g, x in zip(grads, (q, k, v)))


@torch.library.custom_op("longcat_nb::attention_quant8", mutates_args=())
def _attention_quant8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str) -> torch.Tensor:
    return _run(q, k, v, config)


@_attention_quant8.register_fake
def _(q, k, v, config):
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2)


# Training: the forward op also returns the statistics the backward needs (not differentiable);
# selective checkpointing keeps its outputs like SDPA's (the quant8 backend's kept_ops, models/attention/quant8.py).
@torch.library.custom_op("longcat_nb::attention_quant8_fwd", mutates_args=())
def _attention_quant8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(q, k, v, config, stats=True)


def _stats_shape(q):
    B, H, S, D = q.shape
    return B * H, -(-S // QUANT_BLOCK) * QUANT_BLOCK


@_attention_quant8_fwd.register_fake
def _(q, k, v, config):
    B, H, S, D = q.shape
    return (q.new_empty(B, S, H, D).transpose(1, 2), q.new_empty(_stats_shape(q), dtype=torch.float32),
            q.new_empty(_stats_shape(q), dtype=torch.float32))


@torch.library.custom_op("longcat_nb::attention_quant8_bwd", mutates_args=())
def _attention_quant8_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, mrow: torch.Tensor, config: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_backward(do, q, k, v, o, lse, mrow, config)


@_attention_quant8_bwd.register_fake
def _(do, q, k, v, o, lse, mrow, config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, config = inputs
    o, lse, mrow = output
    ctx.mark_non_differentiable(lse, mrow)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, mrow)
    ctx.config = config


def _backward(ctx, do, *_unused):
    q, k, v, o, lse, mrow = ctx.saved_tensors
    dq, dk, dv = _attention_quant8_bwd(do, q, k, v, o, lse, mrow, ctx.config)
    return dq, dk, dv, None


_attention_quant8_fwd.register_autograd(_backward, setup_context=_setup_context)


def quant8_attention(q, k, v, config: dict | str | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v for q, k, v [B, H, S, D] (bf16 or fp16, any strides with unit stride
    along D), both matmuls in 8 bits. Where a gradient is needed the forward also keeps its
    statistics and the backward runs (Q·Kᵀ recomputed in int8, Pᵀ·dO in e4m3, the rest in bf16)."""
    if triton is None:
        raise RuntimeError("8-bit attention needs Triton (pip install triton)")
    # a JSON string passes through as is: json.dumps would break a torch.compile graph
    cfg = config if isinstance(config, str) else (json.dumps(config, sort_keys=True) if config else "")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _attention_quant8_fwd(q, k, v, cfg)[0]
    return _attention_quant8(q, k, v, cfg)
