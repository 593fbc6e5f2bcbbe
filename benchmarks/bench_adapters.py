"""One training step of each adapter type (train.adapter: lora, dora, lokr, loha) on the full-size DiT at
480x832x93, in one process, with what ``longcat_nb.train`` applies by default on this GPU (checkpointing
mode, compiled blocks, SDPA preference, TF32 for the adapter's fp32 matmuls): sec/step, first-step time
and peak memory of each, plain LoRA first as the baseline. The harness is bench_official.py's
(``run_train``: random-initialised bf16 DiT, the five attention targets at rank 32, AdamW); only the
adapter differs.

    python benchmarks/bench_adapters.py                 # GPU; JSON to $OUT/adapters.json
    python benchmarks/bench_adapters.py --tiny          # plumbing check on the CPU (tiny DiT)
    python benchmarks/bench_adapters.py --adapters lora,dora --repeat 3 --warmup 2
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_official as B  # noqa: E402  (sets up sys.path and, for --tiny on the CPU, TRITON_INTERPRET)

from longcat_nb.config import ADAPTERS  # noqa: E402


def adapter_adder(kind: str):
    """bench_official's ``add_lora_to`` for one adapter type: the kit's add_lora, trainables in fp32."""
    def add(_model_kind, model):
        from longcat_nb.lora import add_lora

        add_lora(model, rank=B.RANK, alpha=B.RANK, targets=B.TARGETS, adapter=kind, init_seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # as train.py: the adapter and its optimizer state in fp32
        return params
    return add


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma list of {', '.join(ADAPTERS)}")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per adapter")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    ap.add_argument("--tiny", action="store_true", help="tiny DiT and latents (the CPU plumbing check)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "adapters.json"))
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.adapters.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in ADAPTERS]:
        ap.error(f"--adapters {bad}: choose from {', '.join(ADAPTERS)}")
    C = B.Ctx
    C.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not B.cuda() and not args.tiny:
        print(json.dumps({"error": "needs a CUDA GPU (or --tiny)"}))
        return 1
    C.tiny, C.dtype = args.tiny, torch.bfloat16 if B.cuda() else torch.float32
    C.repeat, C.warmup = args.repeat, args.warmup
    if args.tiny:
        C.depth, C.heads, C.head_dim = B.TINY_DIT["depth"], 2, 32
        C.text_len, C.text_dim = 16, B.TINY_DIT["caption_channels"]
        C.dit_cfg = {k: v for k, v in B.TINY_DIT.items() if k != "depth"}
    from longcat_nb.models import attention as attn_mod

    C.initial_sdpa, C.initial_tf32 = attn_mod.sdpa_preference(), torch.backends.cuda.matmul.allow_tf32
    latent = (B.TINY_DIT_LATENTS if args.tiny else B.DIT_LATENTS)["480x832x93"]
    import peft

    res = {"benchmark": "adapter_types_train_step", "size": "480x832x93", "latent": list(latent),
           "device": torch.cuda.get_device_name() if B.cuda() else "cpu", "tiny": args.tiny,
           "torch": torch.__version__, "peft": peft.__version__, "rank": B.RANK, "targets": list(B.TARGETS),
           "depth": C.depth, "repeat": args.repeat, "warmup": args.warmup, "adapters": {}}
    for kind in kinds:
        t0 = time.perf_counter()
        B.add_lora_to = adapter_adder(kind)
        try:
            r = B.run_train("ours", B._defaults_train, latent)
            r["params_m"] = r.pop("lora_params_m")
        except Exception as e:  # report and go on to the next type
            r = {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-2500:]}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        res["adapters"][kind] = r
        print(json.dumps({kind: {k: r.get(k) for k in ("sec_per_step", "peak_gib", "params_m", "error")}}), flush=True)
        B.reset_global_state()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))  # after each type: a run cut short keeps what ran
    base = res["adapters"].get("lora", {}).get("sec_per_step")
    for r in res["adapters"].values():
        if base and r.get("sec_per_step"):
            r["vs_lora"] = round(r["sec_per_step"] / base, 3)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0 if all("error" not in r for r in res["adapters"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
