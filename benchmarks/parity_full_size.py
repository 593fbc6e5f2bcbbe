"""Parity at full size on the GPU: our DiT against the official one (both eager, bf16, the same random
weights as bench_official.py), next to how far two SDPA kernels (flash, cuDNN) of our own model and
bf16 against fp32 drift apart on the same input. A random 48-block DiT amplifies rounding, so the
official-vs-ours difference is only meaningful beside those two. JSON out.

    OFFICIAL_LONGCAT=.official python benchmarks/parity_full_size.py
"""
import json
import sys
from pathlib import Path

import torch

sys.argv = [sys.argv[0], "--cases", "sample_dense"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_official as bo  # noqa: E402
bo.Ctx.device, bo.Ctx.dtype, bo.Ctx.depth = "cuda", torch.bfloat16, 48
bo.Ctx.dit_cfg = {}
from longcat_nb.models.attention import set_sdpa_preference  # noqa: E402

latent = bo.DIT_LATENTS["480x832x93"]
res = {}
m = bo.build_dit("ours")
x, y, mask = bo.dit_inputs(1, latent)
t = torch.full((1,), 998.0, device="cuda")
outs = {}
with torch.no_grad():
    for pref in ("flash", "cudnn"):
        set_sdpa_preference(pref)
        outs[pref] = m(x, t, y, mask).float()
    m.float()
    set_sdpa_preference("auto")
    outs["fp32"] = m(x, t, y, mask).float()
res["ours_flash_vs_cudnn"] = bo.rel(outs["flash"], outs["cudnn"])
res["ours_bf16_vs_fp32"] = bo.rel(outs["cudnn"], outs["fp32"])
del m; torch.cuda.empty_cache()
o = bo.build_dit("official")
with torch.no_grad():
    off = o(x, t, y, mask).float()
res["official_eager_vs_ours_cudnn"] = bo.rel(off, outs["cudnn"])
res["official_eager_vs_ours_fp32"] = bo.rel(off, outs["fp32"])
print(json.dumps(res))
