"""Compare our DiT with the official implementation on the same random weights.

The official code is never part of this repository: point OFFICIAL_LONGCAT at a folder holding
`longcat_video/` from meituan-longcat/LongCat-Video (fetched beside the project).

    OFFICIAL_LONGCAT=/path/to/checkout python benchmarks/parity_official.py --device cuda --dtype bfloat16

Prints JSON: full-size key/shape equality (meta device) and the relative error of the outputs on
a small config with masked text, per-frame timesteps, conditioning latents and the KV-cache path.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "parity_shim"))
sys.path.insert(0, os.environ.get("OFFICIAL_LONGCAT", str(HERE.parent / ".official")))
sys.path.insert(0, str(HERE.parent))

from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel as Official  # noqa: E402

from longcat_nb.models import LongCatVideoTransformer3DModel as Ours  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    res = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev), "dtype": args.dtype}
    bsa = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    with torch.device("meta"):
        a = Official(enable_flashattn2=True, cp_split_hw=[1, 1], text_tokens_zero_pad=True, bsa_params=bsa)
        b = Ours(enable_flashattn2=True, text_tokens_zero_pad=True, bsa_params=bsa)
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    res.update(full_tensors_official=len(sa), full_tensors_ours=len(sb), full_keys_shapes_identical=sa == sb)
    for zp in (True, False):
        cfg = dict(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, caption_channels=64,
                   adaln_tembed_dim=64, frequency_embedding_size=64, text_tokens_zero_pad=zp)
        off = Official(enable_flashattn2=True, cp_split_hw=[1, 1], **cfg).eval()
        ours = Ours(**cfg).eval()
        g = torch.Generator().manual_seed(1)
        sd = {k: torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.1)
              + (1.0 if k.endswith("norm.weight") else 0) for k, v in off.state_dict().items()}
        off.load_state_dict(sd)
        ours.load_state_dict(sd)
        off.to(dev, dtype)
        ours.to(dev, dtype)
        B, T, H, W, L = 2, 5, 6, 8, 12
        x = torch.randn(B, 16, T, H, W, generator=g).to(dev)
        y = torch.randn(B, 1, L, 64, generator=g).to(dev)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, 7:] = 0
        mask[1, 10:] = 0
        mask = mask.to(dev)
        cases = {
            "t2v_scalar_t": (torch.tensor([998.3, 412.7]), 0),
            "perframe_t_cond1": (torch.tensor([[0.0] + [700.0] * 4, [0.0] + [300.0] * 4]), 1),
            "perframe_t_cond2": (torch.tensor([[0.0, 0.0] + [850.0] * 3, [0.0, 0.0, 500.0, 400.0, 300.0]]), 2),
        }
        with torch.no_grad():
            for name, (t, nc) in cases.items():
                t = t.to(dev)
                res[f"zeropad={zp}/{name}"] = rel(ours(x, t, y, mask, num_cond_latents=nc),
                                                  off(x, t, y, mask, num_cond_latents=nc))
            cond = x[:, :, :2]
            z = torch.zeros(B, 2, device=dev)
            _, kva = off(cond, z, torch.zeros_like(y), None, return_kv=True, skip_crs_attn=True)
            _, kvb = ours(cond, z, torch.zeros_like(y), None, return_kv=True, skip_crs_attn=True)
            t = torch.full((B,), 600.0, device=dev)
            res[f"zeropad={zp}/kv_cache"] = rel(ours(x[:, :, 2:], t, y, mask, num_cond_latents=2, kv_cache_dict=kvb),
                                                off(x[:, :, 2:], t, y, mask, num_cond_latents=2, kv_cache_dict=kva))
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, f"parity_{dev.type}_{args.dtype}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
