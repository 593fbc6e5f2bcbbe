"""What 03's and 04's forms show before anything loads: presets by card (the memory & speed settings the
planner recommends for a GPU of 16, 24, 48 or 80 GiB, or the CPU/tiny model) and the live estimate
(predicted GPU peak, host RAM, seconds per step and time to finish, and "will not fit: do X").

Memory comes from planner.report/recommend/suggest. Time is not in the planner: it is scaled here from
the measured full-size steps at 480x832x93 (README "Speed", docs/benchmarks.md), linear in the tokens
for the matmuls and quadratic for attention, so it is for an H100/H200-class GPU. Works on plain
values (no widgets), so tests and headless runs get the same numbers as the forms.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .planner import (SMALL_CARD_GIB, SMALL_CARD_HOST_GIB, PlanSettings, clips_per_batch, compiles, recommend,
                      report, sampling_plan_settings, tokens, training_plan_settings, use_selective)

CPU = "cpu/tiny"
PRESETS = {"16 GiB": 16.0, "24 GiB": 24.0, "48 GiB": 48.0, "80 GiB": 80.0, CPU: None}
TRAIN_MEMORY_FIELDS = ("base_precision", "gradient_checkpointing", "keep_attention", "activation_offload",
                       "blocks_to_swap", "compile")
SAMPLE_MEMORY_FIELDS = ("precision", "offload", "blocks_to_swap", "compile")

# Calibration: full-size DiT, 480x832x93 = 37,440 tokens, compiled blocks, on an H200 (README "Speed", docs/benchmarks.md).
REF_TOKENS = 37_440
TRAIN_STEP_S = 12.3  # LoRA step, checkpointing keeps attention (selective)
SAMPLE_STEP_S = 6.0  # one CFG step (batch 2), attention auto = quant8 (H100, run 22: 6.035 s; bf16 SDPA 6.83 s)
# attention's share of those steps: cuDNN at 37,440 tokens, 142 ms fwd+bwd / 39.5 ms fwd a layer, x48;
# sampling's quant8 forward runs 1.3x cuDNN's (61.1 against 79.8 ms for the CFG pair, docs/benchmarks.md)
TRAIN_ATTENTION = 0.55
SAMPLE_ATTENTION = 0.5
EAGER = 9.35 / 6.93  # blocks not compiled (CFG step, same GPU, docs/benchmarks.md)
RECOMPUTE_ATTENTION = 1.15  # full checkpointing recomputes each attention forward (+48 x 39.5 ms)
NO_CHECKPOINTING = 0.8  # no recompute of the block forward at all
SWAP_OR_OFFLOAD = 1.03  # the copies overlap with compute: under 3% (docs/benchmarks.md)
# a base precision's step against bf16's with the same settings. int8 (optimum-quanto), compiled, activation
# offload: 15.14 s (H100, run 25) against bf16's 14.6 (12.3 x RECOMPUTE_ATTENTION x SWAP_OR_OFFLOAD).
# int4 (quanto's TinyGemm): 79.57 s against int8's 19.50, both eager with activation offload (run 25), and it
# does not compile (planner.NOT_COMPILED): 4.1x an eager step.
PRECISION_SPEED = {"fp8_rowwise": 10.7 / 12.3, "int8": 1.04, "int4": 79.57 / 19.50, "fp8": 1.0, "nf4": 1.02}
TRAIN_COMPILE_S = 40.0  # the first compiled training step
SAMPLE_COMPILE_S = 15.0
# One validation clip at 480x832x93 beside its denoising steps: the prompt, the VAE decode of 93 frames,
# the mp4, the first no-grad compile. H100, run 25 (bench_validation, the first clip of each kind):
# 40 CFG steps 286.75 s = 40 x 6.0 + 47; distilled (16 steps, no CFG) 86.86 s = 16 x 3.0 + 39.
VALIDATION_CLIP_S = 43.0
DISTILLED_STEPS = 16  # validate.py's steps with the checkpoint's cfg_step_lora


def preset_for_gpu(gpu_gib: Optional[float]) -> str:
    """The preset of a card: the largest whose size it has (a "24 GB" card reports 23.6 GiB, hence the
    slack); the smallest for smaller cards; cpu/tiny without a GPU."""
    if not gpu_gib:
        return CPU
    fitting = [name for name, gib in PRESETS.items() if gib and gib <= gpu_gib + 1.0]
    return fitting[-1] if fitting else "16 GiB"


def _scaled(ref_s: float, attention: float, s: PlanSettings, rows: int) -> float:
    x = tokens(s) / REF_TOKENS
    return ref_s * rows * ((1 - attention) * x + attention * x * x)


def _clips(s: PlanSettings) -> int:
    return clips_per_batch(tokens(s), s.batch_size, s.batch_tokens)  # as the trainer batches this bucket


def train_step_seconds(s: PlanSettings) -> float:
    """Seconds per optimizer micro-step of the full-size DiT on an H100/H200-class GPU."""
    t = _scaled(TRAIN_STEP_S, TRAIN_ATTENTION, s, _clips(s))
    if not s.gradient_checkpointing and not s.activation_offload:
        t *= NO_CHECKPOINTING
    elif not s.selective:
        t *= RECOMPUTE_ATTENTION
    t *= 1.0 if compiles(s) else EAGER
    t *= SWAP_OR_OFFLOAD if (s.blocks_to_swap or s.activation_offload) else 1.0
    return t * PRECISION_SPEED.get(s.precision, 1.0)


def sample_step_seconds(s: PlanSettings) -> float:
    t = _scaled(SAMPLE_STEP_S, SAMPLE_ATTENTION, s, 1) * (1.0 if s.cfg else 0.5)
    t *= (1.0 if compiles(s) else EAGER) * (SWAP_OR_OFFLOAD if s.blocks_to_swap else 1.0)
    return t * PRECISION_SPEED.get(s.precision, 1.0)


def per_step(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2g} s"


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


@dataclass
class Estimate:
    """The numbers under a form; ``lines`` are what it shows (and what headless runs print)."""
    card: str
    peak_gib: float
    host_ram_gib: float
    step_s: float
    total_s: float
    fits: Optional[bool]
    advice: str
    lines: list

    def text(self) -> str:
        return "\n".join(self.lines)


def _verdict(card: str, fits: Optional[bool], advice: str) -> str:
    if fits is None:
        return "no GPU chosen (cpu/tiny): the numbers are for the full-size model on a CUDA GPU"
    return f"fits in {card}" if fits else f"will not fit in {card}: {advice}"


def _compiled(compile_setting: str, gpu_gib: Optional[float]) -> bool:
    return str(compile_setting) != "off" and gpu_gib is not None


def _keeps_attention(keep: str, s: PlanSettings, gpu_gib: Optional[float]) -> bool:
    """As train.checkpointing_mode decides on a GPU of ``gpu_gib``."""
    if keep == "auto":
        return use_selective(s, gpu_gib)
    return keep == "on" and s.gradient_checkpointing and not (s.activation_offload or s.blocks_to_swap)


def training_estimate(train, dataset, card: str) -> Estimate:
    """``train``/``dataset``: config.TrainSettings/DatasetSettings; ``card``: a PRESETS name."""
    gpu = PRESETS[card]
    s = training_plan_settings(train, dataset, compile=_compiled(train.compile, gpu))
    s = replace(s, selective=_keeps_attention(train.keep_attention, s, gpu))
    rep = report(s, gpu)
    step = train_step_seconds(s) * train.grad_accum
    val = validation_seconds(train) * (train.steps // train.validate_every if train.validate_every else 0)
    total = step * train.steps + val + (TRAIN_COMPILE_S if s.compile else 0.0)
    lines = [f"full-size model at {dataset.resolution}x{dataset.num_frames}, batch {_clips(s)}: "
             f"predicted GPU peak {rep['peak_gib']} GiB, host RAM {rep['host_ram_gib']} GiB",
             f"about {per_step(step)} a step on an H100-class GPU; {train.steps} steps"
             + (f" and validation ({duration(val)})" if val else "") + f": about {duration(total)}",
             _verdict(card, rep["fits"], rep["advice"])]
    return Estimate(card, rep["peak_gib"], rep["host_ram_gib"], step, total, rep["fits"], rep["advice"], lines)


def validation_seconds(train) -> float:
    """One validation round: each prompt sampled at the validation size (CFG when guidance > 1; with
    validation_distilled, 16 steps without CFG), plus each clip's decode and write."""
    if not train.validation_prompts:
        return 0.0
    distilled = bool(getattr(train, "validation_distilled", False))
    s = sampling_plan_settings(train.validation_height, train.validation_width, train.validation_frames,
                               guided=not distilled and train.validation_guidance > 1,
                               compile=train.compile != "off")
    steps = DISTILLED_STEPS if distilled else train.validation_steps
    clip = VALIDATION_CLIP_S * tokens(s) / REF_TOKENS  # the VAE decode and the mp4 scale with the pixels
    return len(train.validation_prompts) * (steps * sample_step_seconds(s) + clip)


