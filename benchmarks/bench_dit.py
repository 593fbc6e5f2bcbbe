"""Full-size LongCat-Video DiT on one GPU: a CFG sampling step and a LoRA training step at
480x832x93 (random weights), in several base precisions; peak memory of each. JSON out.

    python benchmarks/bench_dit.py --cases sample,train_bf16,train_int8 [--frames 45] [--out $OUT/dit.json]

Case names: <train|sample>_<precision>[_bsa|_q8|_q8cudnn|_q8triton][_compile|_compileglue][_swapN][_full|_selective|_offload|_noac][_tf32][_unfused][_prof],
e.g. train_bf16_compile_selective, sample_fp8rw_compile (precision: bf16 int8 int4 fp8, fp8rw = fp8_rowwise);
fp8diff[_bsa]: relative output difference of the fp8_rowwise base against bf16; q8diff: of the 8-bit
attention (quant8) against SDPA; attention8: the 8-bit attention kernel's launch configs against cuDNN;
attention8_train: its backward's (training) configs and gradient errors against cuDNN;
attention_fp8bwd: cuDNN's FP8 attention backward against its bf16 one (needs nvidia-cudnn-frontend). In training
cases _q8 keeps SDPA (set_quant8_training("off")), _q8cudnn / _q8triton run the 8-bit forward with
that backward (training defaults to SDPA; runs 16-17); _tf32 runs float32 matmuls (the
LoRA's) on TF32 tensor cores, as train.py does; _prof adds a GPU-time breakdown of one
more step (train or sample) by kernel category (kernel_breakdown); _unfused turns off the fused q/k
norm + RoPE kernel of no-grad steps (models/qk_rope.py) for an A/B.

Every case runs in try/except so one failure (or OOM) still reports the others. Timings are the
median of ``--repeat`` runs after one warm-up, synchronized, on the same random inputs.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longcat_nb.memory import apply_base_precision, apply_block_swap  # noqa: E402
from longcat_nb.models import LongCatVideoTransformer3DModel, qk_rope  # noqa: E402

try:
    from longcat_nb.lora import add_lora
    from longcat_nb.train import flow_matching_loss
except ImportError:  # early runs before lora.py existed: the same peft injection, inline
    from peft import LoraConfig, inject_adapter_in_model

    def add_lora(model, rank, alpha, targets=("attn.qkv", "attn.proj", "cross_attn.q_linear",
                                               "cross_attn.kv_linear", "cross_attn.proj")):
        names = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in targets]
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)

    def flow_matching_loss(dit, x0, text, mask, sigma, noise, num_cond=0):
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        t = (sigma * 1000)[:, None].expand(x0.shape[0], x0.shape[2])
        pred = dit(x_t, t, text, mask)
        return (pred.float() - (x0 - noise)).square().mean()

GIB = 2**30


def random_full_dit(device="cuda", dtype=torch.bfloat16, seed=0, **cfg):
    """The full-size DiT with small random weights, built on the device without an fp32 copy."""
    with torch.device("meta"):
        m = LongCatVideoTransformer3DModel(text_tokens_zero_pad=True, **cfg)
    m = m.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("k_norm.weight") or name.endswith("q_norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5, generator=g)
    return m.eval().requires_grad_(False)


def timed(fn, repeat):
    fn()  # warm-up (compile, autotune, allocator)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


FRAMES = 93  # --frames: the clip length of the train/sample cases (the attention cases keep 37440 tokens)


def inputs(B, F=None, H=480, W=832, L=512, C=4096, seed=1):
    F = FRAMES if F is None else F
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = 1 + (F - 1) // 4
    x = torch.randn(B, 16, T, H // 8, W // 8, device="cuda", generator=g)
    y = torch.randn(B, 1, L, C, device="cuda", generator=g, dtype=torch.bfloat16)
    mask = torch.ones(B, L, dtype=torch.long, device="cuda")
    return x, y, mask


def output_diff(model, change, key):
    """Relative difference of the model's output after ``change(model)`` against before, on one input."""
    x, y, mask = inputs(1)
    t = torch.full((1,), 700.0, device="cuda")
    with torch.no_grad():
        ref = model(x, t, y, mask)
        change(model)
        out = model(x, t, y, mask)
    return {key: float((out - ref).norm() / ref.norm()), "backend": model.attention_backend}


