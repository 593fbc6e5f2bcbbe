"""The main job at full size: every stage as a user runs it, on a checkpoint folder of the published size,
with the kit's default settings (and, per card, the memory settings the planner recommends). JSON out.

    python benchmarks/e2e_full_size.py                       # one GPU: 80 GiB card (the GPU as it is)
    python benchmarks/e2e_full_size.py --cards 80,24,16      # the same run with the GPU capped per card
    python benchmarks/e2e_full_size.py --tiny                # the same script on the CPU (CI runs this)

What it does, in order (each stage a subprocess of the stage CLI, ``python -m longcat_nb STAGE``, so
its host-RAM peak is its own and no Jupyter is needed):

1. ``checkpoint``: a random checkpoint in the published layout: dit/ (the real config, sharded
   safetensors with their index), text_encoder/ (UMT5-XXL's config), tokenizer/ (the kit's offline
   tokenizer: the real spiece model cannot be downloaded here), vae/ (Wan 2.1), scheduler/. Weights are
   bf16 (the Hub files are larger), norms 1, vectors 0, matrices N(0, 1/fan_in).
2. ``dataset``: clips at real resolution (>= 480x832 area, >= 6.2 s at 15 fps), mixed aspect ratios, one
   with a conditioning image (an image-to-video sample), captions beside them.
3. ``load``: the DiT and the text encoder loaded to the GPU as the stages load them (time, host RSS).
4. ``scan`` -> ``cache`` -> ``train`` (``--train-steps``, one validation clip at 480x832x93) ->
   ``sample_t2v`` and ``sample_i2v`` (480x832x93, ``--sample-steps`` CFG steps, base and LoRA).

Per stage: wall seconds, GPU peak (torch's allocator), host RSS peak (VmHWM, pinned memory included)
and its two parts' peaks (``host_anon_peak_gib``: the process's own memory; ``host_file_peak_gib``:
mapped file pages), bytes written to disk. ``train`` and ``sample_*`` give ``load_s``, the checkpoint
read and the model made ready as that stage runs it (the ``load`` probe reads the bf16 model whole,
which no capped card holds). Training also gives each step's time, and from them **time to a LoRA**
at the defaults (:func:`time_to_lora`); sampling each clip's steps, and from them a clip at 04's 50
steps (:func:`clip_seconds`). ``--cards``: per card the GPU is
capped with LONGCAT_NB_GPU_MEMORY_GIB (torch.cuda.set_per_process_memory_fraction) and the planner's
recommendation for that size is applied; the planner's predictions are stored beside the measured peaks.
The JSON (``--out``, default $OUT/e2e.json or runs/e2e/e2e.json) is rewritten after every stage, so a run
stopped by a time limit still reports what it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# UMT5-XXL's encoder (spec §1.5)
UMT5_XXL = dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", vocab_size=256384, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
PROMPT = "A red ball bounces across a blue floor from left to right, soft shadows."
# (name, height, width, fps, seconds): real sizes, mixed aspect ratios; 'ball' has a conditioning image
FULL_CLIPS = [("ball", 480, 832, 15, 6.4), ("portrait", 832, 480, 30, 6.4), ("square", 640, 640, 15, 6.6),
              ("wide720", 720, 1280, 30, 6.3), ("landscape2", 480, 832, 15, 7.0), ("tall", 768, 512, 15, 6.4),
              ("cinema", 544, 960, 24, 6.5), ("classic", 600, 800, 15, 6.4)]
TINY_CLIPS = [("ball", 48, 80, 15, 1.0), ("portrait", 80, 48, 30, 1.0), ("square", 64, 64, 15, 1.0),
              ("wide", 45, 80, 15, 1.0)]


# ------------------------------------------------------------------------------------------------
# the checkpoint
# ------------------------------------------------------------------------------------------------
def random_init_(model, seed: int) -> None:
    """Norm weights 1, other vectors 0, matrices N(0, 1/fan_in) (the text encoder's token table N(0, 1)),
    each tensor from its own generator seeded by its name."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                g = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                token_table = name.endswith(("shared.weight", "embed_tokens.weight"))  # the text encoder's
                std = 1.0 if token_table else p[0].numel() ** -0.5
                p.normal_(0.0, std, generator=g)


def _materialize(cls_build, device, dtype, seed):
    """Build a model on the meta device, then allocate it on ``device`` in ``dtype`` and fill it: no fp32
    copy of a 13.6B model ever exists."""
    import torch

    with torch.device("meta"):
        m = cls_build()
    m = m.to(dtype).to_empty(device=device)
    random_init_(m, seed)
    return m.cpu() if device != "cpu" else m


def write_checkpoint(folder: Path, tiny: bool, device: str) -> dict:
    """The Hub layout with random weights: dit/ text_encoder/ tokenizer/ vae/ scheduler/ lora/."""
    import shutil

    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from longcat_nb.model_files import TINY_DIT, TINY_TEXT, TINY_VAE, build_tiny_tokenizer
    from longcat_nb.models import LongCatVideoTransformer3DModel

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.float32 if tiny else torch.bfloat16
    tok = build_tiny_tokenizer(tmp / "tokenizer")
    text_cfg = UMT5Config(**(dict(TINY_TEXT, vocab_size=len(tok)) if tiny else UMT5_XXL))
    enc = _materialize(lambda: UMT5EncoderModel(text_cfg), device, dtype, 1)
    enc.encoder.embed_tokens.weight = enc.shared.weight  # one token table, as in the published encoder
    enc.save_pretrained(tmp / "text_encoder", max_shard_size="5GB")
    del enc
    torch.manual_seed(2)
    AutoencoderKLWan(**(TINY_VAE if tiny else {})).save_pretrained(tmp / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0).save_pretrained(tmp / "scheduler")
    # the class defaults are the published config; the tiny one differs in size only
    dit_kw = dict(TINY_DIT) if tiny else dict(enable_flashattn2=True, text_tokens_zero_pad=True, cp_split_hw=None)
    dit = _materialize(lambda: LongCatVideoTransformer3DModel(**dit_kw), device, dtype, 3)
    n_params = sum(p.numel() for p in dit.parameters())
    dit.save_pretrained(tmp / "dit", max_shard_size="200KB" if tiny else "5GB", safe_serialization=True)
    del dit
    (tmp / "lora").mkdir()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return {"dit_params": n_params, "dit_shards": len(list((folder / "dit").glob("*.safetensors"))),
            "dtype": str(dtype).replace("torch.", "")}


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------
def _clip_frames(name: str, h: int, w: int, n: int, seed: int):
    """Moving shapes over a drifting gradient, with grain: content a VAE and a DiT have to work on."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3).astype(np.float32)
    tint = np.array([1, 0.5, -0.5], np.float32)
    grain = rng.standard_normal((8, h, w, 1), dtype=np.float32) * 3.0  # a few grain frames, cycled
    out = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        t = k / max(1, n - 1)
        row = base + 50 * np.sin((np.arange(w, dtype=np.float32) / w + t) * 6.28)[:, None] * tint  # [w, 3]
        img = np.broadcast_to(row, (h, w, 3)) + grain[k % 8]
        cx, cy = (0.15 + 0.7 * t) * w, h * (0.5 + 0.3 * np.sin(6.28 * 2 * t))
        img[((x - cx) ** 2 + (y - cy) ** 2) < (0.1 * min(h, w)) ** 2] = (230, 40, 30)
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_dataset(folder: Path, tiny: bool) -> dict:
    from PIL import Image

    from longcat_nb.data.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    clips = TINY_CLIPS if tiny else FULL_CLIPS
    for i, (name, h, w, fps, secs) in enumerate(clips):
        frames = _clip_frames(name, h, w, int(round(fps * secs)), i)
        write_mp4(folder / f"{name}.mp4", frames, fps)
        (folder / f"{name}.txt").write_text(f"{PROMPT} ({name}, {w}x{h})\n", encoding="utf-8")
        if name == "ball":  # an image-to-video sample: the clip's first frame conditions it
            Image.fromarray(frames[0]).save(folder / f"{name}.png")
    return {"clips": len(clips), "sizes": [f"{h}x{w}@{fps}fps,{secs}s" for _, h, w, fps, secs in clips],
            "conditioning_images": 1}


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def disk_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def run_cli(stage: str, run_dir: Path, params: dict, env: dict, log_path: Path) -> dict:
    """``python -m longcat_nb STAGE --run-dir R -p k=v ...``; its last 'done' JSON line, plus the wall
    time. The whole output goes to ``log_path``."""
    cmd = [sys.executable, "-m", "longcat_nb", stage, "--run-dir", str(run_dir)]
    for k, v in params.items():
        cmd += ["-p", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    t0 = time.time()
    with open(log_path, "w") as f:  # streamed: a run stopped by a time limit leaves its log so far
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    wall = time.time() - t0
    output = log_path.read_text(errors="replace")
    done, steps, validations = None, [], []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "done":
                done = ev
            elif ev.get("event") == "step":
                steps.append(ev)
            elif ev.get("event") == "validation":
                validations.append(ev)
    if proc.returncode != 0 or done is None:
        lines = output.splitlines()
        # the last lines, and the allocator's own account when the GPU ran out
        tail = "\n".join([ln for ln in lines if "out of memory" in ln.lower()][-2:] + lines[-15:])
        raise RuntimeError(f"{stage} failed (exit {proc.returncode}); last lines:\n{tail}")
    for key in ("event", "stage"):
        done.pop(key, None)
    done["wall_s"] = round(wall, 2)
    if steps:
        done["step_seconds"] = [round(s["sec"], 3) for s in steps]
        # a compiled block's graph is per latent shape and per number of image latents (an I2V sample: run 26)
        done["step_shapes"] = ["x".join(map(str, s.get("latent_shape") or []))
                               + (f"+cond{s['cond_latents']}" if s.get("cond_latents") else "") for s in steps]
        done["step_gpu_peak_gib"] = max((s.get("mem_gib") or 0.0) for s in steps) or None
        for key in ("reserved_gib", "alloc_retries", "host_rss_gib"):  # per step: a card too full, host growth
            if any(key in s for s in steps):
                done[f"step_{key}"] = [s.get(key) for s in steps]
    if validations:
        done["validations"] = [{"step": v["step"], "files": v["files"]} for v in validations]
    return done


LOAD_PROBE = r"""
import json, sys, time, torch
from longcat_nb.model_files import load_dit, load_text_encoder
from longcat_nb.stages import host_rss_peak_gib
dev = "cuda" if torch.cuda.is_available() else "cpu"
out = {}
t0 = time.time(); enc = load_text_encoder(sys.argv[1], dev); torch.cuda.synchronize() if dev == "cuda" else None
out["text_encoder_s"] = round(time.time() - t0, 2); del enc
t0 = time.time(); dit = load_dit(sys.argv[1], dev, "auto"); torch.cuda.synchronize() if dev == "cuda" else None
out["dit_s"] = round(time.time() - t0, 2)
out["host_rss_peak_gib"] = host_rss_peak_gib()
if dev == "cuda":
    out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
print(json.dumps(out))
"""


def probe_load(ckpt: Path, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(ckpt)], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": round(time.time() - t0, 2)}


def card_settings(card: int | None, tiny: bool, gpu_gib: float | None = None) -> dict:
    """The planner's recommendation for a card of ``card`` GiB: train and sample settings, with the
    predictions to hold against the measurements."""
    from dataclasses import replace

    from longcat_nb.planner import SMALL_CARD_GIB, SMALL_CARD_HOST_GIB, PlanSettings, plan, recommend, use_selective
    from longcat_nb.sampling import sampling_plan

    if tiny:
        return {"train": {}, "sample": {}, "dataset": {}, "predicted": {}}
    if card is None:  # the GPU as it is
        card = gpu_gib
    host = SMALL_CARD_HOST_GIB if card < SMALL_CARD_GIB else None  # issue 25: host RAM under 32 GiB there
    train_rec = recommend(PlanSettings(compile=True), card, host_gib=host)
    if train_rec is None:
        raise RuntimeError(f"the planner finds no training setting for {card} GiB")
    train_changes, train_plan = train_rec
    base = PlanSettings(compile=True)
    if not train_changes and use_selective(base, card):  # keep_attention=auto, as train.checkpointing_mode
        train_plan = plan(replace(base, selective=True))
    frames = train_changes.pop("num_frames", None)  # a clip length is the dataset's (and validation's)
    train = {"base_precision" if k == "precision" else k: v for k, v in train_changes.items()}
    dataset = {}
    if frames:
        dataset, train["validation_frames"] = {"num_frames": frames}, frames
    sample = {"offload": "model"} if card < 40 else {}
    values = dict(prompt=PROMPT, mode="t2v", height=480, width=832, num_frames=93, steps=50, guidance=4.0,
                  precision="auto", blocks_to_swap=0, compile="auto", **sample)
    sp = sampling_plan(values, gpu_gib=card)
    if sp["fits"] is False:
        sample_rec = recommend(PlanSettings(mode="sample", compile=True), card)
        if sample_rec is None:
            raise RuntimeError(f"the planner finds no sampling setting for {card} GiB")
        sample.update({"precision" if k == "precision" else k: v for k, v in sample_rec[0].items()})
        sp = sampling_plan({**values, **sample}, gpu_gib=card)
    return {"train": train, "sample": sample, "dataset": dataset,
            "predicted": {"train_peak_gib": round(train_plan.peak_gib, 1),
                          "train_host_ram_gib": round(train_plan.host_ram_gib, 1),
                          "sample_peak_gib": sp["peak_gib"], "sample_host_ram_gib": sp["host_ram_gib"],
                          "sample_encode_peak_gib": sp["encode_peak_gib"]}}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {**meta, "cards": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, card: str, stage: str, rec: dict) -> None:
        self.data["cards"].setdefault(card, {})[stage] = rec
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)
        print(json.dumps({"card": card, "stage": stage, **rec}), flush=True)


def stage_params(args, work: Path, ckpt: Path, data: Path, settings: dict) -> dict:
    """Each stage's -p settings: the defaults, the sizes of a real run (tiny: small), the card's memory
    settings."""
    val = {} if args.skip_validation else {"validation_prompts": [PROMPT], "validate_every": args.train_steps}
    if args.validation_steps and val:
        val["validation_steps"] = args.validation_steps
    if args.tiny:
        size = dict(num_frames=9, resolution="64x64")
        if val:
            val.update(validation_height=64, validation_width=64, validation_frames=9, validation_steps=2)
        sample_size = dict(height=64, width=64, num_frames=9)
    else:
        size = {}
        sample_size = dict(height=480, width=832, num_frames=93)
    return {
        "scan": {"checkpoint": str(ckpt), "dataset_dir": str(data), **size, **settings.get("dataset", {})},
        "cache": {},
        "train": {"steps": args.train_steps, "checkpoint_every": args.train_steps, **val, **settings["train"]},
        "sample_t2v": {"mode": "t2v", "prompt": PROMPT, "steps": args.sample_steps, "guidance": 4.0, "seed": 0,
                       **sample_size, **settings["sample"]},
        "sample_i2v": {"mode": "i2v", "image": str(data / "ball.png"), "prompt": PROMPT, "steps": args.sample_steps,
                       "guidance": 4.0, "seed": 0, **sample_size, **settings["sample"]},
    }


def time_to_lora(stages: dict, steps: int = 1000) -> dict | None:
    """Caching + the steps measured + the rest at the steady step time. Blocks are compiled for fixed
    shapes, so the first step of each new bucket shape compiles (run 21: 13-28 s more each); the steady
    step is the median of the steps that met a shape seen before (train.jsonl's ``latent_shape``), or,
    without those, of the steps within 1.5x the fastest; ``compile_s`` is what the others took more.
    ``steady`` says whether the step time is one to trust: some step repeated a shape, and those steps
    were within 1.5x the fastest (False: every step compiled, or a repeated shape was still slow, as in
    run 26's capped cards; then the estimate is an upper bound and the run was too short to say more)."""
    train = stages.get("train")
    if not train or not train.get("step_seconds"):
        return None
    secs, shapes = train["step_seconds"], train.get("step_shapes") or []
    repeats = [t for i, t in enumerate(secs) if i < len(shapes) and shapes[i] and shapes[i] in shapes[:i]]
    steady = statistics.median(repeats or [t for t in secs if t <= 1.5 * min(secs)])
    compile_s = max(0.0, sum(secs) - steady * len(secs))
    cache_s = stages.get("cache", {}).get("wall_s", 0.0)
    total = cache_s + sum(secs) + steady * max(0, steps - len(secs))
    return {"steps": steps, "step_s": round(steady, 3), "first_step_s": round(secs[0], 2),
            "compile_s": round(compile_s, 1), "measured_steps": len(secs),
            "steady": bool(repeats) and steady <= 1.5 * min(secs),
            "cache_s": cache_s,
            "total_s": round(total, 1), "total_h": round(total / 3600, 2)}


def clip_seconds(timings: dict, steps: int = 50) -> float | None:
    """A clip at ``steps`` denoising steps from one measured at fewer (the sample stage's ``timings``):
    its prompt encoding, placement, first step (which compiles) and decode as measured, the other
    steps at the median of the measured steps after the first."""
    measured = timings.get("steps_s") or []
    if not measured:
        return None
    steady = statistics.median(measured[1:] or measured)
    return round(timings["text_s"] + timings["place_s"] + measured[0] + steady * (steps - 1) + timings["decode_s"], 1)


def run_card(args, report: Report, card: int | None, work: Path, ckpt: Path, data: Path) -> None:
    label = f"{card}GiB" if card else ("cpu" if args.tiny else "gpu")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if card:
        env["LONGCAT_NB_GPU_MEMORY_GIB"] = str(card)
    settings = card_settings(card, args.tiny, args.gpu_gib)
    report.put(label, "settings", settings)
    run_dir = work / f"run-{label}"
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    done = {}
    if "load" in args.stages:
        report.put(label, "load", probe_load(ckpt, env))
    for stage, params in stage_params(args, work, ckpt, data, settings).items():
        if stage not in args.stages:
            continue
        before = disk_bytes(run_dir)
        cli = "sample" if stage.startswith("sample") else stage
        try:
            # beside the report, so a device call brings every stage's whole output back with it
            rec = run_cli(cli, run_dir, params, env, report.path.parent / f"{label}-{stage}.log")
        except RuntimeError as e:
            report.put(label, stage, {"error": str(e)})
            break
        rec["disk_written_bytes"] = disk_bytes(run_dir) - before
        rec["disk_written_gib"] = round(rec["disk_written_bytes"] / 2**30, 3)
        if rec.get("timings"):  # what a clip at 04's 50 steps takes, from the steps measured here
            rec["clip_at_50_steps_s"] = {k: clip_seconds(t) for k, t in rec["timings"].items()}
        report.put(label, stage, rec)
        done[stage] = rec
    ttl = time_to_lora(done)
    if ttl:
        report.put(label, "time_to_lora", ttl)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model and small clips, on the CPU")
    ap.add_argument("--work", default=None, help="folder for the checkpoint, dataset and runs "
                    "(default: /tmp/longcat-e2e, or runs/e2e-tiny with --tiny)")
    ap.add_argument("--out", default=None, help="the JSON report (default $OUT/e2e.json, else WORK/e2e.json)")
    ap.add_argument("--cards", default="", help="GiB caps to run, e.g. 80,24,16 (default: the GPU as it is)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--skip-validation", action="store_true", help="no validation clip in training")
    ap.add_argument("--validation-steps", type=int, default=0, help="sampling steps of the validation clip "
                    "(default: the kit's, train.validation_steps)")
    ap.add_argument("--stages", default="checkpoint,dataset,load,scan,cache,train,sample_t2v,sample_i2v")
    ap.add_argument("--write-checkpoint", default=None, help=argparse.SUPPRESS)  # the writer's own process
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_checkpoint:
        print(json.dumps(write_checkpoint(Path(args.write_checkpoint), args.tiny, args.device)))
        return 0
    args.stages = set(args.stages.split(","))
    if args.tiny:
        args.train_steps, args.sample_steps = min(args.train_steps, 4), min(args.sample_steps, 2)
    work = Path(args.work or (REPO / "runs" / "e2e-tiny" if args.tiny else "/tmp/longcat-e2e")).resolve()
    out = Path(args.out or (Path(os.environ["OUT"]) / "e2e.json" if os.environ.get("OUT") else work / "e2e.json"))
    probe = subprocess.run([sys.executable, "-c", "import torch, json; c = torch.cuda.is_available(); print(json.dumps("
                            "[torch.__version__, c and torch.cuda.get_device_name(0), "
                            "c and torch.cuda.get_device_properties(0).total_memory / 2**30]))"],
                           capture_output=True, text=True, check=True)  # CUDA stays out of this process
    torch_version, gpu_name, args.gpu_gib = json.loads(probe.stdout.strip().splitlines()[-1])
    device = "cuda" if gpu_name and not args.tiny else "cpu"
    meta = {"tiny": args.tiny, "device": gpu_name if device == "cuda" else "cpu", "torch": torch_version, "train_steps": args.train_steps, "sample_steps": args.sample_steps,
            "path": "stage CLI (python -m longcat_nb STAGE), one subprocess per stage"}
    report = Report(out, meta)
    ckpt, data = work / "checkpoint", work / "dataset"
    work.mkdir(parents=True, exist_ok=True)
    if "checkpoint" in args.stages or not (ckpt / "dit" / "config.json").exists():
        # in a process of its own: this one then never holds GPU memory (the stages need the whole card)
        # or the model in host RAM (a child's peak RSS would start from ours)
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--write-checkpoint", str(ckpt), "--device", device]
                              + (["--tiny"] if args.tiny else []), capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"writing the checkpoint failed:\n{proc.stderr[-3000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        report.put("setup", "checkpoint", {**rec, "wall_s": round(time.time() - t0, 1),
                                           "disk_gib": round(disk_bytes(ckpt) / 2**30, 2)})
    if "dataset" in args.stages or not data.exists():
        t0 = time.time()
        report.put("setup", "dataset", {**write_dataset(data, args.tiny), "wall_s": round(time.time() - t0, 1)})
    cards = [int(c) for c in args.cards.split(",") if c] or [None]
    for card in cards:
        run_card(args, report, card, work, ckpt, data)
    print(f"report: {out}")
    return 0 if all("error" not in rec for c in report.data["cards"].values() for rec in c.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
