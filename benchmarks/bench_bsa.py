"""Our Triton block-sparse attention (spec §3) against dense SDPA on one GPU: speed, and errors against
the fp32 torch reference (same selection). One call, about 3 minutes on an H100; JSON out.

    python benchmarks/bench_bsa.py [--out PATH] [--quick] [--layout blocked|raster|both]
                                                               # writes $OUT/bsa.json when OUT is set

B = 1, 32 heads x 128, bf16, sparsity 0.9375, 4x4x4 blocks. Shapes: 480x832x93 (grid 24x30x52, 37,440
tokens; h = 30 leaves partial blocks) and 704x1280x93 (24x44x80, 84,480 tokens), plus the I2V split
at 704x1280 (1 conditioning latent + 23 noisy: conditioning queries vs conditioning keys, noisy queries
vs all keys). Times are medians of triton.testing.do_bench. Errors: ||ours - ref|| / ||ref|| on a few
heads (the fp32 reference gathers the kept blocks, so a whole 84k-token head fits in memory).
Kernel variants (tile widths, warps, stages) are timed one kernel at a time at 704x1280; the best of
each is a suggestion for ``triton_bsa.DEFAULT_CONFIG``.
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longcat_nb.models.bsa import blocked as bk  # noqa: E402
from longcat_nb.models.bsa import bsa_attention as bsa_any  # noqa: E402
from longcat_nb.models.bsa import reference_bsa_attention, select_blocks  # noqa: E402
from longcat_nb.models.bsa import triton_bsa as tb  # noqa: E402

LAYOUT = "blocked"  # set from --layout: which kernels the cases time

H, D, DT, SPARSITY, CHUNK = 32, 128, torch.bfloat16, 0.9375, (4, 4, 4)
SHAPES = {"480x832x93": (24, 30, 52), "704x1280x93": (24, 44, 80)}
VARIANTS_BLOCKED = {  # the block-major kernels (bk.DEFAULT_CONFIG first), one kernel at a time
    "fwd": [{"num_warps": 4, "num_stages": 2}, {"num_warps": 4, "num_stages": 4}],
    "dq": [{"num_warps": 4, "num_stages": 3}],
    "dkdv": [{"num_warps": 4, "num_stages": 3}],
    "tma": [False],
}
VARIANTS = {  # tried one kernel at a time on top of DEFAULT_CONFIG (which is timed first)
    "fwd": [{"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
            {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}],
    "dq": [{"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
           {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}],
    "dkdv": [{"BLOCK_M": 32, "num_warps": 4, "num_stages": 2}, {"BLOCK_M": 64, "num_warps": 8, "num_stages": 3},
             {"BLOCK_M": 32, "num_warps": 8, "num_stages": 3}],
}


def ms(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def rnd(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=DT).requires_grad_(grad)


def qkv(n_q, n_k):
    """q, k, v as the DiT makes them: [B, H, S, D] contiguous."""
    return rnd(1, H, n_q, D, grad=True), rnd(1, H, n_k, D, grad=True), rnd(1, H, n_k, D, grad=True)


def flops(sq, kept_keys, n_matmuls):
    return 2 * n_matmuls * sq * kept_keys * D * H


def guard(res, name, fn):
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # one failure still reports the rest
        out = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-2000:]}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    res[name] = out
    print(name, json.dumps({k: v for k, v in out.items() if k != "trace"}), flush=True)
    torch.cuda.empty_cache()
    return out


def soft(fn, label):
    """Run a sub-step; on failure report it under ``label_error`` and keep the case's other numbers."""
    try:
        return fn()
    except Exception as e:
        torch.cuda.empty_cache()
        return {f"{label}_error": f"{type(e).__name__}: {e}"[:400]}


def attn(q, k, v, grid_q, grid_k, sparsity=SPARSITY, sel=None, config=None):
    return bsa_any(q, k, v, grid_q, grid_k, sparsity, sel=sel, config=config, layout=LAYOUT)


def check_errors(q, k, v, do, grid_q, grid_k, sel, heads):
    """Our forward/backward on all heads vs the fp32 reference on ``heads`` (same selection)."""
    o = attn(q, k, v, grid_q, grid_k, sel=sel)
    g = torch.autograd.grad(o, (q, k, v), do)
    hs = sorted({h % q.shape[1] for h in heads})
    sub = [t.detach()[:, hs].float().contiguous().requires_grad_(True) for t in (q, k, v)]
    r = reference_bsa_attention(*sub, grid_q, grid_k, sel=sel[:, hs])
    gr = torch.autograd.grad(r, sub, do[:, hs].float())
    out = {"heads_checked": hs, "out_rel_err": rel(o[:, hs], r)}
    for name, a, b in zip(("dq", "dk", "dv"), g, gr):
        out[f"{name}_rel_err"] = rel(a[:, hs], b)
    del r, gr, sub
    return out


