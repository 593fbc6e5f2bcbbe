"""LoRA training on cached latents: the loop, read top to bottom.

Objective (spec §8): x_σ = (1 − σ)·x0 + σ·ε, the DiT predicts the velocity from noise to data, so
the target is x0 − ε (the official sampler negates the output before its Euler step; SimpleTuner's
ε − x0 is the opposite sign). σ comes from the shifted schedule (shift 12) or a logit-normal draw;
conditioning frames (I2V) stay clean with timestep 0 and are left out of the loss.

Everything a resume needs is written atomically every ``checkpoint_every`` steps: LoRA weights,
optimizer state and RNG states as safetensors, the rest as JSON. Never pickle.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import lora as lora_lib
from . import lora_export
from .config import TrainSettings, load_config, section_from_dict
from .io import atomic_save_safetensors, atomic_write_json
from .paths import resolve_path

SHIFT = 12.0


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------
def shift_sigmas(sigma: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, generator: torch.Generator, mode: str = "shift", shift: float = SHIFT) -> torch.Tensor:
    """σ in (0, 1) per sample. 'shift': uniform then shifted, the distribution the sampler visits
    (46 of its 50 steps are above t = 500); 'logit_normal': sigmoid(N(0, 1)) then shifted."""
    if mode == "shift":
        u = torch.rand(n, generator=generator)
    elif mode == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"timestep_sampling={mode!r}: use 'shift' or 'logit_normal'")
    return shift_sigmas(u.clamp(1e-3, 1 - 1e-3), shift)


def flow_matching_loss(dit, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor, num_cond: int = 0) -> torch.Tensor:
    """MSE between the DiT output and x0 − ε on the noisy frames, in float32.

    x0, noise: [B, 16, T, h, w] float32; sigma: [B]; the first ``num_cond`` latent frames are clean
    conditioning (timestep 0, no loss, no gradient into them)."""
    B, _, T = x0.shape[:3]
    s = sigma.view(B, 1, 1, 1, 1).to(x0)
    x_t = (1 - s) * x0 + s * noise
    t = (sigma.to(x0) * 1000.0)[:, None].expand(B, T).clone()
    if num_cond:
        x_t[:, :, :num_cond] = x0[:, :, :num_cond]
        t[:, :num_cond] = 0.0
    pred = dit(x_t.detach(), t, text, mask, num_cond_latents=num_cond)
    target = (x0 - noise)[:, :, num_cond:]
    return (pred[:, :, num_cond:].float() - target.float()).square().mean()


# ---------------------------------------------------------------------------------------------
# data order: batches within one bucket, reproducible from (seed, epoch), resumable mid-epoch
# ---------------------------------------------------------------------------------------------
def epoch_batches(groups: dict[str, list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class MicroBatches:
    """The endless stream of micro-batches, epoch after epoch; position = (epoch, batch index).

    The order does not depend on the number of processes: rank r of N reads ``at(position, r)`` and
    everyone then advances by N, so a run resumes on any number of GPUs at the next unseen batch."""

    def __init__(self, groups: dict[str, list[int]], batch_size: int, seed: int):
        self.groups, self.batch_size, self.seed = groups, batch_size, seed
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            self._epochs = {e: epoch_batches(self.groups, self.batch_size, self.seed, e)}
        return self._epochs[e]

    def normalize(self, position: dict) -> dict:
        e, b = position["epoch"], position["batch"]
        while b >= len(self.epoch(e)):
            b -= len(self.epoch(e))
            e += 1
        return {"epoch": e, "batch": b}

    def at(self, position: dict, offset: int = 0) -> tuple[dict, list[int]]:
        pos = self.normalize({"epoch": position["epoch"], "batch": position["batch"] + offset})
        return pos, self.epoch(pos["epoch"])[pos["batch"]]


def batch_generator(seed: int, position: dict) -> torch.Generator:
    """Noise, timesteps and caption dropout of one micro-batch come from its own seed, so they do not
    depend on which process draws them, how many there are, or where a run was resumed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position["epoch"]) * 1_000_003 + position["batch"])


def group_by_shape(dataset) -> dict[str, list[int]]:
    """Bucket plus conditioning count, so one batch has one latent shape and one loss mask."""
    groups: dict[str, list[int]] = {}
    for bucket, indices in dataset.buckets().items():
        for i in indices:
            n = _num_cond(dataset, i)
            groups.setdefault(f"{bucket}|cond{n}", []).append(i)
    return groups