def case_sample(model, repeat, profile=False):
    """One CFG step: batch 2 (negative, positive) through the DiT (``profile``: and the kernel
    breakdown of one more step)."""
    gc.collect()
    torch.cuda.empty_cache()
    x, y, mask = inputs(2)
    t = torch.full((2,), 998.0, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / GIB
    with torch.no_grad():
        med, times = timed(lambda: model(x, t, y, mask), repeat)
    out = {"sec_per_step": med, "times": times, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
           "resident_gib": resident}
    if profile:
        with torch.no_grad():
            out["profile"] = kernel_breakdown(lambda: model(x, t, y, mask))
    return out


# kernel-name fragments -> category, first match wins (kernel_breakdown)
# (inductor's fused kernels are named triton_*, our attention kernels _fwd_kernel, _dq_kernel, ...;
# cuBLAS's fp8 GEMMs, nvjet_*qq*, count as gemm)
KERNEL_CATEGORIES = (
    ("triton_fused", ("triton_",)),
    ("attention_bwd", ("flash_bwd", "bprop", "_dq_kernel", "_dkdv_kernel", "_bwd_prep")),
    ("attention_fwd", ("flash_fwd", "fprop", "cudnn", "_fwd_kernel", "_quant_q_kernel", "_quant_kv_kernel", "fmha")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "ampere", "matmul", "nvjet")),
)


