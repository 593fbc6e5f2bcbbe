"""Our Triton block-sparse attention against dense SDPA on one GPU; errors against the reference.

    python benchmarks/bench_bsa.py [--out $OUT/bsa.json]

32 heads x 128, bf16, sparsity 0.9375, 4x4x4 blocks. Times are medians of triton.testing.do_bench.
"""
import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longcat_nb.models.bsa.reference import _block_layout, reference_bsa_attention, select_blocks  # noqa: E402
from longcat_nb.models.bsa.triton_bsa import bsa_attention  # noqa: E402

SHAPES = {"480x832x93": (24, 30, 52), "704x1280x93": (24, 44, 80)}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def sampled_reference(q, k, v, grid_q, grid_k, sel, n_blocks=48, heads=(0, 17)):
    """Exact attention of a few query blocks over their selected key blocks, in fp32."""
    pq, vq, mq = _block_layout(tuple(grid_q), (4, 4, 4), str(q.device))
    pk, vk, mk = _block_layout(tuple(grid_k), (4, 4, 4), str(q.device))
    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(mq, generator=g)[:n_blocks].tolist()
    outs = []
    idx_q_all = []
    for h in heads:
        for b in blocks:
            qi = pq[b * 64:(b + 1) * 64][vq[b * 64:(b + 1) * 64]]
            ks = torch.cat([pk[j * 64:(j + 1) * 64][vk[j * 64:(j + 1) * 64]] for j in sel[0, h, b].tolist()])
            s = (q[0, h, qi].float() @ k[0, h, ks].float().T) / math.sqrt(q.shape[-1])
            outs.append(torch.softmax(s, -1) @ v[0, h, ks].float())
            idx_q_all.append((h, qi))
    return outs, idx_q_all


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bsa.json"))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "cases": {}}
    torch.manual_seed(0)
    for name, grid in SHAPES.items():
        r = {}
        try:
            n = grid[0] * grid[1] * grid[2]
            q, k, v = (torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
            sel = select_blocks(q.detach(), k.detach(), grid, grid, 0.9375)
            r["key_blocks_selected"] = int(sel.shape[-1])
            out = bsa_attention(q, k, v, grid, grid, sel=sel)
            refs, where = sampled_reference(q.detach(), k.detach(), v.detach(), grid, grid, sel)
            got = torch.cat([out[0, h, qi].float() for h, qi in where])
            r["fwd_rel_err_vs_reference"] = rel(got, torch.cat(refs))
            ms = lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")  # noqa: E731
            r["dense_fwd_ms"] = ms(lambda: F.scaled_dot_product_attention(q, k, v))
            r["bsa_fwd_ms"] = ms(lambda: bsa_attention(q, k, v, grid, grid))
            r["bsa_fwd_fixed_selection_ms"] = ms(lambda: bsa_attention(q, k, v, grid, grid, sel=sel))

            def dense_fb():
                o = F.scaled_dot_product_attention(q, k, v)
                torch.autograd.grad(o, (q, k, v), do)

            def bsa_fb():
                o = bsa_attention(q, k, v, grid, grid)
                torch.autograd.grad(o, (q, k, v), do)
            r["dense_fwd_bwd_ms"] = ms(dense_fb)
            r["bsa_fwd_bwd_ms"] = ms(bsa_fb)
            r["speedup_fwd"] = r["dense_fwd_ms"] / r["bsa_fwd_ms"]
            r["speedup_fwd_bwd"] = r["dense_fwd_bwd_ms"] / r["bsa_fwd_bwd_ms"]
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:400]
            r["trace"] = traceback.format_exc()[-1500:]
        res["cases"][name] = r
        print(name, {k: v for k, v in r.items() if k != "trace"}, flush=True)
        torch.cuda.empty_cache()
    # gradients against the dense masked reference (2 heads fit in fp32 at 480p), and an I2V case
    for label, gq, gk, nc in (("grad_480p_2heads", (24, 30, 52), (24, 30, 52), 0),
                              ("i2v_noisy_queries_480p_2heads", (23, 30, 52), (24, 30, 52), 1)):
        r = {}
        try:
            sq, sk = math.prod(gq), math.prod(gk)
            q = torch.randn(1, 2, sq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(1, 2, sk, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            do = torch.randn(1, 2, sq, 128, device="cuda", dtype=torch.bfloat16)
            sel = select_blocks(q.detach(), k.detach(), gq, gk, 0.9375)
            o = bsa_attention(q, k, v, gq, gk, sel=sel)
            g = torch.autograd.grad(o, (q, k, v), do)
            qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
            ro = reference_bsa_attention(qf, kf, vf, gq, gk, sel=sel)
            gr = torch.autograd.grad(ro, (qf, kf, vf), do.float())
            r = {"out_rel_err": rel(o, ro), "dq_rel_err": rel(g[0], gr[0]), "dk_rel_err": rel(g[1], gr[1]),
                 "dv_rel_err": rel(g[2], gr[2])}
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-1500:]}
        res["cases"][label] = r
        print(label, {k: v for k, v in r.items() if k != "trace"}, flush=True)
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
