"""Full-size Wan 2.1 VAE (diffusers AutoencoderKLWan defaults, random weights) encoding and decoding a
480x832x93 clip, with and without tiling; time and peak memory of each. JSON out.

    python benchmarks/bench_vae.py [--out $OUT/vae.json]
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
from longcat_nb.vae import decode_latents, encode_video, set_tiling  # noqa: E402

GIB = 2**30


def main():
    from diffusers import AutoencoderKLWan

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "vae.json"))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "clip": "480x832x93", "cases": {}}
    torch.manual_seed(0)
    vae = AutoencoderKLWan().cuda().eval().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.rand(1, 3, 93, 480, 832, device="cuda", generator=g) * 2 - 1
    z = None
    for dtype in (torch.bfloat16, torch.float32):
        vae.to(dtype)
        for tiling in (True, False):
            name = f"encode_{str(dtype)[6:]}_{'tiled' if tiling else 'untiled'}"
            try:
                set_tiling(vae, tiling)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                z = encode_video(vae, video.to(dtype), generator=torch.Generator(device="cuda").manual_seed(1))
                torch.cuda.synchronize()
                res["cases"][name] = {"sec": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                                      "peak_above_weights_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
                                      "latent_shape": list(z.shape)}
            except Exception as e:
                res["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                torch.cuda.empty_cache()
            print(name, res["cases"][name], flush=True)
    vae.to(torch.bfloat16)
    set_tiling(vae, True)
    try:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = decode_latents(vae, z)
        torch.cuda.synchronize()
        res["cases"]["decode_bfloat16_tiled"] = {"sec": time.perf_counter() - t0,
                                                 "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                                                 "video_shape": list(out.shape)}
    except Exception as e:
        res["cases"]["decode_bfloat16_tiled"] = {"error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-800:]}
    print("decode", res["cases"]["decode_bfloat16_tiled"], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
