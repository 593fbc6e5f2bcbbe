"""LoRA training on cached latents: the loop, read top to bottom.

Objective (spec §8, the schedule in flow.py): the DiT sees x_σ = (1 − σ)·x0 + σ·ε and learns the
velocity x0 − ε, σ drawn from the shifted schedule (shift 12) or a logit-normal draw; conditioning
frames (I2V) stay clean with timestep 0 and are left out of the loss.

Everything a resume needs is written every ``checkpoint_every`` steps, and on an interrupt (resume.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import lora as lora_lib
from .config import TrainSettings, load_config
from .ema import checkpoint_files, make_ema, maybe_applied
from .loggers import RunLoggers
from .envinfo import configure_allocator, gpu_memory_peaks, step_memory
from .prompts_file import with_prompts_file
from .validation_set import with_eval_prompts
from .flow import flow_matching_loss, train_sigmas  # noqa: F401  (flow_matching_loss: train's name too)
from .train_data import batch_weights, bucket_batch_sizes, collate, eval_loss_for, training_groups
from .validate import Validator
from .resume import (CheckpointDamaged, ResumeMismatch, RunLocked, check_resume, clean_incomplete,  # noqa: F401
                     interrupt_held, latest_checkpoint, load_checkpoint, nonfinite, resume_latest, rng_state,
                     run_lock, save_checkpoint)


# ---------------------------------------------------------------------------------------------
# data order: batches within one bucket, reproducible from (seed, epoch), resumable mid-epoch
# ---------------------------------------------------------------------------------------------
def epoch_batches(groups: dict[str, list[int]], batch_size: int | dict, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: each group shuffled and cut into batches of ``batch_size`` (one size, or
    {group: size} from train_data.bucket_batch_sizes), then the batches shuffled."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        size = batch_size[key] if isinstance(batch_size, dict) else batch_size
        perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[i:i + size] for i in range(0, len(perm), size)]
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

    @property
    def fingerprint(self) -> str:
        """Names this order (samples per bucket with their repeats, batch sizes, seed): a checkpoint keeps it,
        so a resume under another order (repeats or datasets changed) says so."""
        import hashlib
        import json

        sizes = self.batch_size if isinstance(self.batch_size, dict) else {k: self.batch_size for k in self.groups}
        text = json.dumps([sorted(self.groups.items()), sorted(sizes.items()), self.seed])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

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
    """Training ran out of GPU memory; the last training checkpoint is kept."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf; nothing from that step on was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or a kernel interrupt stopped training; the current step was saved first. A
    KeyboardInterrupt, so code that catches Exception does not swallow the stop; shown as one line."""

    def _render_traceback_(self) -> list[str]:  # IPython/Jupyter show this instead of a traceback
        return [f"TrainingInterrupted: {self}"]


def _suggest_for_oom(s: TrainSettings, checkpointing: str) -> str:
    if checkpointing == "selective":
        return "set keep_attention='off' (recompute attention in the backward)"
    if not s.gradient_checkpointing:
        return "turn on gradient_checkpointing"
    if not s.activation_offload:
        return "set activation_offload=True (the block inputs wait in host memory)"
    if s.base_precision in ("bf16", "auto", "fp16", "fp32"):
        return "use base_precision='int8' (or 'fp8' on Hopper/Ada GPUs)"
    if s.blocks_to_swap < 44 and s.base_precision != "nf4":
        return f"raise blocks_to_swap to {min(44, max(8, s.blocks_to_swap * 2))}"
    return "lower the resolution or the number of frames"


def checkpointing_mode(s: TrainSettings, device, dataset=None) -> str:
    """none | full | selective | offload for these settings: offload when asked (CUDA), selective
    (keep attention outputs) when asked or, with keep_attention=auto, when the planner says the GPU
    has room for it; full otherwise."""
    from .envinfo import gpu_memory_gib
    from .planner import training_plan_settings, use_selective
    from .speed import compile_wanted

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
    plan = training_plan_settings(s, dataset, compile=compile_wanted(s.compile, device))
    return "selective" if use_selective(plan, gpu_memory_gib(device)) else "full"


def train(run_dir: str | os.PathLike, components=None, on_step: Optional[Callable[[dict], None]] = None,
          on_validation: Optional[Callable[[int, dict], None]] = None, max_steps: Optional[int] = None,
          log: Callable[[str], None] = print, dataset=None, negative: Optional[tuple] = None,
          verify_cache: bool = False, preview: Optional[Callable] = None) -> TrainResult:
    """Train the LoRA described by ``run_dir/config.json`` on ``run_dir/cache``; resumes from the
    newest training checkpoint. ``max_steps`` stops early (the schedule still follows ``train.steps``).

    Under ``torchrun --nproc_per_node N`` (see ``python -m longcat_nb train``) the frozen base is
    sharded over the N processes with FSDP2 and each takes its own micro-batches (distributed.py);
    only rank 0 writes logs, checkpoints and files. ``dataset``/``negative`` replace the cache (for
    benchmarks: any object with the CachedDataset interface, and the (embeds, mask) of ""). Every cache
    file is checked (size and header) before the model loads; ``verify_cache`` (or the setting
    train.verify_cache) adds its sha256.

    One trainer per run folder (RunLocked); a NaN/inf loss or gradient stops with TrainingDiverged
    before anything of it is saved; Ctrl-C or a kernel interrupt saves the step reached, then raises
    TrainingInterrupted. ``preview``: the latent preview of the validation clips as they form (Validator)."""
    from . import distributed

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    # before anything is loaded: a mismatch or a busy run is one line. Under torchrun every rank checks
    # before init()'s rendezvous, so none can see the lock rank 0 takes after it
    check_resume(run_dir, cfg.train)
    configure_allocator(log)
    dist = distributed.init(cfg.model.device)
    if not dist.is_main:
        log = _quiet
    with run_lock(run_dir, log) if dist.is_main else contextlib.nullcontext():
        cleaned = clean_incomplete(run_dir / "checkpoints") if dist.is_main else []
        if cleaned:
            log(f"checkpoints left half-written or half-deleted by a killed run: {', '.join(cleaned)}")
        dist.barrier()  # the other ranks read checkpoints/ only once it is clean
        return _train(run_dir, cfg, dist, components, on_step, on_validation, max_steps, log, dataset, negative,
                      verify_cache or cfg.train.verify_cache, preview)


def _train(run_dir: Path, cfg, dist, components, on_step, on_validation, max_steps, log, dataset,
           negative, verify_cache: bool, preview=None) -> TrainResult:
    """The run, in four steps: data, model, loop, finish."""
    from .model_files import pick_device

    s = cfg.train = with_eval_prompts(run_dir, with_prompts_file(run_dir, cfg.train))  # checked before anything loads
    device = dist.device if dist.enabled else pick_device(cfg.model.device)
    _check_single_gpu_options(s, dist)
    dataset, negative = _data(run_dir, dataset, negative, verify_cache)
    validator = Validator(run_dir, cfg, dist.is_main, preview) if s.validate_every and s.validation_prompts else None
    prep = _model(cfg, dist, device, components, log)
    run = _start(run_dir, cfg, dist, device, prep, dataset, negative, validator, max_steps, log)
    _loop(run, on_step, on_validation)
    return _finish(run)


def _check_single_gpu_options(s: TrainSettings, dist) -> None:
    if not dist.enabled:
        return
    if s.blocks_to_swap:
        raise ValueError(f"blocks_to_swap={s.blocks_to_swap} with {dist.world} processes: block swap is "
                         "single-GPU; with several GPUs the base is sharded instead, set blocks_to_swap=0")
    if s.activation_offload:
        raise ValueError("activation_offload is single-GPU: with several GPUs set activation_offload=False "
                         "(gradient checkpointing stays on)")


# -- data: the cached samples and the embedding of "" (caption dropout) ----------------------------
def _data(run_dir: Path, dataset, negative, verify_cache: bool) -> tuple:
    from .cache import CacheError, CachedDataset, load_negative, no_entries_cause, read_manifest

    if dataset is None:
        m = read_manifest(run_dir)
        if m is None or not m.get("entries"):  # say why: often 01_dataset found no usable clip
            raise CacheError(f"nothing to train on: {no_entries_cause(run_dir)}")
        dataset = CachedDataset(run_dir, check_hashes=verify_cache)  # sizes + headers; sha256 when asked
    if len(dataset) == 0:
        raise CacheError(f"nothing to train on: {no_entries_cause(run_dir)}")
    return dataset, negative if negative is not None else load_negative(run_dir)


# -- model: frozen base in the chosen precision, LoRA on top (prepare.py) --------------------------
def _model(cfg, dist, device, components, log):
    from .model_files import load_dit
    from .memory import QUANTIZED, compute_dtype, quantize_block
    from .prepare import prepare_for_training

    s, t0 = cfg.train, time.perf_counter()
    dtype = "float32" if compute_dtype(s.base_precision, device) == torch.float32 else "bfloat16"
    single = device.type == "cuda" and not s.blocks_to_swap and not dist.enabled
    if components is not None and components.dit is not None:
        dit = components.dit
    elif device.type == "cuda" and not dist.enabled and s.base_precision in QUANTIZED:
        # quantized block by block as it loads onto the GPU; with block swap, prepare_for_training then moves
        # the swapped blocks' quantized weights to pinned host memory (the bf16 model never passes through it)
        dit = load_dit(cfg.model.checkpoint, device, dtype,
                       each_block=lambda block: quantize_block(block, s.base_precision, device))
    else:  # straight onto the GPU where it stays whole (host RAM holds one shard at a time); else the CPU,
        # where it is swapped or sharded block by block (read so, for a GPU: no mapped file pages stay)
        dit = load_dit(cfg.model.checkpoint, device if single else "cpu", dtype,
                       each_block=(lambda block: None) if device.type == "cuda" and not single else None)
    checkpointing = checkpointing_mode(s, device, cfg.dataset)
    prep = prepare_for_training(dit, s, device, dist, cfg.model.attention, checkpointing, log)
    prep.model.train()
    prep.load_s = time.perf_counter() - t0
    return prep


# -- the state the loop reads and moves -------------------------------------------------------------
@dataclass
class _Run:
    run_dir: Path
    s: TrainSettings
    dist: object
    device: torch.device
    dtype: torch.dtype
    prep: object  # prepare.Prepared
    opt: object
    base_lrs: list
    stream: MicroBatches
    dataset: object
    negative: tuple
    validator: Optional[Validator]
    evaluate: Optional[Callable]
    ema: object
    loggers: Optional[RunLoggers]
    base_model: str
    step: int
    position: dict
    losses: list
    stop: int
    saved_step: int = 0
    rng_at_step: Optional[dict] = None  # the generators as the unfinished step began (None between steps)
    t_start: float = field(default_factory=time.time)
    step_start: int = 0
    latent_shape: Optional[list] = None  # of the last micro-batch: [B, C, F, H, W] (a new one compiles)
    cond_latents: int = 0  # of the last micro-batch: I2V samples' image latents (another compiled graph)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def dit(self):
        return self.prep.model


def _start(run_dir: Path, cfg, dist, device, prep, dataset, negative, validator, max_steps, log) -> _Run:
    """Optimizer, data order, the newest intact training checkpoint (resumed), EMA and loggers."""
    from .memory import QUANTIZED, compute_dtype

    s, dit = cfg.train, prep.model
    opt = build_optimizer(prep.params, s)
    groups = training_groups(dataset, group_by_shape(dataset))  # repeats, no eval
    stream = MicroBatches(groups, bucket_batch_sizes(groups, s.batch_size, s.batch_tokens), s.seed)
    step, position, losses = 0, {"epoch": 0, "batch": 0}, []
    resumed = resume_latest(run_dir / "checkpoints", dit, opt, s, log, set_aside=dist.is_main)
    if resumed is not None:
        last, st = resumed
        step, position, losses = st["step"], dict(st["position"]), st["losses"]
        was = st.get("world_size", 1)
        log(f"resumed from {last.name} (step {step})" +
            (f", written by {was} process(es), continuing on {dist.world}" if was != dist.world else ""))
        order = position.pop("order", None)
        if order is not None and order != stream.fingerprint:
            log(f"warning: the data order changed since {last.name} (dataset entries, repeats, batch sizes or "
                f"seed differ): training goes on at epoch {position['epoch']}, batch {position['batch']} of the "
                "new order, so this epoch may repeat or skip some samples; the next epochs are whole")
    ema = make_ema(dit, s.ema_decay, resumed[1].get("extra", {}) if resumed else None, log)
    loggers = RunLoggers(run_dir, cfg.to_dict(), log) if dist.is_main else None  # train.jsonl, TensorBoard, wandb
    n_params = sum(p.numel() for p in prep.params)
    log(f"training {n_params / 1e6:.2f}M LoRA parameters on {len(dataset)} cached samples, "
        f"{len(stream.groups)} bucket(s), device {device}, base {s.base_precision}, attention {prep.attention}, "
        f"model ready in {prep.load_s:.1f} s" +
        (f", {dist.world} processes (FSDP2, "
         f"{'replicated quantized' if s.base_precision in QUANTIZED else 'sharded'} base)" if dist.enabled else ""))
    return _Run(run_dir=run_dir, s=s, dist=dist, device=device, dtype=compute_dtype(s.base_precision, device),
                prep=prep, opt=opt, base_lrs=[g["lr"] for g in opt.param_groups], stream=stream, dataset=dataset,
                negative=negative, validator=validator, evaluate=eval_loss_for(dataset, s.eval_every, log), ema=ema,
                loggers=loggers, base_model=cfg.model.checkpoint, step=step, position=position, losses=losses,
                stop=min(s.steps, max_steps) if max_steps else s.steps, saved_step=step, step_start=step)


# -- the loop ---------------------------------------------------------------------------------------
def _loop(run: _Run, on_step, on_validation) -> None:
    try:
        while run.step < run.stop:
            rec = _train_step(run)
            _after_step(run, rec, on_step, on_validation)
    except KeyboardInterrupt:
        _save_interrupted(run)
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory(
            f"out of GPU memory at step {run.step + 1} ({gpu_memory_peaks(run.device)}): "
            f"{_suggest_for_oom(run.s, run.prep.checkpointing)}. "
            f"The last training checkpoint ({latest_checkpoint(run.ckpt_dir)}) is kept; re-run to resume."
        ) from e
    finally:
        if run.loggers is not None:
            run.loggers.close()
        if run.prep.swap is not None:
            run.prep.swap.remove()


def _train_step(run: _Run) -> dict:
    """One optimizer step over grad_accum micro-batches per process; returns its log record."""
    from . import distributed

    s, dist, params = run.s, run.dist, run.prep.params
    t0 = time.time()
    run.rng_at_step = rng_state()
    lr = set_lr(run.opt, run.step, s, run.base_lrs)
    loss_sum, nxt = 0.0, run.position  # position moves on only with the update
    for _ in range(s.grad_accum):
        here, idx = run.stream.at(nxt, dist.rank)
        nxt = run.stream.normalize({"epoch": nxt["epoch"], "batch": nxt["batch"] + dist.world})
        loss_sum += _micro_batch_loss(run, here, [run.dataset[i] for i in idx]) / s.grad_accum
    distributed.average_gradients(params, dist)
    loss_sum = dist.mean(loss_sum)
    grad_norm = _grad_norm(params, s.max_grad_norm)
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # same on every rank (averaged)
        raise _diverged(f"the loss ({loss_sum}) or the gradient norm ({grad_norm})", run.step + 1, lr, run.ckpt_dir)
    with interrupt_held():  # the update and its bookkeeping happen together or not at all
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update()
        run.step, run.position, run.rng_at_step = run.step + 1, nxt, None
        run.losses.append(loss_sum)
    step, elapsed = run.step, time.time() - run.t_start
    return {"step": step, "loss": loss_sum, "lr": lr, "sec": time.time() - t0, "grad_norm": grad_norm,
            "latent_shape": run.latent_shape, "cond_latents": run.cond_latents,
            "it_s": (step - run.step_start) / max(1e-9, elapsed),
            "eta_s": (run.stop - step) * elapsed / max(1, step - run.step_start)}


def _micro_batch_loss(run: _Run, here: dict, items: list) -> float:
    """Forward and backward of one micro-batch (scaled for accumulation); returns its loss."""
    s, device, dtype = run.s, run.device, run.dtype
    gen = batch_generator(s.seed, here)
    x0, text, mask, n_cond = collate(items, device, dtype)
    run.latent_shape, run.cond_latents = list(x0.shape), n_cond
    drop = torch.rand(len(items), generator=gen) < s.caption_dropout
    if drop.any():
        text[drop] = run.negative[0].to(device, dtype)
        mask[drop] = run.negative[1].to(device)
    sigma = train_sigmas(len(items), gen, s)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    with _tf32(device.type == "cuda"):
        loss = flow_matching_loss(run.dit, x0, text, mask, sigma.to(device), noise, n_cond,
                                  weighting=s.loss_weighting, **batch_weights(items, device))
        (loss / s.grad_accum).backward()
    return loss.item()


def _after_step(run: _Run, rec: dict, on_step, on_validation) -> None:
    """Eval loss and memory into the record, the record logged, then a training checkpoint and the
    validation clips when due."""
    s, dist, device, step = run.s, run.dist, run.device, run.step
    if run.evaluate is not None and step % s.eval_every == 0:
        rec["eval_loss"] = run.evaluate(run.dit, device, run.dtype)
    if device.type == "cuda":
        rec.update(step_memory(device))
        if dist.enabled:
            rec["mem_gib_per_gpu"] = dist.gather_floats(rec["mem_gib"])
            rec["mem_gib"] = max(rec["mem_gib_per_gpu"])
    if dist.enabled:
        rec["processes"] = dist.world
    if dist.is_main:
        run.loggers.write(rec)
        if on_step is not None:
            on_step(rec)
    if s.checkpoint_every and (step % s.checkpoint_every == 0 or step == run.stop):
        if dist.is_main:
            _check_weights(run.dit, step, rec["lr"], run.ckpt_dir)
            _save(run)
            run.saved_step = step
        dist.barrier()
    if run.validator is not None and step % s.validate_every == 0:
        run.dit.eval()
        with maybe_applied(run.ema, s.validation_weights == "ema"):
            videos = run.validator(step, run.dit)  # every rank runs the sharded model; rank 0 writes
        run.dit.train()
        if on_validation is not None and dist.is_main:
            on_validation(step, videos)


def _save(run: _Run, rng=None) -> Path:
    return save_checkpoint(run.ckpt_dir, run.step, run.dit, run.opt,
                           {**run.position, "order": run.stream.fingerprint}, run.losses, run.s,
                           run.s.keep_checkpoints, world=run.dist.world, rng=rng, extra=checkpoint_files(run.ema))


def _save_interrupted(run: _Run) -> None:
    """Ctrl-C: the step reached saved as a training checkpoint (none when nothing moved since the last)."""
    step = run.step
    if not run.dist.is_main:
        raise TrainingInterrupted(f"interrupted at step {step}") from None
    if step == run.saved_step:
        last = latest_checkpoint(run.ckpt_dir)
        raise TrainingInterrupted(f"interrupted at step {step}, no step since " + (
            f"{last} (kept as it is); re-run to resume from it" if last else "the start: nothing to save")) from None
    _check_weights(run.dit, step, run.s.lr, run.ckpt_dir)
    path = _save(run, rng=run.rng_at_step)
    raise TrainingInterrupted(f"interrupted at step {step}: saved {path}; re-run to resume from it") from None


# -- finish: the LoRA file and the result -----------------------------------------------------------
def _finish(run: _Run) -> TrainResult:
    run.dit.eval()
    _check_weights(run.dit, run.step, run.s.lr, run.ckpt_dir)
    result = TrainResult(run_dir=run.run_dir, steps=run.step, losses=run.losses,
                         checkpoint=latest_checkpoint(run.ckpt_dir))
    if run.dist.is_main:
        result.lora_path = export_lora(run.run_dir, run.dit, run.s, run.base_model, run.step, ema=run.ema)
    run.dist.barrier()
    result.model, result.load_s = run.dit, run.prep.load_s  # type: ignore[attr-defined]
    result.ema = run.ema  # type: ignore[attr-defined]
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


def _grad_norm(params, max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def _diverged(what: str, step: int, lr: float, ckpt_dir: Path) -> TrainingDiverged:
    last = latest_checkpoint(ckpt_dir)
    kept = f"the last good checkpoint is {last} (a re-run resumes from it)" if last else "no checkpoint was written"
    return TrainingDiverged(
        f"training diverged at step {step} (lr {lr:.3g}): {what} is NaN/inf, so the run stopped without saving or "
        f"exporting it; {kept}. Lower lr (e.g. {lr / 10:.3g}) or set max_grad_norm=1.0, then re-run.")


def _check_weights(model, step: int, lr: float, ckpt_dir: Path) -> None:
    """Before a training checkpoint or an export: an update with finite gradients can still overflow the weights."""
    bad = nonfinite(lora_lib.lora_state_dict(model))
    if bad:
        raise _diverged(f"the LoRA weights after the update ({', '.join(bad[:3])})", step, lr, ckpt_dir)


def _quiet(msg: str) -> None:
    """log() of ranks other than 0."""


def export_lora(run_dir: Path, model, s: TrainSettings, base_model: str, step: int,
                formats: tuple = ("peft",), official_rank: Optional[int] = lora_lib.OFFICIAL_RANK,
                fold_alpha: bool = False, ema=None, suffix: str = "") -> Path:
    """run_dir/lora/lora-stepN.safetensors in the PEFT/diffusers layout, each module's alpha in the header
    (``fold_alpha``: folded into lora_B, for readers that ignore headers); 'official' (padded to
    ``official_rank``, None = the trained rank) and 'comfy' (``.alpha`` tensors) layouts on request. With an
    ``ema`` (ema.py) its weights are exported the same way beside them, as lora-stepN_ema*.safetensors."""
    out_dir = Path(run_dir) / "lora"
    meta = {"targets": s.targets, "base_model": base_model or "tiny-default", "settings": asdict(s),
            "loss_weighting": s.loss_weighting, "timestep_sampling": s.timestep_sampling,
            "weights": "ema" if suffix == "_ema" else "trained",
            **lora_lib.run_metadata(run_dir, step)}
    stem = f"lora-step{step:06d}{suffix}"
    path = lora_lib.save_trained(out_dir / f"{stem}.safetensors", model, meta, fold=fold_alpha)
    state, (_, alphas) = lora_lib.lora_state_dict(model), lora_lib.module_ranks_alphas(model)
    lora_lib.save_layouts(path, state, alphas, formats, meta, official_rank)
    if ema is not None:
        with ema.applied():
            export_lora(run_dir, model, s, base_model, step, formats, official_rank, fold_alpha, suffix="_ema")
    return path