def time_pair(q, k, v, do, grid_q, grid_k, sel, dense_args, rep):
    """Dense SDPA vs ours (fwd; fwd+bwd), selection included in ours unless said otherwise."""
    r = {}
    qd, kd, vd = dense_args

    def dense_fb():
        torch.autograd.grad(F.scaled_dot_product_attention(qd, kd, vd), (qd, kd, vd), do)

    def bsa_fb():
        torch.autograd.grad(attn(q, k, v, grid_q, grid_k), (q, k, v), do)

    with torch.no_grad():
        r["dense_fwd_ms"] = ms(lambda: F.scaled_dot_product_attention(qd, kd, vd), rep)
        r["bsa_fwd_ms"] = ms(lambda: attn(q, k, v, grid_q, grid_k), rep)
        r["bsa_fwd_fixed_selection_ms"] = ms(lambda: attn(q, k, v, grid_q, grid_k, sel=sel), rep)
    r["dense_fwd_bwd_ms"] = ms(dense_fb, rep)
    r["bsa_fwd_bwd_ms"] = ms(bsa_fb, rep)
    r["speedup_fwd"] = r["dense_fwd_ms"] / r["bsa_fwd_ms"]
    r["speedup_fwd_bwd"] = r["dense_fwd_bwd_ms"] / r["bsa_fwd_bwd_ms"]
    return r


def breakdown(q, k, v, do, grid_q, grid_k, sel, config=None):
    """Milliseconds of each piece: selection, inversion, layout copies and the three kernels."""
    r = {}
    r["select_ms"] = ms(lambda: select_blocks(q.detach(), k.detach(), grid_q, grid_k, SPARSITY), 100)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    sq = q.shape[2]
    if LAYOUT == "blocked":
        plan = bk.BlockedPlan(q, k, grid_q, grid_k, CHUNK, CHUNK, sel, config)
        r["invert_selection_ms"] = ms(lambda: tb.invert_selection(plan.sel, plan.nsel, plan.mk), 100)
        plan.inverse()
        P = plan.P
        r["to_blocks_kv_ms"] = ms(lambda: [bk.to_blocks(t, plan.gather_k, P) for t in (kd, vd)], 100)
        kb, vb = bk.to_blocks(kd, plan.gather_k, P), bk.to_blocks(vd, plan.gather_k, P)
        qb, dob = bk.to_blocks(qd, plan.gather_q, P), bk.to_blocks(do, plan.gather_q, P)
        o, lse = bk.launch_fwd(plan, qd, kb, vb)
        _, delta = bk.launch_dq(plan, qd, kb, vb, o, do, lse)
        kept = plan.kmax * P
        sk = k.shape[2]
        runs = (("fwd", lambda: bk.launch_fwd(plan, qd, kb, vb), 2),
                ("dq", lambda: bk.launch_dq(plan, qd, kb, vb, o, do, lse), 3),
                ("dkdv", lambda: bk.launch_dkdv(plan, qb, kb, vb, dob, lse, delta, sk), 4))
    else:
        plan = tb.make_plan(q, k, grid_q, grid_k, sel=sel, config=config)
        r["invert_selection_ms"] = ms(lambda: tb.invert_selection(plan.sel, plan.nsel, plan.mk), 100)
        plan.inverse()
        o, lse = tb.launch_fwd(plan, qd, kd, vd)
        _, delta = tb.launch_dq(plan, qd, kd, vd, o, do, lse)
        kept = plan.kmax * plan.pk
        runs = (("fwd", lambda: tb.launch_fwd(plan, qd, kd, vd), 2),
                ("dq", lambda: tb.launch_dq(plan, qd, kd, vd, o, do, lse), 3),
                ("dkdv", lambda: tb.launch_dkdv(plan, qd, kd, vd, do, lse, delta), 4))
    for name, fn, mm in runs:
        t = ms(fn, 100)
        r[f"{name}_kernel_ms"] = t
        r[f"{name}_kernel_tflops"] = flops(sq, kept, mm) / t / 1e9
    return r


