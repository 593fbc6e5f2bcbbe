"""Full-size Wan 2.1 VAE (diffusers ``AutoencoderKLWan()`` defaults = the LongCat-Video VAE architecture,
random weights) on a 480x832x93 clip, through the cache's own encode path (``cache.encode_latents``:
posterior sample with a CPU-drawn seed, deterministic cuDNN).

Cases: encode in bf16 and fp32, untiled and tiled; decode in bf16 tiled and untiled. Each reports
seconds (after one warm-up encode of a 5-frame clip) and peak ``torch.cuda.max_memory_allocated``
(total and above the weights), and whether it fits a 24 GB card. Also: whether two encodes of the same
clip are bit-identical (the cache's resume guarantee on GPU) and how far tiled latents are from untiled.
Every case is in try/except: an OOM is reported, not fatal. About 1-2 minutes on an H100.

    python benchmarks/bench_vae.py            # JSON on stdout and in $OUT/vae_bench.json (or ./)
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longcat_nb.cache import _deterministic_cudnn, encode_latents  # noqa: E402
from longcat_nb.vae import decode_latents, set_tiling  # noqa: E402

GIB = 2**30
H, W, F = 480, 832, 93


def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return out, {"sec": round(time.perf_counter() - t0, 3), "peak_gib": round(peak / GIB, 3),
                 "peak_above_weights_gib": round((peak - base) / GIB, 3), "fits_24gb": peak < 22 * GIB}


def case(res, name, fn):
    try:
        out, stats = measure(fn)
        res["cases"][name] = stats
    except Exception as e:  # OOM or anything else: reported, the next case still runs
        out = None
        res["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:400],
                              "oom": isinstance(e, torch.OutOfMemoryError), "trace": traceback.format_exc()[-600:]}
    torch.cuda.empty_cache()
    print(name, json.dumps(res["cases"][name]), file=sys.stderr, flush=True)
    return out


def main():
    from diffusers import AutoencoderKLWan

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "vae_bench.json"))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "clip": f"{H}x{W}x{F}",
           "vae": "AutoencoderKLWan() defaults, random weights", "cases": {}, "checks": {}}
    torch.manual_seed(0)
    vae = AutoencoderKLWan().cuda().eval().requires_grad_(False)
    res["vae_params_m"] = round(sum(p.numel() for p in vae.parameters()) / 1e6, 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.rand(1, 3, F, H, W, device="cuda", generator=g) * 2 - 1
    latents = {}
    with torch.no_grad(), _deterministic_cudnn():
        for dtype in (torch.bfloat16, torch.float32):
            vae.to(dtype)
            dn = str(dtype).replace("torch.", "")
            set_tiling(vae, False)
            encode_latents(vae, video[:, :, :5], seed=1)  # warm-up (cuDNN plans, allocator)
            for tiling in (False, True):
                set_tiling(vae, tiling)
                name = f"encode_{dn}_{'tiled' if tiling else 'untiled'}"
                z = case(res, name, lambda: encode_latents(vae, video, seed=1))
                if z is not None:
                    latents[name] = z.float().cpu()
                    res["cases"][name]["latent_shape"] = list(z.shape)
        # the cache's resume guarantee: the same clip encodes to the same bits
        vae.to(torch.bfloat16)
        set_tiling(vae, False)
        try:
            again = encode_latents(vae, video, seed=1).float().cpu()
            ref = latents.get("encode_bfloat16_untiled")
            res["checks"]["bf16_untiled_encode_repeatable_bitwise"] = bool(ref is not None and torch.equal(ref, again))
        except Exception as e:
            res["checks"]["bf16_untiled_encode_repeatable_bitwise"] = f"{type(e).__name__}: {e}"[:200]
        for dn in ("bfloat16", "float32"):
            a, b = latents.get(f"encode_{dn}_untiled"), latents.get(f"encode_{dn}_tiled")
            if a is not None and b is not None:
                res["checks"][f"{dn}_tiled_vs_untiled_max_abs"] = float((a - b).abs().max())
                res["checks"][f"{dn}_tiled_vs_untiled_rel_l2"] = float((a - b).norm() / a.norm())
        a, b = latents.get("encode_bfloat16_untiled"), latents.get("encode_float32_untiled")
        if a is not None and b is not None:
            res["checks"]["bf16_vs_fp32_rel_l2"] = float((a - b).norm() / b.norm())
        z = next((latents[k] for k in ("encode_bfloat16_untiled", "encode_bfloat16_tiled") if k in latents), None)
        if z is None:
            z = torch.randn(1, 16, 1 + (F - 1) // 4, H // 8, W // 8)
        z = z.cuda()
        del video
        for tiling in (True, False):
            set_tiling(vae, tiling)
            out = case(res, f"decode_bfloat16_{'tiled' if tiling else 'untiled'}", lambda: decode_latents(vae, z))
            if out is not None:
                res["cases"][f"decode_bfloat16_{'tiled' if tiling else 'untiled'}"]["video_shape"] = list(out.shape)
            del out
    text = json.dumps(res, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
