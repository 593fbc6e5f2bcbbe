"""Run settings: one dataclass per section, stored together in ``runs/<name>/config.json``.

Every notebook reads the file, lets the user change its own section (widgets or papermill
parameters) and writes it back. Unknown keys and bad values fail with an error that names
the file, the key and the fix; nothing else in the file is lost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .config_checks import (  # the check= rules of the fields below
    _device, _four_k_plus_one, _guidance_or_auto, _loras, _module_names, _multiple_of_16, _resolution, _texts,
    _zero_is_auto)
from .io import atomic_write_text

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A setting is unknown or has a value the kit cannot use."""


# ---------------------------------------------------------------------------------------------
# the rules of each setting live in its field's metadata: ``choices`` (the one list of allowed values,
# read by the checks and by the forms), ``ge``/``gt``/``le``/``lt`` (bounds) and ``check`` (a function
# returning what is wrong and the fix, or None). Every value is checked before config.json is written.
# ---------------------------------------------------------------------------------------------
def setting(default: Any, **rules: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


AUTO_ON_OFF = ("auto", "on", "off")
DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")  # model_files.pick_dtype's names
# The kit's shared choices, defined here once because this module imports no torch: memory, planner,
# lora, sample and flow import them.
QUANTIZED = ("int8", "int4", "fp8", "fp8_rowwise", "nf4")  # base precisions that replace the big Linears
PRECISIONS = ("auto", "fp32", "bf16", "fp16") + QUANTIZED  # base-weight precisions (memory.apply_base_precision)
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")  # LoRA
TIMESTEP_SAMPLING = ("shift", "uniform", "logit_normal", "sigmoid")  # training's σ draws (flow.sample_sigmas)
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")  # per-sample loss weights (flow.loss_weights)
MODES = ("t2v", "i2v", "continuation")  # sampling modes
OFFLOAD = ("none", "model")  # sampling offload
ADAPTERS = ("lora", "dora", "lokr", "loha")  # trainable adapter types (peft's configs, lora/kinds.py)
BASE_FPS = 15  # the model's frame rate: every official stage-1 clip; refinement doubles it


def _dataset_list(items: list) -> Optional[str]:
    from .data.datasets import list_problem  # the list's rules live with the list

    return list_problem(items)


@dataclass
class ModelSettings:
    checkpoint: str = setting("", help="Folder in the Hub layout (dit/ vae/ text_encoder/ tokenizer/ scheduler/); "
                              "empty = the tiny default model")
    device: str = setting("auto", check=_device, help="auto | cpu | cuda | cuda:N (the GPU's index) | mps")
    dit_dtype: str = setting("auto", choices=DTYPES, help="The DiT's dtype: auto = bfloat16 on GPU, float32 on CPU")
    text_encoder_dtype: str = setting("auto", choices=DTYPES, help="The text encoder's dtype (auto as dit_dtype)")
    vae_dtype: str = setting("auto", choices=DTYPES, help="The VAE's dtype (auto as dit_dtype)")
    attention: str = setting("auto", choices=("auto", "sdpa", "xformers", "bsa", "quant8"),
                             help="auto = block-sparse where the official pipeline uses it (grids of 720p and more "
                             "on CUDA); below them 8-bit dense attention (quant8) for sampling and validation on "
                             "GPUs of compute capability 8.9+ and dense SDPA for training steps | sdpa (bf16 "
                             "everywhere) | xformers | bsa | quant8 (8-bit dense self-attention for sampling and "
                             "validation; training steps use SDPA)")


@dataclass
class DatasetSettings:
    dataset_dir: str = setting("", help="The folder of clips and captions; empty = the bundled data_samples/")
    trigger: str = setting("", help="A word prepended to every caption when set (the LoRA's trigger)")
    target_fps: float = setting(float(BASE_FPS), gt=0, help="Clips are resampled to this frame rate: 15 for the "
                                "base stage, 30 for refinement")
    num_frames: int = setting(93, check=_four_k_plus_one, help="Frames per training window (4k+1: 93 = 6.2 s at 15 fps)")
    short_clips: str = setting("keep", choices=("keep", "drop"),
                               help="A clip shorter than num_frames (after resampling): keep = train it at its "
                               "longest 4k+1 frame count (its own bucket, one window) | drop = skip it, reported "
                               "as too short")
    min_frames: int = setting(17, check=_four_k_plus_one,
                              help="keep only: a clip with fewer frames (4k+1; 17 = 1.1 s at 15 fps, too little "
                              "motion) is reported as too short. Never more than num_frames")
    extraction: str = setting("head", choices=("head", "uniform", "slide"),
                              help="Which windows of a clip are trained: head = the first | uniform = `windows` "
                              "spread evenly | slide = every `stride` frames")
    windows: int = setting(1, ge=1, help="Windows per clip for extraction = uniform")
    stride: int = setting(0, ge=0, help="Frames between window starts for extraction = slide (0 = num_frames)")
    bucket_strategy: str = setting("aspect_ratio", choices=("aspect_ratio", "resolution_frames"),
                                   help="aspect_ratio = sizes of about `resolution`'s area in each clip's aspect "
                                   "ratio | resolution_frames = each clip's own size and length")
    resolution: str = setting("480x832", check=_resolution, help="HEIGHTxWIDTH: the target area of aspect_ratio buckets")
    bucket_grid: int = setting(32, check=_multiple_of_16, help="Bucket sizes are multiples of this (64 keeps "
                               "block-sparse-attention-friendly latents)")
    frame_interval: int = setting(4, ge=1, help="Frames between the frame counts of buckets (the VAE's 4)")
    crop: str = setting("center", choices=("center", "random", "none"), help="How a clip is cut to its bucket's size")
    crop_seed: int = setting(0, ge=0, help="random crops: each window's crop is drawn from (crop_seed, clip, window, "
                             "variant) when 01 scans, so the cache holds it")
    crop_variants: int = setting(1, ge=1, help="random crops: how many different crops of every window are cached")
    allow_outside: bool = setting(False, help="Accept metadata.jsonl/csv paths that lead outside the dataset folder "
                                  "(../x.mp4, /abs/path); refused unless on")
    max_caption_tokens: int = setting(512, ge=1, le=512, help="Caption tokens kept (UMT5 reads 512; more would be cut)")
    datasets: list = setting([], check=_dataset_list, help=(
        "several datasets in one run: a JSON list of entries {\"dataset_dir\": ..., \"repeats\": 1, \"role\": "
        "\"train\" | \"regularisation\" | \"eval\", \"loss_weight\": 1.0}, each optionally with its own num_frames, "
        "target_fps, resolution, extraction, windows, stride, crop, trigger, short_clips, min_frames, "
        "max_caption_tokens; a train entry may hold out eval_fraction (0-1) or eval_files. [] = dataset_dir alone"))


@dataclass
class CacheSettings:
    text_encoder: str = setting("umt5", choices=("umt5", "qwen2.5-vl"),
                                help="umt5 = the checkpoint's own | qwen2.5-vl = SimpleTuner's (out of distribution)")
    latent_dtype: str = setting("bfloat16", choices=("bfloat16", "float16", "float32"),
                                help="The stored dtype of latents and text embeddings")
    vae_tiling: bool = setting(False, help="Encode in spatial tiles: 1.4 GiB instead of 4.1 GiB at 480x832x93 (bf16), "
                               "3x slower; for cards under ~8 GB")
    remove_orphans: bool = setting(False, help="Delete cache files no dataset.jsonl record uses (else only reported)")
    posterior: str = setting("sample", choices=("sample", "mode"),
                             help="sample = a posterior draw seeded per entry (what the official pipeline feeds the "
                             "DiT) | mode = its mean")
    qwen_path: str = setting("", help="qwen2.5-vl only: a local folder or Hub id; empty = Qwen/Qwen2.5-VL-7B-Instruct")


@dataclass
class TrainSettings:
    steps: int = setting(1000, ge=1, help="Optimizer steps to train")
    rank: int = setting(32, ge=1, help="LoRA rank: capacity of the adapter (and its size on disk)")
    alpha: float = setting(32.0, gt=0, help="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = setting(0.0, ge=0, lt=1, help="Dropout on the LoRA's input")
    targets: list = setting(list(DEFAULT_TARGETS), check=_module_names,
                            help="Modules of each block that get a LoRA, one per line (presets: ffn, modulation)")
    lr: float = setting(1e-4, gt=0, help="Learning rate (prodigy: 1.0)")
    optimizer: str = setting("adamw", choices=("adamw", "adamw8bit", "prodigy"),
                             help="adamw | adamw8bit (bitsandbytes, smaller states) | prodigy (sets its own rate)")
    lr_schedule: str = setting("constant", choices=("constant", "cosine"), help="constant | cosine decay to 0")
    warmup_steps: int = setting(0, ge=0, help="Steps of linear warmup of the learning rate")
    batch_size: int = setting(1, ge=1, help="Clips per step (a bucket's clips; memory grows with it)")
    grad_accum: int = setting(1, ge=1, help="Batches whose gradients add up before each optimizer step")
    max_grad_norm: float = setting(1.0, ge=0, help="Gradient clipping norm (0 = no clipping)")
    timestep_sampling: str = setting("shift", choices=TIMESTEP_SAMPLING,
                                     help="How training draws noise levels: shift (uniform, then the static shift `shift`, as the "
                                     "official schedule) | uniform | logit_normal (logit_mean, logit_std; shifted) | "
                                     "sigmoid (sigmoid_scale)")
    caption_dropout: float = setting(0.05, ge=0, le=1,
                                     help="Share of steps trained on the empty prompt (what CFG contrasts with)")
    base_precision: str = setting("auto", choices=PRECISIONS,
                                  help="The frozen base's weights: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | "
                                  "int8 | int4 | fp8 (weight-only, saves memory) | fp8_rowwise (float8 matmuls: faster "
                                  "on Hopper and newer, bf16-sized weights) | nf4")
    gradient_checkpointing: bool = setting(True, help="Recompute each block's activations in the backward instead of "
                                           "keeping them (far less memory)")
    keep_attention: str = setting("auto", choices=AUTO_ON_OFF,
                                  help="Checkpointing also keeps each block's self-attention output, so the backward "
                                  "does not recompute attention (+0.3 GiB a block at 480x832x93): auto = when the "
                                  "VRAM planner says it fits")
    activation_offload: bool = setting(False, help="Keep checkpointed block inputs in pinned CPU memory (under 3% "
                                       "slower)")
    blocks_to_swap: int = setting(0, ge=0, help="The last N of the 48 DiT blocks stay in CPU memory and stream in "
                                  "(under 3% slower)")
    compile: str = setting("auto", choices=AUTO_ON_OFF,
                           help="torch.compile of each whole block: auto = on CUDA with a working Triton (the first "
                           "step takes about 40 s longer, then each is faster), eager elsewhere | on | off")
    verify_cache: bool = setting(False, help="At train start, also check every cache file's sha256 (else sizes and "
                                 "headers)")
    seed: int = setting(42, ge=0, le=2**63 - 1, help="Seed of noise, timesteps and the LoRA's initial weights")
    checkpoint_every: int = setting(100, ge=0, help="Steps between resumable checkpoints (0 = none: nothing to resume "
                                    "from)")
    keep_checkpoints: int = setting(3, ge=0, help="Checkpoints kept on disk (older ones are deleted)")
    validate_every: int = setting(0, ge=0, help="Steps between validation clips (0 = no validation)")
    validation_prompts: list = setting([], check=_texts, help="Prompts of the validation clips, one per line")
    validation_images: list = setting([], check=_texts,
                                      help="One per prompt (or fewer): an image path makes that prompt image-to-video, "
                                      "\"\" keeps it text-to-video")
    validation_steps: int = setting(20, ge=1, help="Sampling steps of a validation clip (a preview; 04_sample uses 50)")
    validation_height: int = setting(480, check=_multiple_of_16, help="Validation clip height (multiple of 16)")
    validation_width: int = setting(832, check=_multiple_of_16, help="Validation clip width (multiple of 16)")
    validation_frames: int = setting(93, check=_four_k_plus_one, help="Validation clip frames (4k+1)")
    validation_guidance: float = setting(4.0, ge=1, help="Validation CFG scale (1 = no guidance)")
    loss_weighting: str = setting("none", choices=LOSS_WEIGHTING, help=(
        "weight of each sample's loss by its noise level σ (SD3 paper): none = plain MSE (as the kit always did) | "
        "sigma_sqrt = 1/σ² (stresses low noise, fine detail) | cosmap = 2/(π(1−2σ+2σ²)) (stresses mid noise)"))
    shift: float = setting(12.0, gt=0, help=(
        "the static shift σ' = sσ/(1+(s−1)σ) of timestep_sampling shift and logit_normal: 12 = the checkpoint's "
        "scheduler (moves σ toward 1, where the sampler spends its steps); 1 = no shift"))
    logit_mean: float = setting(0.0, help="logit_normal: the mean of the normal draw before the sigmoid (SD3: 0)")
    logit_std: float = setting(1.0, gt=0, help="logit_normal: its standard deviation (SD3: 1)")
    sigmoid_scale: float = setting(1.0, gt=0, help="sigmoid: σ = sigmoid(scale·N(0, 1)) (kohya's sigmoid_scale)")
    sigma_min: float = setting(0.0, ge=0, lt=1, help="every drawn σ is mapped onto [sigma_min, sigma_max] "
                               "(e.g. 0.5–1 trains only the noisy half: composition and motion)")
    sigma_max: float = setting(1.0, gt=0, le=1, help="the top of that range (1 = pure noise)")
    ema_decay: float = setting(0.0, ge=0, lt=1, help=(
        "exponential moving average of the adapter weights, updated every step (0 = off; 0.999 averages about "
        "the last 1000 steps): kept in checkpoints, exported beside the LoRA as lora-stepN_ema.safetensors"))
    validation_weights: str = setting("raw", choices=("raw", "ema"), help=(
        "the weights validation clips are sampled with: raw = as trained | ema = the moving average (ema_decay > 0)"))
    wandb: str = setting("auto", choices=AUTO_ON_OFF, help=(
        "also log to Weights & Biases (beside TensorBoard and logs/train.jsonl), with every setting of the run: "
        "auto = when wandb is installed | on = required | off"))
    wandb_project: str = setting("longcat-nb", help="the wandb project the run is logged under")
    wandb_mode: str = setting("offline", choices=("offline", "online"), help=(
        "offline = written under logs/wandb/, no network or login (upload later with wandb sync) | online"))
    validation_prompts_file: str = setting("", help=(
        "a text file of more validation prompts, one a line; 'prompt | image.png' makes one image-to-video (the "
        "image relative to the file). Relative to the run folder, or absolute; \"\" = none"))
    validation_distilled: bool = setting(False, help=(
        "sample validation clips with the checkpoint's distill LoRA (lora/cfg_step_lora.safetensors) stacked under "
        "the LoRA being trained: 16 steps without guidance, 5x fewer DiT passes than 40 CFG steps (validation_steps "
        "and validation_guidance are then not used); a 480x832x93 clip took 87 s against 40 CFG steps' 287 s on an "
        "H100, at the same GPU peak. The clips show the LoRA through the distilled model"))
    eval_every: int = setting(0, ge=0, help=(
        "every N steps, the loss on the eval samples (dataset entries with role eval, or eval_fraction / "
        "eval_files) at fixed sigmas and fixed noise, so two runs' curves compare; 0 = never"))
    batch_tokens: int = setting(0, ge=0, help=(
        "per-bucket batch sizes: each bucket's batch holds as many clips as fit this many latent tokens (never "
        "fewer than batch_size), so short or small buckets fill the GPU as the largest does; 0 = batch_size "
        "everywhere. A 480x832x93 clip is 37,440 tokens; the planner predicts the largest batch's peak"))
    validation_from_eval: int = setting(0, ge=0, help=(
        "also validate on up to N held-out eval samples (dataset entries with role eval): their captions as "
        "prompts, their conditioning image (if any) as the image-to-video input; 0 = none"))
    validation_eval_i2v: bool = setting(False, help=(
        "validation_from_eval: an eval clip without a conditioning image is validated as image-to-video from its "
        "own first frame (else text-to-video from its caption)"))
    adapter: str = setting("lora", choices=ADAPTERS, help=(
        "adapter type, each peft's own: lora (low-rank B·A), dora (LoRA + a learnt magnitude per output row "
        "of each weight), lokr (Kronecker product of two small factors), loha (Hadamard product of two "
        "low-rank products). rank and alpha mean what peft means for each (scale alpha/rank); for LoKr and "
        "LoHa, dropout drops whole rank components. The official export layout takes plain LoRA only"))
    validation_preview_every: int = setting(4, ge=0, help=(
        "in 03, a rough look at each validation clip every N denoising steps while it forms (the latents projected "
        "to colour, no VAE: about a millisecond a frame); 0 = none. Not shown headless or on several GPUs"))


@dataclass
class SampleSettings:
    # 04_sample's settings as last asked (recorded there; the sampler itself takes a SampleRequest). 0 in
    # height/width/num_frames/steps/guidance = auto (sample.auto_settings: from the checkpoint and
    # `distilled`), kept as 0 so a rerun re-derives them; each clip's JSON in samples/ has the values used.
    prompt: str = setting("A red ball bounces across a blue floor from left to right, soft shadows.",
                          help="What the clip shows")
    negative_prompt: str = setting("", help="Empty with guidance > 1 = the empty negative, as the official pipeline; "
                                   "official = the official demos' negative prompt; any other text as given")
    mode: str = setting("t2v", choices=MODES, help="t2v (text) | i2v (from an image) | continuation (of a video)")
    image: str = setting("", help="i2v: the conditioning image's path")
    video: str = setting("", help="continuation: the input video's path (resampled to fps)")
    num_cond_frames: int = setting(13, check=_four_k_plus_one,
                                   help="continuation: the last k frames (4k+1) condition the clip")
    resolution: str = setting("", choices=("", "480p", "720p"),
                              help="i2v/continuation with height = width = 0: the official bucket nearest to the "
                              "input's aspect ratio from this table (empty = 480p); center-cropped, never stretched")
    height: int = setting(0, check=_zero_is_auto(_multiple_of_16),
                          help="0 = auto: 480x832 for t2v, the bucket of the input for i2v/continuation")
    width: int = setting(0, check=_zero_is_auto(_multiple_of_16), help="0 = auto (see height)")
    num_frames: int = setting(0, check=_zero_is_auto(_four_k_plus_one), help="Frames (4k+1); 0 = auto (93)")
    steps: int = setting(0, ge=0, help="Denoising steps; 0 = auto (50, 16 distilled)")
    guidance: float = setting(0.0, check=_guidance_or_auto, help="CFG scale; 0 = auto (4, 1 distilled); 1 = none")
    seed: int = setting(0, ge=0, le=2**63 - 1, help="Seed of the initial noise")
    fps: int = setting(BASE_FPS, ge=1, help="Frame rate of the written mp4")
    distilled: bool = setting(False, help="The checkpoint's cfg_step_lora: 16 steps, guidance 1")
    use_kv_cache: bool = setting(True, help="continuation: cache the conditioning tokens' k/v")
    enhance_hf: bool = setting(True, help="continuation (not distilled): 10 uniform steps below t=500")
    offload: str = setting("none", choices=OFFLOAD,
                           help="none | model (DiT and VAE on the GPU only while used, the text encoder read from "
                           "disk onto the GPU for each prompt and not kept in host RAM: for small cards and hosts)")
    precision: str = setting("auto", choices=PRECISIONS,
                             help="DiT base weights: auto (model.dit_dtype) | bf16 | fp16 | fp32 | int8 | int4 | fp8 | "
                             "fp8_rowwise | nf4")
    blocks_to_swap: int = setting(0, ge=0, help="The last N DiT blocks' weights stay in CPU memory, streamed in per "
                                  "block")
    compile: str = setting("auto", choices=AUTO_ON_OFF,
                           help="torch.compile of each DiT block: auto = on CUDA with a working Triton | on | off. The "
                           "first clip (and each LoRA change) compiles for about 15 s, then every step is faster (6.9 "
                           "vs 9.4 s per CFG step at 480x832x93 on an H200)")
    loras: list = setting([], check=_loras, help='LoRAs stacked on the base, one per line: {"path": ..., "scale": 1.0}')
    preview_every: int = setting(5, ge=0, help=(
        "show a rough preview of the clip every N denoising steps while it forms (a 16 -> 3 colour projection "
        "of the latents, no VAE: about a millisecond); 0 = none. Interactive notebooks only"))


def _train_together(s: TrainSettings) -> list[str]:
    if s.validation_weights == "ema" and not s.ema_decay:
        return ["train.validation_weights='ema' needs an EMA: set train.ema_decay (e.g. 0.999), or validation_weights='raw'"]
    if s.sigma_min >= s.sigma_max:
        return [f"train.sigma_min={s.sigma_min} is not below train.sigma_max={s.sigma_max}: give a range, e.g. "
                "sigma_min=0, sigma_max=1 (all noise levels)"]
    if len(s.validation_images) > len(s.validation_prompts):
        return [f"train.validation_images has {len(s.validation_images)} entries for "
                f"{len(s.validation_prompts)} prompt(s) in train.validation_prompts: give one image per prompt "
                "or fewer (\"\" keeps a prompt text-to-video), or add the prompts"]
    return []


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "dataset": DatasetSettings,
    "cache": CacheSettings,
    "train": TrainSettings,
    "sample": SampleSettings,
}


@dataclass
class RunConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Accept JSON/papermill values for a field whose default tells its type."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return int(as_float)
    if isinstance(default, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    if isinstance(default, list):
        if isinstance(value, str) and value.lstrip().startswith("["):  # JSON text (papermill -p x='[...]')
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _coerce_field(f: dataclasses.Field, value: Any, where: str) -> Any:
    # auto | on | off settings were true/false in older config files (and are a checkbox's value)
    if {"on", "off"} <= set(f.metadata.get("choices", ())):
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return "on" if str(value).lower() == "true" else "off"
    return _coerce(value, _default(f), where)


_BOUNDS = (("ge", operator.ge, "at least"), ("gt", operator.gt, "above"),
           ("le", operator.le, "at most"), ("lt", operator.lt, "below"))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "…"


def _listing(choices: tuple) -> str:
    return ", ".join(repr(c) if c == "" else str(c) for c in choices)


def field_problem(section: str, f: dataclasses.Field, value: Any, prefix: str = "") -> Optional[str]:
    """What is wrong with ``value`` for setting ``f`` of ``section``, with the allowed values and the fix;
    None when it is fine."""
    rules, name = f.metadata, f"{section}.{f.name}"
    if "choices" in rules and value not in rules["choices"]:
        return (f"{prefix}{name}={_show(value)} is not a choice: set one of {_listing(rules['choices'])} "
                f"(default {_default(f)!r})")
    for key, ok, words in _BOUNDS:
        if key in rules and not ok(value, rules[key]):
            lo = next((f"{rules[k]} {sign} " for k, sign in (("ge", "<="), ("gt", "<")) if k in rules), "")
            hi = next((f" {sign} {rules[k]}" for k, sign in (("le", "<="), ("lt", "<")) if k in rules), "")
            return (f"{prefix}{name}={_show(value)} is out of range: it must be {words} {rules[key]} "
                    f"(allowed: {lo}{f.name}{hi}; default {_default(f)!r})")
    problem = rules["check"](value) if "check" in rules else None
    return f"{prefix}{name}={_show(value)}: {problem}" if problem else None


# (sample has none: 04 saves height/width as asked, one may stay 0 = auto while the other was typed in)
_TOGETHER = {"train": _train_together}


def section_problems(name: str, inst: Any, prefix: str = "") -> list[str]:
    """Every setting of one section checked on its own, then the rules that tie settings together."""
    problems = [p for f in fields(inst) if (p := field_problem(name, f, getattr(inst, f.name), prefix))]
    if not problems and name in _TOGETHER:
        problems = [prefix + p for p in _TOGETHER[name](inst)]
    return problems


def field_choices(name: str) -> dict[str, tuple]:
    """The allowed values of each choice setting of section ``name`` (for dropdowns)."""
    return {f.name: f.metadata["choices"] for f in fields(SECTIONS[name]) if "choices" in f.metadata}


def _refuse(problems: list[str]) -> None:
    if problems:
        head = "" if len(problems) == 1 else f"{len(problems)} settings cannot be used:\n"
        raise ConfigError(head + "\n".join(problems))


def section_from_dict(name: str, values: dict, source: str = "config") -> Any:
    cls = SECTIONS[name]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {unknown} in section '{name}'. "
            f"Valid keys: {sorted(known)}. Fix the spelling or remove the key."
        )
    inst = cls()
    for key, value in values.items():
        setattr(inst, key, _coerce_field(known[key], value, f"{source}: {name}.{key}"))
    _refuse(section_problems(name, inst, f"{source}: "))
    return inst


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}. "
            "Remove or rename them."
        )
    cfg = RunConfig()
    for name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a JSON object, got {values!r}")
        setattr(cfg, name, section_from_dict(name, values, source))
    return cfg