def sampling_estimate(values: dict, card: str, uploaded_image=None) -> Estimate:
    """04's form values (after sample.auto_settings) on a ``card`` of PRESETS."""
    from .sampling import sampling_plan

    gpu = PRESETS[card]
    rep = sampling_plan(values, uploaded_image, gpu_gib=gpu)
    s = PlanSettings(**{**rep["settings"], "compile": _compiled(values.get("compile", "auto"), gpu)})
    step = sample_step_seconds(s)
    steps = int(values.get("steps") or 0)
    total = step * steps + (SAMPLE_COMPILE_S if s.compile else 0.0)
    lines = [rep["summary"], f"about {per_step(step)} a step on an H100-class GPU; {steps} steps: about {duration(total)}"
             " per clip (base and LoRA: twice)", _verdict(card, rep["fits"], rep["advice"])]
    return Estimate(card, rep["peak_gib"], rep["host_ram_gib"], step, total, rep["fits"], rep["advice"], lines)


def training_preset(card: str, train, dataset) -> tuple[dict, str]:
    """The memory & speed settings of ``card`` for this run (TrainSettings field names) and a note saying
    which came from the planner and which are fixed."""
    gpu = PRESETS[card]
    if gpu is None:
        return (dict(base_precision="auto", gradient_checkpointing=True, keep_attention="auto",
                     activation_offload=False, blocks_to_swap=0, compile="off"),
                "cpu/tiny: fixed values (fp32 on CPU, nothing compiled, swapped or offloaded)")
    plain = replace(train, base_precision="bf16", gradient_checkpointing=True, activation_offload=False,
                    blocks_to_swap=0)
    host = SMALL_CARD_HOST_GIB if gpu < SMALL_CARD_GIB else None
    found = recommend(training_plan_settings(plain, dataset, compile=True), gpu, host_gib=host)
    # nothing fits: the planner's most frugal setting
    changes = found[0] if found else {"precision": "int8", "blocks_to_swap": 44, "activation_offload": True}
    values = dict(base_precision=changes.get("precision", "auto"), gradient_checkpointing=True, keep_attention="auto",
                  activation_offload=changes.get("activation_offload", False),
                  blocks_to_swap=changes.get("blocks_to_swap", 0), compile="auto")
    note = (f"{card}: precision, block swap and activation offload from the planner"
            + (f" (host RAM within {host:.0f} GiB)" if host else "")
            + ("" if found else " (nothing fits at this size: the most frugal settings; lower the frames)")
            + "; fixed: compile auto, keep_attention auto (kept when it fits), gradient checkpointing on")
    return values, note


