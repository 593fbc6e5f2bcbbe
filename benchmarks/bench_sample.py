"""One CFG sampling step of the kit's sampler with the full-size DiT on one GPU (random bf16 weights):
480x832x93 (latent 24x60x104 = 37,440 tokens), CFG batch 2 [negative, positive], 512 text tokens.
A step is exactly what ``sampling.denoise`` does per timestep: ``predict_velocity`` (DiT forward on the
CFG batch + CFG-Zero*) then the checkpoint scheduler's Euler step on −v.

    python benchmarks/bench_sample.py [--cases eager,compile_blocks] [--repeat 3] [--out DIR]

Cases: eager (torch's SDPA choice), compile_blocks (``speed.apply_compile(dit, "blocks")``: each
block compiled), compile_glue (only the float32 element-wise glue), i2v (eager, first latent frame
held as conditioning: per-frame timesteps, ``num_cond_latents=1``). Each case reports the median
seconds per step over ``--repeat`` runs after the warm-up and the peak ``torch.cuda.max_memory_allocated``;
a failing case (compile error, OOM) is reported and the others still run. JSON goes to stdout and
to ``$OUT/sample_bench.json`` (or ``--out``). The weights are built under ``torch.device("meta")``
and materialized in bf16 on the GPU (no 54 GB float32 copy), deterministic (seeded CUDA generator).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from longcat_nb.sampling import predict_velocity, set_scheduler  # noqa: E402
from bench_dit import random_full_dit as full_size_dit  # noqa: E402  (the same seeded random weights)

GIB = 2**30


def make_inputs(device: str = "cuda", seed: int = 1, frames: int = 93, height: int = 480, width: int = 832):
    g = torch.Generator(device=device).manual_seed(seed)
    T, h, w = 1 + (frames - 1) // 4, height // 8, width // 8
    latents = torch.randn(1, 16, T, h, w, device=device, generator=g)
    emb = torch.randn(2, 1, 512, 4096, device=device, generator=g).to(torch.bfloat16)
    mask = torch.zeros(2, 512, dtype=torch.long, device=device)
    mask[0, :1] = 1  # the empty negative prompt: one EOS token
    mask[1, :120] = 1  # a long positive prompt
    return latents, emb, mask


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)


def sampling_step(dit, sched, latents, emb, mask, num_cond: int = 0, guidance: float = 4.0):
    """One denoising step at the first timestep of the 50-step schedule, as ``sampling.denoise`` runs it."""
    set_scheduler(sched, 50, "normal", latents.device)
    t = sched.timesteps[0]
    v = predict_velocity(dit, latents, t, emb, mask, guidance, num_cond)
    return sched.step(-v, t, latents[:, :, num_cond:], return_dict=False)[0]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else 0.0


def run_case(name: str, dit, inputs, repeat: int) -> dict:
    from longcat_nb import speed

    latents, emb, mask = inputs
    sched = scheduler()
    num_cond, warmup = 0, 1
    if name == "compile_blocks":
        speed.apply_compile(dit, "blocks")
        warmup = 2  # the first calls compile (and may recompile once for the second shape of guards)
    elif name == "compile_glue":
        speed.apply_compile(dit, "glue")
        warmup = 2
    elif name == "i2v":
        num_cond = 1
    elif name != "eager":
        raise ValueError(f"unknown case {name!r}: eager, compile_blocks, compile_glue, i2v")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        med, times = timed(lambda: sampling_step(dit, sched, latents, emb, mask, num_cond), repeat, warmup)
    out = sampling_step(dit, sched, latents, emb, mask, num_cond)
    return {"sec_per_step": round(med, 3), "times": [round(x, 3) for x in times], "warmup_calls": warmup,
            "wall_s_incl_warmup": round(time.perf_counter() - t0, 1),
            "peak_gib": _peak_gib(), "finite": bool(torch.isfinite(out).all())}


def undo_compile(dit) -> None:
    from longcat_nb import speed

    speed.disable_compile()
    for block in dit.blocks:
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
    torch._dynamo.reset()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="eager,compile_blocks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--smoke", action="store_true",
                    help="a 2-block, 256-wide DiT at 64x64x9 (checks the script; runs on the CPU too)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"error": "needs a CUDA GPU (or --smoke)"}))
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = dict(frames=9, height=64, width=64) if args.smoke else dict(frames=93, height=480, width=832)
    config = dict(hidden_size=256, depth=2, num_heads=2) if args.smoke else {}
    T, h, w = 1 + (size["frames"] - 1) // 4, size["height"] // 8, size["width"] // 8
    report = {
        "benchmark": "sample_step", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "smoke": args.smoke,
        "shape": {**size, "latent": [16, T, h, w], "tokens": T * h * w // 4, "cfg_batch": 2, "text_tokens": 512},
        "dtype": "bfloat16", "cases": {},
    }
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    dit = full_size_dit(device, **config)
    _sync()
    report["build_s"] = round(time.perf_counter() - t0, 1)
    report["resident_gib"] = round(torch.cuda.memory_allocated() / GIB, 2) if device == "cuda" else 0.0
    inputs = make_inputs(device, **size)
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        try:
            report["cases"][name] = run_case(name, dit, inputs, args.repeat)
        except Exception as e:  # one failing case must not hide the others
            report["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                     "traceback": traceback.format_exc()[-3000:]}
        finally:
            undo_compile(dit)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({name: report["cases"][name]}), file=sys.stderr, flush=True)
    base = report["cases"].get("eager", {}).get("sec_per_step")
    if base:
        for c in report["cases"].values():
            if c.get("sec_per_step"):
                c["speedup_vs_eager"] = round(base / c["sec_per_step"], 3)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sample_bench.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