def kernel_breakdown(fn, top=25):
    """GPU time of one call of ``fn`` per kernel category (KERNEL_CATEGORIES) and its largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0)
        if str(getattr(e, "device_type", "")).endswith("CUDA") and us:
            kernels[e.key] = kernels.get(e.key, 0.0) + us / 1e3
    cats = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k.lower() in low for k in keys)), "other")
        cats[cat] = round(cats.get(cat, 0.0) + ms, 1)
    largest = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"gpu_ms": round(sum(kernels.values()), 1), "by_category_ms": cats,
            "largest_ms": {k[:120]: round(v, 1) for k, v in largest}}


def case_train(model, repeat, rank=32, swap=0, compile_scope=None, checkpointing="full", profile=False):
    from longcat_nb.memory import apply_gradient_checkpointing
    from longcat_nb.speed import apply_compile, disable_compile

    add_lora(model, rank=rank, alpha=rank)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    apply_gradient_checkpointing(model, checkpointing)
    model.train()
    sw = apply_block_swap(model, swap, "cuda") if swap else None
    if compile_scope:
        apply_compile(model, scope=compile_scope)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0, y, mask = inputs(1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g).cuda()
    sigma = torch.tensor([0.7], device="cuda")
    losses = []

    def step():
        loss = flow_matching_loss(model, x0, y, mask, sigma, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / GIB
    t0 = time.perf_counter()
    med, times = timed(step, repeat)
    out = {"sec_per_step": med, "resident_gib": resident, "times": times, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "first_step_s": time.perf_counter() - t0 - sum(times), "checkpointing": checkpointing,
           "compile": compile_scope, "lora_params_m": sum(p.numel() for p in params) / 1e6, "losses": losses,
           "blocks_to_swap": swap}
    if profile:
        out["profile"] = kernel_breakdown(step)
    if sw is not None:
        sw.remove()
    disable_compile(model)
    return out


def case_attention(repeat):
    """One self-attention layer, 32 heads x 128, bf16: each SDPA kernel, forward and fwd+bwd."""
    from longcat_nb.models.attention import dense_attention, set_sdpa_preference

    out = {}
    for label, n in (("480x832x93", 37440), ("704x1280x93", 84480)):
        q, k, v = (torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * n * n * 4096
        for pref in ("flash", "cudnn", "efficient"):
            try:
                set_sdpa_preference(pref)
                fwd, _ = timed(lambda: dense_attention(q, k, v), repeat + 3)

                def fb():
                    o = dense_attention(q, k, v)
                    torch.autograd.grad(o, (q, k, v), do)
                fb_t, _ = timed(fb, repeat + 3)
                out[f"{label}/{pref}"] = {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb_t * 1e3,
                                          "fwd_tflops": flops / fwd / 1e12, "fwd_bwd_tflops": 3.5 * flops / fb_t / 1e12}
            except Exception as e:
                out[f"{label}/{pref}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        set_sdpa_preference("auto")
    return out


def case_attention8(repeat):
    """8-bit self-attention (models/quant_attention.py) against cuDNN SDPA, 32 heads x 128, forward:
    time per launch config, and the error of each against an fp32 reference on two heads."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longcat_nb.models import quant_attention as QA
    from longcat_nb.models.attention import dense_attention, set_sdpa_preference

    configs = {
        "default": {},
        "m64n128w4s3_notma": dict(block_m=64, block_n=128, num_warps=4, num_stages=3, tma=False),
        "m64n128w4s4": dict(block_m=64, block_n=128, num_warps=4, num_stages=4),
        "m64n128w4s2": dict(block_m=64, block_n=128, num_warps=4, num_stages=2),
        "m64n64w4s3": dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
        "m64n128w8s3": dict(block_m=64, block_n=128, num_warps=8, num_stages=3),
        "m128n128w8s3": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
        "m128n128w8s3_notma": dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=False),
        "pv_bf16": dict(pv="bf16"),
    }
    out = {}
    for label, B, n in (("480x832x93_cfg", 2, 37440), ("704x1280x93", 1, 84480)):
        g = torch.Generator(device="cuda").manual_seed(0)
        # DiT-like operands: RMS-normed q, k with a shared offset, v with a per-channel offset
        q = F.rms_norm(torch.randn(B, n, 32, 128, device="cuda", generator=g), (128,)).to(torch.bfloat16).transpose(1, 2)
        k = (F.rms_norm(torch.randn(B, n, 32, 128, device="cuda", generator=g), (128,))
             + 0.5 * torch.randn(1, 1, 32, 128, device="cuda", generator=g)).to(torch.bfloat16).transpose(1, 2)
        v = (torch.randn(B, n, 32, 128, device="cuda", generator=g)
             + torch.randn(1, 1, 32, 128, device="cuda", generator=g)).to(torch.bfloat16).transpose(1, 2)
        q, k, v = (t.contiguous() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # fp32 reference on the first two heads
            ref = F.scaled_dot_product_attention(q[:1, :2].float(), k[:1, :2].float(), v[:1, :2].float())
        flops = 4 * n * n * 4096 * B

        def err(o):
            return float((o[:1, :2].float() - ref).norm() / ref.norm())

        set_sdpa_preference("cudnn")
        with torch.no_grad():
            t, _ = timed(lambda: dense_attention(q, k, v), repeat + 3)
            out[f"{label}/cudnn_bf16"] = {"fwd_ms": t * 1e3, "tflops": flops / t / 1e12, "err": err(dense_attention(q, k, v))}
            set_sdpa_preference("auto")
            tq, _ = timed(lambda: QA.quantize(q, k, v), repeat + 3)
            out[f"{label}/quantize_only"] = {"fwd_ms": tq * 1e3}
            for name, cfg in configs.items():
                try:
                    t, _ = timed(lambda: QA.quant8_attention(q, k, v, cfg), repeat + 3)
                    out[f"{label}/quant8_{name}"] = {"fwd_ms": t * 1e3, "tflops": flops / t / 1e12,
                                                    "err": err(QA.quant8_attention(q, k, v, cfg))}
                except Exception as e:
                    out[f"{label}/quant8_{name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(json.dumps({f"{label}/{name}": out.get(f"{label}/quant8_{name}")}), flush=True)
        # plain N(0, 1) operands (no offsets for the mean subtraction to take out): the hard case
        qr, kr, vr = (torch.randn(1, 2, n, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.no_grad():
            ref_r = F.scaled_dot_product_attention(qr.float(), kr.float(), vr.float())
            for name, o in (("cudnn_bf16", dense_attention(qr, kr, vr)), ("quant8", QA.quant8_attention(qr, kr, vr)),
                            ("quant8_pv_bf16", QA.quant8_attention(qr, kr, vr, {"pv": "bf16"}))):
                out[f"{label}/randn_err_{name}"] = float((o.float() - ref_r).norm() / ref_r.norm())
        del q, k, v, ref, qr, kr, vr, ref_r
        torch.cuda.empty_cache()
    return out


def _training_operands(n, H=32, D=128):
    """DiT-like attention operands for the training cases, [B, H, S, D] views of [B, S, H, D]
    tensors: RMS-normed q and k, a shared offset on k, a per-channel offset on v, and dO."""
    import torch.nn.functional as F
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q = F.rms_norm(randn(1, n, H, D), (D,))
    k = F.rms_norm(randn(1, n, H, D), (D,)) + 0.5 * randn(1, 1, H, D)
    v = randn(1, n, H, D) + randn(1, 1, H, D)
    do = randn(1, n, H, D) * 1e-3
    return tuple(t.to(torch.bfloat16).transpose(1, 2) for t in (q, k, v, do))


def _fp32_reference_two_heads(q, k, v, do):
    """O and (dQ, dK, dV) in fp32 on the first two heads."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qr, kr, vr = (t[:, :2].detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        ref = F.scaled_dot_product_attention(qr, kr, vr)
    grads = torch.autograd.grad(ref, (qr, kr, vr), do[:, :2].float())
    return ref.detach(), [x.detach() for x in grads]


def case_attention8_train(repeat):
    """8-bit attention for training against cuDNN SDPA, B = 1, 32 heads x 128 at 480x832x93 (37440
    tokens): fwd+bwd and backward-only time per backward launch config, and the errors of O, dQ, dK,
    dV against an fp32 reference on two heads."""

    from longcat_nb.models import quant_attention as QA
    from longcat_nb.models.attention import dense_attention, set_sdpa_preference

    def bwd(m, n, w, s):
        return {"block_m": m, "block_n": n, "num_warps": w, "num_stages": s}

    configs = {
        "default": {},
        "cudnn_unverified": {"backward": "cudnn"},
        "triton_dv_bf16": {"backward": "triton", "dv": "bf16"},
        "triton_dv_bf16_dkdv_m128n64w8": {"backward": "triton", "dv": "bf16", "dkdv": bwd(128, 64, 8, 2)},
        "triton_dv_bf16_dkdv_m64n128w8": {"backward": "triton", "dv": "bf16", "dkdv": bwd(64, 128, 8, 2)},
        "triton_dv_bf16_dq_m128n64w8": {"backward": "triton", "dv": "bf16", "dq": bwd(128, 64, 8, 2)},
    }
    n = 37440
    q, k, v, do = _training_operands(n)
    q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
    do = do.contiguous()
    flops = 4 * n * n * 4096
    ref, ref_grads = _fp32_reference_two_heads(q, k, v, do)

    def errors(fn):
        q2, k2, v2 = (t[:, :2].detach().clone().requires_grad_() for t in (q, k, v))
        o = fn(q2, k2, v2)
        grads = torch.autograd.grad(o, (q2, k2, v2), do[:, :2])
        rel = [float((a.float() - b).norm() / b.norm()) for a, b in zip((o, *grads), (ref, *ref_grads))]
        return dict(zip(("err_o", "err_dq", "err_dk", "err_dv"), rel))

    def fwd_bwd(fn):
        def run():
            o = fn(q, k, v)
            torch.autograd.grad(o, (q, k, v), do)
        return run

    out = {}
    for pref in ("cudnn", "flash"):
        set_sdpa_preference(pref)
        t, _ = timed(fwd_bwd(dense_attention), repeat + 3)
        with torch.no_grad():
            tf, _ = timed(lambda: dense_attention(q, k, v), repeat + 3)
        out[f"{pref}_bf16"] = {"fwd_bwd_ms": t * 1e3, "fwd_ms": tf * 1e3, "bwd_ms": (t - tf) * 1e3,
                               "fwd_bwd_tflops": 3.5 * flops / t / 1e12, **errors(dense_attention)}
        print(json.dumps({pref: out[f"{pref}_bf16"]}), flush=True)
    set_sdpa_preference("auto")
    with torch.no_grad():
        o, lse, mrow = QA._run(q, k, v, None, stats=True)
        tf, _ = timed(lambda: QA._run(q, k, v, None, stats=True), repeat + 3)
    out["quant8_fwd_stats_ms"] = tf * 1e3
    # cuDNN's own log-sum-exp against the one handed to its backward (quant_attention._cudnn_backward)
    with torch.no_grad():
        ref_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[1]
        kmean = k.float().mean(2)
        ours = (lse.view(1, 32, -1)[:, :, :n] * 0.6931471805599453
                + torch.einsum("bhsd,bhd->bhs", q.float(), kmean) / 128 ** 0.5)
        out["cudnn_lse"] = {"shape": list(ref_lse.shape), "stride": list(ref_lse.stride()),
                            "max_abs_diff_vs_ours": float((ref_lse.reshape(ours.shape) - ours).abs().max())}
    print(json.dumps(out["cudnn_lse"]), flush=True)
    for name, cfg in configs.items():
        try:
            with torch.no_grad():
                tb, _ = timed(lambda: QA._run_backward(do, q, k, v, o, lse, mrow, cfg), repeat + 3)
            t, _ = timed(fwd_bwd(lambda a, b, c: QA.quant8_attention(a, b, c, cfg)), repeat + 3)
            out[f"quant8_{name}"] = {"fwd_bwd_ms": t * 1e3, "bwd_ms": tb * 1e3, "fwd_bwd_tflops": 3.5 * flops / t / 1e12,
                                     **errors(lambda a, b, c: QA.quant8_attention(a, b, c, cfg))}
        except Exception as e:
            out[f"quant8_{name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({name: out[f"quant8_{name}"]}), flush=True)
    return out


def case_attention_diag():
    """Why a fused kernel is or is not taken: cuDNN only, on plain and on DiT-made q/k/v."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longcat_nb.models.dit import SelfAttention
    from longcat_nb.models.rope import apply_rope

    n = 37440
    out = {}

    def plain(B, grad):
        return [torch.randn(B, 32, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)]

    def from_dit(B):
        attn = SelfAttention(4096, 32).cuda().to(torch.bfloat16)
        x = torch.randn(B, n, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            q, k, v = attn._qkv(x)
            cos, sin = attn.rope.get((24, 30, 52), x.device)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    variants = {"plain_B1_grad": lambda: plain(1, True), "plain_B1_nograd": lambda: plain(1, False),
                "plain_B2_nograd": lambda: plain(2, False), "dit_B2": lambda: from_dit(2),
                "dit_B1": lambda: from_dit(1)}
    for name, make in variants.items():
        q, k, v = make()
        rec = {"strides": [list(t.stride()) for t in (q, k, v)], "dtypes": [str(t.dtype) for t in (q, k, v)]}
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    t, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v), 3)
                rec["cudnn_ms"] = t * 1e3
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:400]
            rec["warnings"] = [str(x.message)[:300] for x in w][:6]
        out[name] = rec
        del q, k, v
        torch.cuda.empty_cache()
    return out


def case_attention_fp8_backward(repeat):
    """cuDNN's FP8 attention backward (cudnn-frontend's ``sdpa_fp8_backward``; needs the
    nvidia-cudnn-frontend package) against its bf16 backward, both fed the 8-bit forward's O and
    statistics: B = 1, 32 heads x 128, 37440 tokens, the operands of attention8_train. On Hopper this
    graph takes and returns float8 only (bf16 gradients are Blackwell-only), so Q, K, V, O and dO are
    quantized per tensor and dQ, dK, dV come back in e4m3. Scales are the best case: dS's and the
    gradients' from a calibration run on the same inputs (training would need delayed scaling).
    Errors against fp32 on two heads; ``centred``: keys less their mean (dQ = dS (K - mean) exactly,
    the statistics lose the shift), which takes out the cancellation of dS's rows in dQ."""
    import cudnn

    from longcat_nb.models import quant_attention as QA

    n, H, D = 37440, 32, 128
    fmax = torch.finfo(torch.float8_e4m3fn).max

    def bshd(t):  # [B, H, S, D] view of a [B, S, H, D] tensor, the DiT's layout
        return t.transpose(1, 2)

    q, k, v, do = _training_operands(n, H, D)
    sm_scale = D ** -0.5
    with torch.no_grad():
        o, lse, mrow = QA._run(q, k, v, None, stats=True)
    kmean = torch.mean(k, dim=2, dtype=torch.float32)
    lse_nat = lse.view(1, H, -1)[:, :, :n] * math.log(2.0)  # against the keys' mean
    shift = torch.einsum("bhsd,bhd->bhs", q.float(), kmean) * sm_scale

    _, ref_grads = _fp32_reference_two_heads(q, k, v, do)

    def errors(grads):
        return {f"err_{nm}": float((a[:, :2].float() - b).norm() / b.norm())
                for nm, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)}

    flops = 2.5 * 4 * n * n * H * D
    out = {"cudnn_backend": cudnn.backend_version(), "cudnn_frontend": getattr(cudnn, "__version__", None)}
    with torch.no_grad():
        t, _ = timed(lambda: QA._cudnn_backward(do, q, k, v, o, lse), repeat + 3)
        out["bf16"] = {"bwd_ms": t * 1e3, "tflops": flops / t / 1e12,
                       **errors(QA._cudnn_backward(do, q, k, v, o, lse))}
    print(json.dumps({"bf16": out["bf16"]}), flush=True)

    dims, strides = (1, H, n, D), (n * H * D, D, H * D, 1)
    f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32)
    ten = {nm: graph.tensor(name=nm, dim=dims, stride=strides, data_type=f8) for nm in ("q", "k", "v", "o", "dO")}
    ten["stats"] = graph.tensor(name="stats", dim=(1, H, n, 1), stride=(H * n, n, 1, 1), data_type=f32)
    names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
             "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
    scal = {nm: graph.tensor(name=nm, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32) for nm in names}
    *grads_t, aq, ak, av, ap = graph.sdpa_fp8_backward(
        q=ten["q"], k=ten["k"], v=ten["v"], o=ten["o"], dO=ten["dO"], stats=ten["stats"], **scal,
        attn_scale=sm_scale)
    for x in grads_t:
        x.set_output(True).set_dim(dims).set_stride(strides).set_data_type(f8)
    amax_t = (aq, ak, av, ap)
    for x in amax_t:
        x.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    ws = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
    one = torch.ones(1, 1, 1, 1, device="cuda")
    grads = [bshd(torch.empty(1, n, H, D, device="cuda", dtype=torch.float8_e4m3fn)) for _ in range(3)]
    amax = [torch.zeros(1, 1, 1, 1, device="cuda") for _ in range(4)]

    def quant(t):  # per-tensor e4m3, scale on the device (no host sync)
        a = t.abs().amax().float().clamp_min(1e-12).reshape(1, 1, 1, 1)
        return bshd(torch.empty(1, n, H, D, device="cuda", dtype=torch.float8_e4m3fn)).copy_(t * (fmax / a)), a / fmax

    def backward(ops, stats, s_dp, s_out):
        (q8, dq_), (k8, dk_), (v8, dv_), (o8, do_), (do8, ddo) = ops
        pack = {ten["q"]: q8, ten["k"]: k8, ten["v"]: v8, ten["o"]: o8, ten["dO"]: do8, ten["stats"]: stats,
                scal["descale_q"]: dq_, scal["descale_k"]: dk_, scal["descale_v"]: dv_, scal["descale_o"]: do_,
                scal["descale_dO"]: ddo, scal["descale_s"]: one / fmax, scal["scale_s"]: one * fmax,
                scal["scale_dP"]: s_dp, scal["descale_dP"]: 1 / s_dp, scal["scale_dQ"]: s_out[0],
                scal["scale_dK"]: s_out[1], scal["scale_dV"]: s_out[2]}
        pack.update(zip(grads_t, grads))
        pack.update(zip(amax_t, amax))
        graph.execute(pack, ws, handle=handle)
        return [x.float() / s for x, s in zip(grads, s_out)]

    with torch.no_grad():
        for name, kk, stats in (("plain", k, (lse_nat + shift).unsqueeze(-1).contiguous()),
                                ("centred", (k.float() - kmean[:, :, None]).to(torch.bfloat16),
                                 lse_nat.unsqueeze(-1).contiguous())):
            ops = [quant(t) for t in (q, kk, v, o, do)]
            backward(ops, stats, one, [one] * 3)  # calibration: dS's amax, then the gradients'
            s_dp = fmax / amax[3].clamp_min(1e-30)
            backward(ops, stats, s_dp, [one] * 3)
            s_out = [fmax / a.clamp_min(1e-30) for a in amax[:3]]
            rec = errors(backward(ops, stats, s_dp, s_out))
            t, _ = timed(lambda: backward(ops, stats, s_dp, s_out), repeat + 3)
            tq, _ = timed(lambda: [quant(t_) for t_ in (q, kk, v, o, do)], repeat + 3)
            out[f"fp8_{name}"] = {"bwd_ms": t * 1e3, "tflops": flops / t / 1e12, "quantize_ms_eager": tq * 1e3, **rec}
            print(json.dumps({name: out[f"fp8_{name}"]}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="sample,train_bf16,train_int8")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--frames", type=int, default=93, help="clip length of the train and sample cases (4k+1)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "dit.json"))
    args = ap.parse_args()
    if args.frames < 1 or (args.frames - 1) % 4:
        ap.error(f"--frames {args.frames}: the VAE needs 4k+1 frames (e.g. 45, 93)")
    global FRAMES
    FRAMES = args.frames
    latent_t = 1 + (FRAMES - 1) // 4
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "depth": args.depth,
           "shape": f"480x832x{FRAMES} (latent {latent_t}x60x104, {latent_t * 30 * 52} tokens)", "cases": {}}
    for case in args.cases.split(","):
        t0 = time.time()
        model = None
        case_name = case
        case, _, sdpa = case.partition("@")  # e.g. sample@cudnn
        from longcat_nb.models.attention import set_sdpa_preference
        set_sdpa_preference(sdpa or "auto")
        try:
            if case == "attention":
                r = case_attention(args.repeat)
            elif case == "attention8":
                r = case_attention8(args.repeat)
            elif case == "attention8_train":
                r = case_attention8_train(args.repeat)
            elif case == "attention_fp8bwd":
                r = case_attention_fp8_backward(args.repeat)
            elif case == "attention_diag":
                r = case_attention_diag()
            elif case == "q8diff":  # output of the 8-bit attention against SDPA, same model and input
                model = random_full_dit(depth=args.depth)
                r = output_diff(model, lambda m: m.set_attention_backend("quant8"), "rel_diff_quant8_vs_sdpa")
            elif case == "dit_bsa_diff":
                model = random_full_dit(depth=args.depth)
                r = output_diff(model, lambda m: m.set_attention_backend("bsa"), "rel_diff_bsa_vs_dense")
            elif case.startswith("train_") or case.startswith("sample_") or case.startswith("fp8diff"):
                # <train|sample>_<precision>[_bsa|_q8|_q8cudnn|_q8triton][_compile|_compileglue][_swapN][_full|_selective|_offload|_noac][_tf32][_unfused][_prof]
                parts = case.split("_")
                kind = parts[0]
                precision = {"fp8rw": "fp8_rowwise"}.get(parts[1], parts[1]) if kind != "fp8diff" else "bf16"
                swap = next((int(p[4:]) for p in parts[2:] if p.startswith("swap")), 0)
                scope = "glue" if "compileglue" in parts else ("blocks" if "compile" in parts else None)
                ckpt = next((m for m in ("full", "selective", "offload") if m in parts), "full")
                ckpt = "none" if "noac" in parts else ckpt
                model = random_full_dit(depth=args.depth)
                if "bsa" in parts:
                    model.set_attention_backend("bsa")
                if {"q8", "q8cudnn", "q8triton"} & set(parts):
                    model.set_attention_backend("quant8")
                from longcat_nb.models.attention import set_quant8_training
                set_quant8_training(next((p[2:] for p in parts if p in ("q8cudnn", "q8triton")), "off"))
                torch.backends.cuda.matmul.allow_tf32 = "tf32" in parts
                qk_rope.set_enabled("unfused" not in parts)
                if kind == "fp8diff":  # output of fp8_rowwise vs bf16 on the same weights and input
                    r = output_diff(model, lambda m: apply_base_precision(m, "fp8_rowwise", "cuda", backward=False),
                                    "rel_diff_fp8_rowwise_vs_bf16")
                elif kind == "train":
                    if precision != "bf16":
                        apply_base_precision(model, precision, "cuda")
                    r = case_train(model, args.repeat, swap=swap, compile_scope=scope, checkpointing=ckpt,
                                   profile="prof" in parts)
                else:
                    if precision != "bf16":
                        apply_base_precision(model, precision, "cuda", backward=False)
                    sw = apply_block_swap(model, swap, "cuda") if swap else None
                    if scope:
                        from longcat_nb.speed import apply_compile
                        apply_compile(model, scope=scope)
                    r = case_sample(model, args.repeat, profile="prof" in parts)
                    r.update(blocks_to_swap=swap, compile=scope)
                    from longcat_nb.speed import disable_compile
                    disable_compile(model)
            else:
                r = {"error": f"unknown case {case}"}
        except Exception as e:  # report and go on
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        r["wall_s"] = time.time() - t0
        res["cases"][case_name] = r
        print(json.dumps({case_name: {k: v for k, v in r.items() if k != "trace"}}), flush=True)
        del model
        torch._dynamo.reset()  # compiled code of one case must not count against the next's recompile limit
        qk_rope.set_enabled(True)
        gc.collect()
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("\ncase                 sec/step   peak GiB")
    for k, v in res["cases"].items():
        if k == "attention":
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    print(f"  attn {kk:24s} fwd {vv.get('fwd_ms', float('nan')):7.1f} ms  fwd+bwd {vv.get('fwd_bwd_ms', float('nan')):7.1f} ms {vv.get('error', '')[:60]}")
            continue
        print(f"{k:20s} {v.get('sec_per_step', float('nan')):8.2f} {v.get('peak_gib', float('nan')):9.1f}  {v.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
