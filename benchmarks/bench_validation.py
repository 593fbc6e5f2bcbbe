"""Issue 30: a validation clip during training with the checkpoint's distill LoRA (``validation_distilled``:
16 steps, no CFG, ``lora/cfg_step_lora`` stacked under the LoRA being trained) against CFG validation
(``validation_steps`` 40, or N with ``--variants cfgN``, guidance 4), in one process, through the kit's own
``Validator`` on the model as training prepares it (``prepare_for_training``: compile auto,
checkpointing, the attention backend), full-size DiT at 480x832x93.

The checkpoint is the published layout with random weights (``e2e_full_size.write_checkpoint``), plus a
random distill LoRA in the official layout with the shipped file's shape (rank 128, alpha_scale 0.5,
fp32; per block attn.qkv, attn.proj, cross_attn.q_linear, cross_attn.kv_linear, ffn.w1/w2/w3). With
random weights only the time and memory mean something: how close the distilled clip comes to the
40-step one needs the published weights. The relative difference of the two clips is written anyway
(``clip_rel_diff``), so the same script answers that question where the real checkpoint is given
with ``--checkpoint``.

    python benchmarks/bench_validation.py                      # GPU; JSON to $OUT/validation.json
    python benchmarks/bench_validation.py --checkpoint DIR     # a checkpoint folder with lora/cfg_step_lora
    python benchmarks/bench_validation.py --tiny               # plumbing on the CPU (tiny model, 64x64x9)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "a red ball bounces across a wooden floor, soft daylight"
DISTILL_TARGETS = {"attn.qkv": 3, "attn.proj": 1, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2,
                   "ffn.w1": 1, "ffn.w2": 1, "ffn.w3": 1}  # module -> n-way split of its up (spec §9)


def write_distill_lora(dit, path: Path, rank: int, seed: int = 0) -> int:
    """A random LoRA in the official layout (``lora___lorahyphen___`` keys, split ups for the fused
    layers, ``alpha_scale``), with the shipped cfg_step_lora's targets; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from longcat_nb.lora import OFFICIAL_PREFIX, OFFICIAL_SEP

    g, sd = torch.Generator().manual_seed(seed), {}
    for i in range(len(dit.blocks)):
        for target, n in DISTILL_TARGETS.items():
            lin = dit.blocks[i].get_submodule(target)
            key = OFFICIAL_PREFIX + OFFICIAL_SEP.join(["blocks", str(i), *target.split(".")])
            sd[f"{key}.lora_down.weight"] = torch.randn(n * rank, lin.in_features, generator=g) / lin.in_features ** 0.5
            ups = [torch.randn(lin.out_features // n, rank, generator=g) * 0.01 for _ in range(n)]
            if n == 1:
                sd[f"{key}.lora_up.weight"] = ups[0]
            else:
                sd.update({f"{key}.lora_up.blocks.{j}.weight": u for j, u in enumerate(ups)})
            sd[f"{key}.alpha_scale"] = torch.tensor(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return sum(t.numel() for t in sd.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a model folder with lora/cfg_step_lora.safetensors (default: write one)")
    ap.add_argument("--work", default="/tmp/bench_validation")
    ap.add_argument("--variants", default="distilled,cfg40",
                    help="comma list of distilled and cfgN (N CFG steps: cfg40, cfg20 = the default validation_steps)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 64x64x9, on the CPU")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "validation.json"))
    args = ap.parse_args(argv)

    import torch

    from e2e_full_size import write_checkpoint
    from longcat_nb.config import update_section
    from longcat_nb.distributed import Dist
    from longcat_nb.model_files import load_dit
    from longcat_nb.prepare import prepare_for_training
    from longcat_nb.train import Validator, checkpointing_mode, load_config

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        print(json.dumps({"error": "needs a CUDA GPU (or --tiny)"}))
        return 1
    work, res = Path(args.work), {"benchmark": "validation_distilled_vs_cfg", "tiny": args.tiny,
                                  "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                  "torch": torch.__version__, "variants": {}}
    out = Path(args.out)

    def put(key, value):
        res[key] = value
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))  # as it goes: a run cut short keeps what ran
        print(json.dumps({key: value}), flush=True)

    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "checkpoint"
    if not args.checkpoint:
        info = write_checkpoint(ckpt, args.tiny, device)
        from longcat_nb.models import LongCatVideoTransformer3DModel

        with torch.device("meta"):  # shapes only
            dit = LongCatVideoTransformer3DModel.from_config(LongCatVideoTransformer3DModel.load_config(ckpt / "dit"))
        info["distill_lora_params"] = write_distill_lora(dit, ckpt / "lora" / "cfg_step_lora.safetensors",
                                                         rank=4 if args.tiny else 128)
        del dit
        if device == "cuda":
            torch.cuda.empty_cache()  # the writer's blocks back, so the measured run starts clean
        put("checkpoint", {**info, "wall_s": round(time.perf_counter() - t0, 1)})
    h, w, f = (64, 64, 9) if args.tiny else (480, 832, 93)
    run = work / "run"
    update_section(run, "model", checkpoint=str(ckpt), device=device)
    update_section(run, "train", validation_prompts=[PROMPT], validation_height=h, validation_width=w,
                   validation_frames=f, validation_preview_every=0)
    cfg = load_config(run)
    t0 = time.perf_counter()
    model = load_dit(ckpt, device, "bfloat16" if device == "cuda" else "float32")  # as train.py loads it
    prep = prepare_for_training(model, cfg.train, torch.device(device), Dist(), cfg.model.attention,
                                checkpointing_mode(cfg.train, torch.device(device), cfg.dataset), log=print)
    put("load_and_prepare_s", round(time.perf_counter() - t0, 1))
    videos = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        kw = dict(validation_distilled=True) if name == "distilled" else \
            dict(validation_distilled=False, validation_steps=int(name[3:]), validation_guidance=4.0)
        cfg = update_section(run, "train", **kw)
        v = Validator(run, cfg, save=False)
        prep.model.eval()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        clip = next(iter(v(1, prep.model).values()))[1]
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        prep.model.train()
        videos[name] = clip.float() if hasattr(clip, "float") else torch.as_tensor(clip).float()
        rec = {"seconds": round(secs, 2), "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
               if device == "cuda" else None, "finite": bool(torch.isfinite(videos[name]).all())}
        res["variants"][name] = rec
        put("variants", res["variants"])
    if "distilled" in videos and "cfg40" in videos:
        a, b = videos["distilled"], videos["cfg40"]
        put("clip_rel_diff_distilled_vs_cfg40", round(float((a - b).norm() / b.norm()), 4))
    base = res["variants"].get("cfg40", {}).get("seconds")
    for r in res["variants"].values():
        if base and r.get("seconds"):
            r["vs_cfg40"] = round(r["seconds"] / base, 3)
    put("variants", res["variants"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