def _num_cond(dataset, i) -> int:
    meta = getattr(dataset, "entry_meta", None)
    if meta is not None:
        return int(meta(i).get("num_cond_latents", 0))
    return int(dataset[i].get("num_cond_latents", 0))


def collate(items: list[dict], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack a batch; an I2V item's first latent frame becomes its image latent."""
    n = int(items[0].get("num_cond_latents", 0))
    lat = []
    for it in items:
        x = it["latents"].float()
        if n and it.get("cond_latents") is not None:
            x = torch.cat([it["cond_latents"].float(), x[:, n:]], dim=1)
        lat.append(x)
    x0 = torch.stack(lat).to(device)
    text = torch.stack([it["text_embeds"] for it in items]).to(device, dtype)
    mask = torch.stack([it["text_mask"] for it in items]).to(device)
    return x0, text, mask, n


# ---------------------------------------------------------------------------------------------
# optimizer and schedule
# ---------------------------------------------------------------------------------------------
def build_optimizer(params, s: TrainSettings):
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if s.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=s.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    if s.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ImportError("optimizer 'prodigy' needs prodigyopt: pip install prodigyopt") from e
        # Prodigy finds its own step size: lr is a multiplier, 1.0 is the recommended value.
        return Prodigy(params, lr=s.lr if s.lr >= 0.1 else 1.0, weight_decay=1e-2, safeguard_warmup=True)
    raise ValueError(f"optimizer={s.optimizer!r}: choose adamw, adamw8bit or prodigy")


def lr_factor(step: int, s: TrainSettings) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.lr_schedule == "constant":
        return 1.0
    if s.lr_schedule == "cosine":
        span = max(1, s.steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule={s.lr_schedule!r}: choose constant or cosine")


def set_lr(opt, step: int, s: TrainSettings, base_lrs: list[float]) -> float:
    f = lr_factor(step, s)
    for g, base in zip(opt.param_groups, base_lrs):
        g["lr"] = base * f
    return opt.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON for the rest
# ---------------------------------------------------------------------------------------------
def _flatten_optimizer(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, position: dict, losses: list,
                    settings: TrainSettings, keep: int, world: int = 1) -> Path:
    """Write checkpoints/step-N atomically (a temp folder renamed at the end) and keep the last K."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lora_export.save_trained(tmp / "lora.safetensors", model, lora_export.run_metadata(ckpt_dir.parent, step))
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
    # the data's noise is seeded per micro-batch (batch_generator); these only drive LoRA dropout
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = st
    atomic_save_safetensors(tmp / "rng.safetensors", rng)
    atomic_write_json(tmp / "state.json", {
        "step": step, "position": position, "losses": losses, "optimizer": opt_meta,
        "settings": asdict(settings), "time": time.time(), "world_size": world,
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


class ResumeMismatch(ValueError):
    """The run's newest checkpoint was trained with settings this run cannot continue from."""


# Settings a checkpoint cannot be resumed under: rank and targets change the LoRA tensors, the optimizer
# its state (adamw8bit and prodigy keep other tensors than adamw), and alpha the scale alpha/rank that
# multiplies everything learnt so far (it loads, but the model jumps). Everything else (lr, steps,
# schedule, batch, seed, precision of the frozen base, dropout, ...) may change between runs.
RESUME_KEYS = ("rank", "targets", "alpha", "optimizer")


def check_resume(run_dir: str | os.PathLike, settings=None) -> Optional[Path]:
    """Refuse, in one line, settings the newest checkpoint in run_dir/checkpoints cannot resume under.

    ``settings``: the train section about to be used (a TrainSettings or a dict of some of its keys,
    the rest from config.json); None = config.json as it is. Returns the checkpoint that will be
    resumed (None = a fresh start). 03_train_lora calls this before it writes config.json, and
    train() again before it builds anything."""
    run_dir = Path(run_dir)
    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return None
    if settings is None or isinstance(settings, dict):
        current = asdict(load_config(run_dir).train)
        current.update(settings or {})
        settings = section_from_dict("train", current, str(run_dir / "config.json"))
    try:
        was = json.loads((last / "state.json").read_text(encoding="utf-8")).get("settings", {})
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeMismatch(f"{last / 'state.json'} cannot be read ({e}): delete {last} to resume from the "
                             "checkpoint before it, or delete checkpoints/ to start over") from None
    wanted = asdict(settings)
    same = {"targets": lambda a, b: sorted(lora_lib.expand_targets(a)) == sorted(lora_lib.expand_targets(b)),
            "alpha": lambda a, b: float(a) == float(b)}
    diff = [k for k in RESUME_KEYS if k in was and not same.get(k, lambda a, b: a == b)(was[k], wanted[k])]
    if not diff:
        return last
    had = ", ".join(f"{k}={was[k]!r}" for k in diff)
    asked = ", ".join(f"{k}={wanted[k]!r}" for k in diff)
    back = " and ".join(f"{k}={was[k]!r}" for k in diff)
    raise ResumeMismatch(
        f"{last} was trained with {had}, this run asks {asked}: a checkpoint cannot resume under another "
        f"{'/'.join(diff)}. Use a new run_dir for the new settings, set {back} to continue this run, or delete "
        f"{last.parent} to start this run over.")


def load_checkpoint(path: Path, model, opt) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    lora_lib.load_lora_state_dict(model, load_file(path / "lora.safetensors"))
    opt.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        sts = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
        if len(sts) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(sts)
    return state


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list = field(default_factory=list)
    lora_path: Optional[Path] = None
    checkpoint: Optional[Path] = None
    exports: dict = field(default_factory=dict)


class OutOfMemory(RuntimeError):
    """Training ran out of GPU memory; the last checkpoint is kept."""


def _suggest_for_oom(s: TrainSettings, checkpointing: str) -> str:
    if checkpointing == "selective":
        return "set keep_attention='off' (recompute attention in the backward)"
    if not s.gradient_checkpointing:
        return "turn on gradient_checkpointing"
    if s.base_precision in ("bf16", "auto", "fp16", "fp32"):
        return "use base_precision='int8' (or 'fp8' on Hopper/Ada GPUs)"
    if s.blocks_to_swap < 24:
        return f"raise blocks_to_swap to {max(8, s.blocks_to_swap * 2)}"
    return "lower the resolution or the number of frames"


def checkpointing_mode(s: TrainSettings, device, dataset=None) -> str:
    """none | full | selective | offload for these settings: offload when asked (CUDA), selective
    (keep attention outputs) when asked or, with keep_attention=auto, when the planner says the GPU
    has room for it; full otherwise."""
    from .planner import TARGET_SHAPES, PlanSettings, use_selective

    device = torch.device(device)
    if s.keep_attention not in ("auto", "on", "off"):
        raise ValueError(f"train.keep_attention={s.keep_attention!r}: use auto, on or off")
    if s.activation_offload and device.type == "cuda":
        return "offload"
    if not s.gradient_checkpointing:
        return "none"
    if s.keep_attention == "off" or s.blocks_to_swap:
        return "full"
    if s.keep_attention == "on":
        return "selective"
    if device.type != "cuda":
        return "full"
    gpu = torch.cuda.get_device_properties(device).total_memory / 2**30
    prec = s.base_precision if s.base_precision not in ("auto", "fp32") else "bf16"
    size = {}
    if dataset is not None:  # the largest clip the dataset settings allow
        h, w = (int(v) for v in str(dataset.resolution).lower().split("x"))
        size = dict(height=h, width=w, num_frames=dataset.num_frames)
    plan = PlanSettings(precision=prec, rank=s.rank, batch_size=s.batch_size, optimizer=s.optimizer,
                        compile=s.compile, targets=tuple(t for t in s.targets if t in TARGET_SHAPES), **size)
    return "selective" if use_selective(plan, gpu) else "full"


def train(run_dir: str | os.PathLike, components=None, on_step: Optional[Callable[[dict], None]] = None,
          on_validation: Optional[Callable[[int, dict], None]] = None, max_steps: Optional[int] = None,
          log: Callable[[str], None] = print, dataset=None, negative: Optional[tuple] = None,
          verify_cache: bool = False) -> TrainResult:
    """Train the LoRA described by ``run_dir/config.json`` on ``run_dir/cache``; resumes from the
    newest checkpoint. ``max_steps`` stops early (the schedule still follows ``train.steps``).

    Under ``torchrun --nproc_per_node N`` (see ``python -m longcat_nb train``) the frozen base is
    sharded over the N processes with FSDP2 and each takes its own micro-batches (distributed.py);
    only rank 0 writes logs, checkpoints and files. ``dataset``/``negative`` replace the cache (for
    benchmarks: any object with the CachedDataset interface, and the (embeds, mask) of ""). Every cache
    file is checked (size and header) before the model loads; ``verify_cache`` adds its sha256."""
    from . import distributed
    from .cache import CacheError, CachedDataset, load_negative, no_entries_cause, read_manifest
    from .checkpoint import load_dit, pick_device
    from .memory import QUANTIZED, apply_base_precision, apply_block_swap, apply_gradient_checkpointing, compute_dtype
    from .speed import apply_compile, default_sdpa_preference, set_sdpa_preference

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    s = cfg.train
    check_resume(run_dir, s)  # before anything is loaded: a mismatch is one line, not a shape error
    dist = distributed.init(cfg.model.device)
    device = dist.device if dist.enabled else pick_device(cfg.model.device)
    quantized = s.base_precision in QUANTIZED
    if dist.enabled:
        if s.blocks_to_swap:
            raise ValueError(f"blocks_to_swap={s.blocks_to_swap} with {dist.world} processes: block swap is "
                             "single-GPU; with several GPUs the base is sharded instead, set blocks_to_swap=0")
        if s.activation_offload:
            raise ValueError("activation_offload is single-GPU: with several GPUs set activation_offload=False "
                             "(gradient checkpointing stays on)")
    if not dist.is_main:
        log = _quiet
    dtype = compute_dtype(s.base_precision, device)
    if dataset is None:
        m = read_manifest(run_dir)
        if m is None or not m.get("entries"):  # say why: often 01_dataset found no usable clip
            raise CacheError(f"nothing to train on: {no_entries_cause(run_dir)}")
        dataset = CachedDataset(run_dir, check_hashes=verify_cache)  # sizes + headers; sha256 when asked
    if len(dataset) == 0:
        raise CacheError(f"nothing to train on: {no_entries_cause(run_dir)}")
    neg_text, neg_mask = negative if negative is not None else load_negative(run_dir)
    validator = Validator(run_dir, cfg, save=dist.is_main) if s.validate_every and s.validation_prompts else None

    # -- model: frozen base in the chosen precision, LoRA on top --------------------------------
    dit = components.dit if components is not None and components.dit is not None else \
        load_dit(cfg.model.checkpoint, "cpu", "float32" if dtype == torch.float32 else "bfloat16")
    # sharded: a model loaded on the CPU is cast there and fully_shard moves each rank's shard to its
    # GPU; one already on this rank's device (built there) stays and is sharded in place
    on_device = next(dit.parameters()).device == torch.device(device)
    base_device = "cpu" if dist.enabled and not quantized and not on_device else device
    dit = apply_base_precision(dit, s.base_precision, base_device, log=log)
    checkpointing = checkpointing_mode(s, device, cfg.dataset)
    apply_gradient_checkpointing(dit, checkpointing)
    attention = dit.set_attention_backend(cfg.model.attention)
    set_sdpa_preference(default_sdpa_preference())
    torch.manual_seed(s.seed)  # LoRA init
    lora_lib.add_lora(dit, rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=s.targets)
    params = [p for p in dit.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights and their optimizer state in fp32
    if dist.enabled:
        distributed.shard_frozen_base(dit, dist, params, quantized)
        for p in params:
            p.data = p.data.to(device)
        distributed.sync_lora(params, dist)
    swap = apply_block_swap(dit, s.blocks_to_swap, device) if device.type == "cuda" else None
    if s.compile and device.type == "cuda":
        apply_compile(dit, scope="blocks")
    log(f"checkpointing: {checkpointing}; compiled blocks: {bool(s.compile and device.type == 'cuda')}")
    dit.train()
    opt = build_optimizer(params, s)
    base_lrs = [g["lr"] for g in opt.param_groups]

    stream = MicroBatches(group_by_shape(dataset), s.batch_size, s.seed)
    step, position, losses = 0, {"epoch": 0, "batch": 0}, []
    ckpt_dir = run_dir / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        st = load_checkpoint(last, dit, opt)
        step, position, losses = st["step"], st["position"], st["losses"]
        was = st.get("world_size", 1)
        log(f"resumed from {last.name} (step {step})" +
            (f", written by {was} process(es), continuing on {dist.world}" if was != dist.world else ""))

    log_path = run_dir / "logs" / "train.jsonl"
    tb = None
    if dist.is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tb = _tensorboard(run_dir / "logs" / "tensorboard")
    n_params = sum(p.numel() for p in params)
    log(f"training {n_params / 1e6:.2f}M LoRA parameters on {len(dataset)} cached samples, "
        f"{len(stream.groups)} bucket(s), device {device}, base {s.base_precision}, attention {attention}" +
        (f", {dist.world} processes (FSDP2, {'replicated quantized' if quantized else 'sharded'} base)"
         if dist.enabled else ""))

    stop = min(s.steps, max_steps) if max_steps else s.steps
    t_start, step_start = time.time(), step
    try:
        while step < stop:
            t0 = time.time()
            lr = set_lr(opt, step, s, base_lrs)
            loss_sum = 0.0
            for _ in range(s.grad_accum):
                here, idx = stream.at(position, dist.rank)
                position = stream.normalize({"epoch": position["epoch"], "batch": position["batch"] + dist.world})
                items = [dataset[i] for i in idx]
                gen = batch_generator(s.seed, here)
                x0, text, mask, n_cond = collate(items, device, dtype)
                drop = torch.rand(len(items), generator=gen) < s.caption_dropout
                if drop.any():
                    text[drop] = neg_text.to(device, dtype)
                    mask[drop] = neg_mask.to(device)
                sigma = sample_sigmas(len(items), gen, s.timestep_sampling)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                with _tf32(device.type == "cuda"):
                    loss = flow_matching_loss(dit, x0, text, mask, sigma.to(device), noise, n_cond)
                    (loss / s.grad_accum).backward()
                loss_sum += loss.item() / s.grad_accum
            distributed.average_gradients(params, dist)
            loss_sum = dist.mean(loss_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm) if s.max_grad_norm > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_sum)
            rec = {
                "step": step, "loss": loss_sum, "lr": lr, "sec": time.time() - t0,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "it_s": (step - step_start) / max(1e-9, time.time() - t_start),
                "eta_s": (stop - step) * (time.time() - t_start) / max(1, step - step_start),
            }
            if device.type == "cuda":
                rec["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if dist.enabled:
                    rec["mem_gib_per_gpu"] = dist.gather_floats(rec["mem_gib"])
                    rec["mem_gib"] = max(rec["mem_gib_per_gpu"])
            if dist.enabled:
                rec["processes"] = dist.world
            if dist.is_main:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if tb is not None:
                    tb.add_scalar("loss", loss_sum, step)
                    tb.add_scalar("lr", lr, step)
                if on_step is not None:
                    on_step(rec)
            if s.checkpoint_every and (step % s.checkpoint_every == 0 or step == stop):
                if dist.is_main:
                    save_checkpoint(ckpt_dir, step, dit, opt, dict(position), losses, s, s.keep_checkpoints,
                                    world=dist.world)
                dist.barrier()
            if validator is not None and step % s.validate_every == 0:
                dit.eval()
                videos = validator(step, dit)  # every rank runs the sharded model; rank 0 writes
                dit.train()
                if on_validation is not None and dist.is_main:
                    on_validation(step, videos)
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory(
            f"out of GPU memory at step {step + 1}: {_suggest_for_oom(s, checkpointing)}. The last checkpoint "
            f"({latest_checkpoint(ckpt_dir)}) is kept; re-run to resume."
        ) from e
    finally:
        if tb is not None:
            tb.close()
        if swap is not None:
            swap.remove()

    dit.eval()
    result = TrainResult(run_dir=run_dir, steps=step, losses=losses, checkpoint=latest_checkpoint(ckpt_dir))
    if dist.is_main:
        result.lora_path = export_lora(run_dir, dit, s, cfg.model.checkpoint, step)
    dist.barrier()
    result.model = dit  # type: ignore[attr-defined]
    return result


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Float32 matmuls (the LoRA's: its weights are fp32) on TF32 tensor cores, still finer than the
    bf16 base they add to; for the training step only, so validation clips match 04's samples."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _quiet(msg: str) -> None:
    """log() of ranks other than 0."""


class Validator:
    """Samples the validation prompts with the model being trained, through the kit's sampler.
    Prompts are encoded once up front, with the text encoder the cache was built with (the checkpoint's
    UMT5, or Qwen2.5-VL; refused with the reason when that cannot be loaded), and the encoder freed;
    the VAE is loaded only to decode."""

    def __init__(self, run_dir: Path, cfg, save: bool = True):
        from .checkpoint import load_scheduler, load_text_encoder, load_tokenizer, pick_device, pick_dtype
        from .text import encode_prompts, named_encoder, run_text_encoder

        self.run_dir, self.cfg, self.save, s = Path(run_dir), cfg, save, cfg.train
        # checked now, not at the first validation step hours later
        given = [str(x or "") for x in list(s.validation_images) + [""] * len(s.validation_prompts)]
        self.images = [str(resolve_path(x)) if x else "" for x in given]  # relative: under the workspace root
        for i, image in enumerate(self.images[:len(s.validation_prompts)]):
            if image and not Path(image).is_file():
                raise FileNotFoundError(f"validation_images[{i}] = {given[i]!r} does not exist ({image}): give an "
                                        "image file (png/jpg) for an image-to-video validation prompt, or \"\" for "
                                        "text-to-video")
        dev = pick_device(cfg.model.device)
        self.text_encoder = run_text_encoder(self.run_dir)
        if self.text_encoder is None:
            tok = load_tokenizer(cfg.model.checkpoint)
            enc = load_text_encoder(cfg.model.checkpoint, dev)
            self.texts = [encode_prompts(tok, enc, ["", p], device="cpu") for p in s.validation_prompts]
        else:  # the LoRA learns on these embeddings: validation prompts must be encoded the same way
            enc = named_encoder(self.text_encoder, dev, pick_dtype(cfg.model.text_encoder_dtype, dev),
                                f"validation (validate_every=0 trains without it), run {self.run_dir}")
            self.texts = [enc(["", p]) for p in s.validation_prompts]
        del enc
        self.scheduler = load_scheduler(cfg.model.checkpoint)

    def __call__(self, step: int, model) -> dict:
        from .checkpoint import Components, load_vae, resolve_checkpoint
        from .sample import SampleRequest, generate, save_sample

        s = self.cfg.train
        vae = load_vae(self.cfg.model.checkpoint, next(model.parameters()).device)
        # the record's 'checkpoint' is the model the LoRA is trained on; the LoRA is this run's at `step`
        comps = Components(folder=resolve_checkpoint(self.cfg.model.checkpoint), dit=model, vae=vae,
                           scheduler=self.scheduler)
        saved = self.run_dir / "checkpoints" / f"step-{step:07d}"
        out = {}
        for i, (prompt, text, image) in enumerate(zip(s.validation_prompts, self.texts, self.images)):
            req = SampleRequest(prompt=prompt, mode="i2v" if image else "t2v", image=image or None,
                                height=s.validation_height, width=s.validation_width,
                                num_frames=s.validation_frames, steps=s.validation_steps,
                                guidance=s.validation_guidance, seed=s.seed + i)
            res = generate(comps, req, text=text, progress=False)
            res.settings.update(lora_step=step, lora_run=str(self.run_dir),
                                text_encoder=(self.text_encoder or {"name": "umt5"})["name"],
                                lora_checkpoint=str(saved) if (saved / "state.json").exists() else "")
            path = save_sample(res, self.run_dir, f"validation/step{step:06d}_{i}") if self.save else None
            out[f"{i}: {prompt}"] = (path, res.video)
        del vae
        return out


def export_lora(run_dir: Path, model, s: TrainSettings, base_model: str, step: int,
                formats: tuple = ("peft",), official_rank: Optional[int] = lora_export.OFFICIAL_RANK,
                fold_alpha: bool = False) -> Path:
    """run_dir/lora/lora-stepN.safetensors in the PEFT/diffusers layout, each module's alpha in the header
    (``fold_alpha``: folded into lora_B, for readers that ignore headers); 'official' (padded to
    ``official_rank``, None = the trained rank) and 'comfy' (``.alpha`` tensors) layouts on request."""
    out_dir = Path(run_dir) / "lora"
    meta = {"targets": s.targets, "base_model": base_model or "tiny-default", "settings": asdict(s),
            **lora_export.run_metadata(run_dir, step)}
    stem = f"lora-step{step:06d}"
    path = lora_export.save_trained(out_dir / f"{stem}.safetensors", model, meta, fold=fold_alpha)
    state, (_, alphas) = lora_lib.lora_state_dict(model), lora_lib.module_ranks_alphas(model)
    if "official" in formats:
        lora_lib.save_official(out_dir / f"{stem}-official.safetensors", state, alphas=alphas,
                               network_rank=official_rank)
    if "comfy" in formats:
        lora_lib.save_comfy(out_dir / f"{stem}-comfy.safetensors", state, meta, alphas=alphas)
    return path


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the JSONL log still has every number
        return None
    return SummaryWriter(str(path))