def sampling_preset(card: str, values: dict, uploaded_image=None) -> tuple[dict, str]:
    """The memory & speed settings of ``card`` for 04's form values (SampleSettings field names) and a note."""
    gpu = PRESETS[card]
    if gpu is None:
        return (dict(precision="auto", offload="none", blocks_to_swap=0, compile="off"),
                "cpu/tiny: fixed values (the model's dtype, nothing compiled, swapped or offloaded)")
    from .planner import text_encoder_bytes, GIB
    from .sampling import sampling_plan

    s = PlanSettings(**sampling_plan({**values, "precision": "bf16", "blocks_to_swap": 0, "offload": "none"},
                                     uploaded_image, gpu_gib=None)["settings"])
    found = recommend(replace(s, compile=True), gpu)
    changes = found[0] if found else {"blocks_to_swap": 44}
    # the text encoder and the DiT's resident weights together: offload when they do not fit at once
    together = (found[1].parts["weights_resident"] if found else gpu) + text_encoder_bytes() / GIB
    out = dict(precision="auto", blocks_to_swap=changes.get("blocks_to_swap", 0), compile="auto",
               offload="none" if together <= gpu - 1.0 else "model")
    note = (f"{card}: block swap from the planner" + ("" if found else " (nothing fits at this size: lower the frames)")
            + "; offload=model when the text encoder and the DiT do not fit together; fixed: compile auto")
    return out, note


def detected_card() -> str:
    """The preset of this machine's first GPU (its LONGCAT_NB_GPU_MEMORY_GIB cap counts); cpu/tiny without one."""
    import torch

    from .envinfo import gpu_memory_gib

    return preset_for_gpu(gpu_memory_gib(0) if torch.cuda.is_available() else None)