def shape_case(grid, rep, heads):
    T, h, w = grid
    n = T * h * w
    q, k, v = qkv(n, n)
    do = rnd(1, H, n, D)
    sel = select_blocks(q.detach(), k.detach(), grid, grid, SPARSITY)
    mk = sel.shape[2]
    r = {"grid": list(grid), "tokens": n, "key_blocks": mk, "kept_blocks": sel.shape[-1],
         "density": sel.shape[-1] / mk}
    r.update(time_pair(q, k, v, do, grid, grid, sel, (q, k, v), rep))
    r.update(soft(lambda: breakdown(q, k, v, do, grid, grid, sel), "breakdown"))
    r.update(soft(lambda: check_errors(q, k, v, do, grid, grid, sel, heads), "errors"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(attn(q, k, v, grid, grid), (q, k, v), do)
    torch.cuda.synchronize()
    r["bsa_fwd_bwd_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return r


def i2v_case(rep, heads):
    """1 conditioning latent + 23 noisy at 704x1280: the two sub-calls of spec §2.10, on views."""
    T, h, w, nc_lat = 24, 44, 80, 1
    n, nc = T * h * w, nc_lat * h * w
    q, k, v = qkv(n, n)
    do_c, do_n = rnd(1, H, nc, D), rnd(1, H, n - nc, D)
    r = {}
    gq_c, gq_n, gk = (nc_lat, h, w), (T - nc_lat, h, w), (T, h, w)
    # noisy queries (a view into q) vs all keys: Sq != Sk, T = 23 leaves partial blocks in time
    qn = q[:, :, nc:]
    sel = select_blocks(qn.detach(), k.detach(), gq_n, gk, SPARSITY)
    r["noisy"] = {"grid_q": list(gq_n), "grid_k": list(gk), "kept_blocks": sel.shape[-1]}
    r["noisy"].update(soft(lambda: time_pair(qn, k, v, do_n, gq_n, gk, sel, (qn, k, v), rep), "timing"))
    r["noisy"].update(soft(lambda: check_errors(qn, k, v, do_n, gq_n, gk, sel, heads), "errors"))
    # conditioning queries vs conditioning keys (T = 1: one partial block layer in time)
    qc, kc, vc = q[:, :, :nc], k[:, :, :nc], v[:, :, :nc]
    sel = select_blocks(qc.detach(), kc.detach(), gq_c, gq_c, SPARSITY)
    r["cond"] = {"grid": list(gq_c), "kept_blocks": sel.shape[-1]}
    r["cond"].update(soft(lambda: time_pair(qc, kc, vc, do_c, gq_c, gq_c, sel, (qc, kc, vc), rep), "timing"))
    r["cond"].update(soft(lambda: check_errors(qc, kc, vc, do_c, gq_c, gq_c, sel, heads), "errors"))
    return r


def variants_case():
    """Each kernel alone at 704x1280 under a few launch configs (others at their defaults)."""
    grid = SHAPES["704x1280x93"]
    n = math.prod(grid)
    q, k, v = (t.detach() for t in qkv(n, n))
    do = rnd(1, H, n, D)
    sel = select_blocks(q, k, grid, grid, SPARSITY)
    rows, best = [], {}
    variants = VARIANTS_BLOCKED if LAYOUT == "blocked" else VARIANTS
    defaults = bk.DEFAULT_CONFIG if LAYOUT == "blocked" else tb.DEFAULT_CONFIG
    for kernel, options in variants.items():
        if kernel == "tma":  # a switch for all three kernels: time the whole backward + forward
            for opt in options:
                row = {"kernel": "tma", "tma": opt}
                try:
                    r = breakdown(q, k, v, do, grid, grid, sel, config={"tma": opt})
                    row["ms"] = r["fwd_kernel_ms"] + r["dq_kernel_ms"] + r["dkdv_kernel_ms"]
                    row["tflops"] = 0.0
                    row.update({f"{n}_ms": r[f"{n}_kernel_ms"] for n in ("fwd", "dq", "dkdv")})
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print("variant", json.dumps(row), flush=True)
            continue
        for opt in [dict(defaults[kernel])] + options:
            row = {"kernel": kernel, **opt}
            try:
                r = breakdown(q, k, v, do, grid, grid, sel, config={kernel: opt})
                row["ms"] = r[f"{kernel}_kernel_ms"]
                row["tflops"] = r[f"{kernel}_kernel_tflops"]
                if kernel not in best or row["ms"] < best[kernel]["ms"]:
                    best[kernel] = row
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print("variant", json.dumps(row), flush=True)
    suggested = {kn: {x: y for x, y in b.items() if x not in ("kernel", "ms", "tflops")} for kn, b in best.items()}
    out = {"rows": rows, "suggested_config": suggested}
    # the whole fwd+bwd with the suggested config (selection included)
    qg, kg, vg = (t.requires_grad_(True) for t in (q, k, v))
    out["bsa_fwd_bwd_suggested_ms"] = ms(lambda: torch.autograd.grad(
        attn(qg, kg, vg, grid, grid, config=suggested), (qg, kg, vg), do))
    return out


def sdpa_backends(rep):
    """Dense fwd+bwd at 704x1280 per SDPA backend, to know what the default baseline is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = math.prod(SHAPES["704x1280x93"])
    q, k, v = qkv(n, n)
    do = rnd(1, H, n, D)
    r = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(be):
                r[f"{name}_fwd_bwd_ms"] = ms(lambda: torch.autograd.grad(
                    F.scaled_dot_product_attention(q, k, v), (q, k, v), do), rep)
        except Exception as e:
            r[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    return r


def main():
    global LAYOUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "bsa.json") if os.environ.get("OUT") else "",
                    help="JSON path (default $OUT/bsa.json when OUT is set, else no file)")
    ap.add_argument("--quick", action="store_true", help="skip the variants and the SDPA backends")
    ap.add_argument("--layout", default="blocked", choices=["blocked", "raster", "both"])
    ap.add_argument("--shapes", default="480x832x93,704x1280x93,i2v", help="which shape cases to run")
    ap.add_argument("--no-variants", action="store_true")
    args = ap.parse_args()
    layouts = ["blocked", "raster"] if args.layout == "both" else [args.layout]
    all_res = {}
    for lay in layouts:
        LAYOUT = lay
        all_res[lay] = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(all_res, indent=2))


def run(args):
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "heads": H, "head_dim": D, "dtype": "bfloat16", "sparsity": SPARSITY,
           "chunk": list(CHUNK), "layout": LAYOUT,
           "default_config": bk.DEFAULT_CONFIG if LAYOUT == "blocked" else tb.DEFAULT_CONFIG, "cases": {}}
    print(f"== layout {LAYOUT}", flush=True)
    torch.manual_seed(0)
    cases = res["cases"]
    shapes = args.shapes.split(",")
    if "480x832x93" in shapes:
        guard(cases, "480x832x93", lambda: shape_case(SHAPES["480x832x93"], 200, heads=(0, 17)))
    if "704x1280x93" in shapes:
        guard(cases, "704x1280x93", lambda: shape_case(SHAPES["704x1280x93"], 300, heads=(5,)))
    if "i2v" in shapes:
        guard(cases, "i2v_704x1280x93", lambda: i2v_case(200, heads=(9,)))
    if not args.quick and not args.no_variants:
        guard(cases, "variants_704x1280x93", variants_case)
    if not args.quick:
        guard(cases, "sdpa_backends_704x1280x93", lambda: sdpa_backends(200))
    res["total_s"] = round(time.perf_counter() - t0, 1)

    big = cases.get("704x1280x93", {})
    errs = [v for c in ("480x832x93", "704x1280x93") for kk, v in cases.get(c, {}).items() if kk.endswith("rel_err")]
    errs += [v for part in ("noisy", "cond") for kk, v in cases.get("i2v_704x1280x93", {}).get(part, {}).items()
             if kk.endswith("rel_err")]
    res["targets"] = {"fwd_bwd_speedup_704": big.get("speedup_fwd_bwd"), "max_rel_err": max(errs) if errs else None}
    res["targets"]["meets_8x"] = bool(big.get("speedup_fwd_bwd") and big["speedup_fwd_bwd"] >= 8)
    res["targets"]["meets_1e-2"] = bool(errs) and max(errs) <= 1e-2

    # short table last
    print("\ncase                 dense fwd  bsa fwd  x     dense f+b  bsa f+b  x     max rel err")
    rows = [(c, cases.get(c, {})) for c in ("480x832x93", "704x1280x93")]
    rows += [(f"i2v {p}", cases.get("i2v_704x1280x93", {}).get(p, {})) for p in ("noisy", "cond")]
    for name, r in rows:
        if "bsa_fwd_bwd_ms" not in r:
            print(f"{name:20s} {r.get('error', 'no result')[:60]}")
            continue
        e = max([v for kk, v in r.items() if kk.endswith("rel_err")] or [float("nan")])
        print(f"{name:20s} {r['dense_fwd_ms']:8.2f} {r['bsa_fwd_ms']:8.2f} {r['speedup_fwd']:5.1f} "
              f"{r['dense_fwd_bwd_ms']:10.2f} {r['bsa_fwd_bwd_ms']:8.2f} {r['speedup_fwd_bwd']:5.1f} {e:10.2e}")
    var = cases.get("variants_704x1280x93", {})
    for row in var.get("rows", []):
        cfg = {x: y for x, y in row.items() if x not in ("kernel", "ms", "tflops", "error")}
        print(f"variant {row['kernel']:5s} {json.dumps(cfg):55s} "
              + (f"{row['ms']:7.2f} ms {row['tflops']:6.0f} TFLOP/s" if "ms" in row else row.get("error", "")))
    if "suggested_config" in var:
        print("suggested config:", json.dumps(var["suggested_config"]), "fwd+bwd",
              f"{var.get('bsa_fwd_bwd_suggested_ms', float('nan')):.2f} ms")
    print("targets:", json.dumps(res["targets"]), f"total {res['total_s']} s")
    return res


if __name__ == "__main__":
    main()