def _read_saved(path: Path) -> dict:
    """config.json as JSON, not yet checked ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e}). Fix the file by hand or delete it to start from defaults."
        ) from None


def _with_section(data: Any, name: str, values: dict) -> Any:
    """``data`` with some keys of section ``name`` replaced (left as is when it is no JSON object:
    config_from_dict then says so)."""
    if not isinstance(data, dict) or not isinstance(data.get(name, {}), dict):
        return data
    return {**data, name: {**data.get(name, {}), **values}}


@contextlib.contextmanager
def _unchanged(path: Path):
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{e}\nNothing was written: {path} was not changed.") from None


def _check_section_name(name: str) -> None:
    if name not in SECTIONS:
        raise ConfigError(f"unknown section '{name}'; valid sections: {sorted(SECTIONS)}")


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read and check ``run_dir/config.json``; a missing file gives the defaults."""
    path = Path(run_dir) / CONFIG_NAME
    return config_from_dict(_read_saved(path), str(path))


def save_config(run_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    """Check every setting of ``cfg``, then write config.json atomically; a refused value leaves the file
    as it was."""
    path = Path(run_dir) / CONFIG_NAME
    with _unchanged(path):
        checked = config_from_dict(cfg.to_dict(), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(checked.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def update_section(run_dir: str | os.PathLike, name: str, **values: Any) -> RunConfig:
    """Change some keys of one section, keep everything else; checked first, then written atomically."""
    _check_section_name(name)
    path = Path(run_dir) / CONFIG_NAME
    with _unchanged(path):
        cfg = config_from_dict(_with_section(_read_saved(path), name, values), str(path))
    save_config(run_dir, cfg)
    return cfg


def resolve_parameters(run_dir: str | os.PathLike, name: str, **parameters: Any) -> dict:
    """The values a notebook's form starts from, for the settings of section ``name``.

    A parameter that is given (papermill ``-p``, or typed into the parameters cell) wins, coerced to
    the setting's type and checked; one left at ``None`` takes the run's saved value from
    ``run_dir/config.json``, else the kit default (the dataclass above). So re-running a notebook
    without parameters keeps what an earlier run set, and the notebooks, the command line and a fresh
    config share one set of defaults. A value the kit cannot use stops here, before anything is written."""
    _check_section_name(name)
    known = {f.name: f for f in fields(SECTIONS[name])}
    unknown = sorted(k for k in parameters if k not in known)
    if unknown:
        raise ConfigError(f"parameter(s) {unknown} are not settings of section '{name}'; "
                          f"valid: {sorted(known)}")
    given = {k: _coerce_field(known[k], v, f"parameter {k} ({name} settings)")
             for k, v in parameters.items() if v is not None}
    _refuse([p for k, v in given.items() if (p := field_problem(name, known[k], v, "parameter "))])
    path = Path(run_dir) / CONFIG_NAME
    section = getattr(config_from_dict(_with_section(_read_saved(path), name, given), str(path)), name)
    return {k: getattr(section, k) for k in parameters}


def replace(section: Any, **changes: Any) -> Any:
    return dataclasses.replace(section, **changes)
