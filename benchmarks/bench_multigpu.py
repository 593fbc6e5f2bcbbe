"""The kit's training loop on 1 or N GPUs (FSDP2), full-size DiT with random weights, 480x832x93.

    python benchmarks/bench_multigpu.py --run-dir /tmp/mg1 --steps 4                       # 1 GPU
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_multigpu.py --run-dir /tmp/mg2 --steps 4
    python benchmarks/bench_multigpu.py --run-dir /tmp/mg2 --steps 5 --grad-accum 2         # resume on 1

Each process builds the same seeded DiT on its GPU (bench_dit.random_full_dit) and calls
``longcat_nb.train.train`` with an in-memory dataset of random cached-latent entries (latents
[16, 24, 60, 104], 512 text tokens x 4096), so the measured loop is exactly the kit's, FSDP included.
Prints JSON (device, processes, per-step seconds, per-GPU peak GiB from the training log) and writes
it to ``$OUT/multigpu_<N>.json`` when OUT is set. ``--tiny`` runs the tiny checkpoint at 64x64x9 on
any device (a CPU check of this script under gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from longcat_nb.config import update_section  # noqa: E402
from longcat_nb.train import train  # noqa: E402


class RandomCache:
    """The CachedDataset interface over random tensors of one bucket (deterministic per index)."""

    def __init__(self, n: int, latent_shape: tuple, text_tokens: int, text_dim: int):
        self.n, self.latent_shape, self.text_tokens, self.text_dim = n, latent_shape, text_tokens, text_dim

    def __len__(self) -> int:
        return self.n

    def buckets(self) -> dict:
        return {"x".join(map(str, self.latent_shape)): list(range(self.n))}

    def entry_meta(self, i: int) -> dict:
        return {"num_cond_latents": 0}

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        return {"latents": torch.randn(self.latent_shape, generator=g).to(torch.bfloat16),
                "text_embeds": torch.randn(1, self.text_tokens, self.text_dim, generator=g).to(torch.bfloat16),
                "text_mask": torch.ones(self.text_tokens, dtype=torch.long), "num_cond_latents": 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=4, help="train.steps (a resumed run continues to it)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoint, 64x64x9 (CPU check)")
    args = ap.parse_args()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    run = Path(args.run_dir)
    if args.tiny:
        from longcat_nb.model_files import load_dit, resolve_checkpoint

        dit = load_dit(resolve_checkpoint(""), "cpu", "float32")
        dataset = RandomCache(8, (16, 3, 8, 8), 16, dit.config.caption_channels)
        device = "cpu"
    else:
        from bench_dit import random_full_dit

        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        dit = random_full_dit(device)  # the same seed on every rank and every run
        dataset = RandomCache(64, (16, 24, 60, 104), 512, 4096)
    if rank == 0:
        update_section(run, "model", checkpoint="", device="cpu" if args.tiny else "cuda")
        update_section(run, "train", steps=args.steps, grad_accum=args.grad_accum, rank=32, alpha=32,
                       lr=1e-4, batch_size=1, base_precision=args.precision if not args.tiny else "fp32",
                       gradient_checkpointing=True, checkpoint_every=args.checkpoint_every, validate_every=0,
                       compile=args.compile, caption_dropout=0.0, seed=0)
    else:
        while not (run / "config.json").exists():  # rank 0 writes it before the process group exists
            time.sleep(0.1)
        time.sleep(0.5)
    negative = (torch.zeros(1, dataset.text_tokens, dataset.text_dim, dtype=torch.bfloat16),
                torch.zeros(dataset.text_tokens, dtype=torch.long))
    t0 = time.time()
    res = train(run, components=SimpleNamespace(dit=dit), dataset=dataset, negative=negative,
                log=lambda m: print(m, flush=True) if rank == 0 else None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    log = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    mine = [r for r in log if r.get("processes", 1) == world]
    secs = [r["sec"] for r in mine]
    out = {
        "benchmark": "multigpu_train", "device": torch.cuda.get_device_name(local) if not args.tiny else "cpu",
        "torch": torch.__version__, "processes": world, "shape": "64x64x9 tiny" if args.tiny else "480x832x93",
        "precision": "fp32" if args.tiny else args.precision, "compile": args.compile, "grad_accum": args.grad_accum,
        "samples_per_step": world * args.grad_accum, "steps_this_run": len(mine), "last_step": res.steps,
        "sec_per_step": statistics.median(secs[1:]) if len(secs) > 1 else (secs[0] if secs else None),
        "step_secs": secs, "peak_gib_per_gpu": mine[-1].get("mem_gib_per_gpu", [mine[-1].get("mem_gib")]) if mine else None,
        "losses": [r["loss"] for r in mine], "wall_s": round(time.time() - t0, 1),
        "resumed_from_other_world": any(r.get("processes", 1) != world for r in log),
    }
    print(json.dumps(out, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"multigpu_{world}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
