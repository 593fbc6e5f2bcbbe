"""Run settings: one dataclass per section, stored together in ``runs/<name>/config.json``.

Every notebook reads the file, lets the user change its own section (widgets or papermill
parameters) and writes it back. Unknown keys and bad values fail with an error that names
the file, the key and the fix; nothing else in the file is lost.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .io import atomic_write_text

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A setting is unknown or has a value the kit cannot use."""


@dataclass
class ModelSettings:
    # Folder in the Hub layout (dit/ vae/ text_encoder/ tokenizer/ scheduler/). "" = tiny default.
    checkpoint: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dit_dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    text_encoder_dtype: str = "auto"
    vae_dtype: str = "auto"
    # auto (block-sparse where the official pipeline uses it: grids of 720p and more on CUDA; dense SDPA
    # elsewhere) | sdpa | xformers | bsa | quant8 (8-bit dense self-attention for sampling and
    # validation; training steps use SDPA)
    attention: str = "auto"


@dataclass
class DatasetSettings:
    dataset_dir: str = ""  # "" = the bundled data_samples/
    trigger: str = ""  # prepended to every caption when set
    target_fps: float = 15.0
    num_frames: int = 93
    # A clip shorter than num_frames (after resampling to target_fps): keep = train it at the longest
    # 4k+1 frame count it has (its bucket WxH@F carries the count, so batches never mix lengths; one
    # window per such clip) | drop = skip it, reported as "too short".
    short_clips: str = "keep"
    # keep only: a clip with fewer frames than this (4k+1; 17 = 1.1 s at 15 fps, under which a clip
    # shows little motion) is reported as "too short". Never more than num_frames.
    min_frames: int = 17
    extraction: str = "head"  # head | uniform | slide
    windows: int = 1  # windows per clip for `uniform`
    stride: int = 0  # frames between window starts for `slide` (0 = num_frames)
    bucket_strategy: str = "aspect_ratio"  # aspect_ratio | resolution_frames
    resolution: str = "480x832"  # HxW target area for aspect_ratio buckets
    bucket_grid: int = 32  # bucket sizes are multiples of this (64 keeps BSA-friendly latents)
    frame_interval: int = 4
    crop: str = "center"  # center | random | none
    max_caption_tokens: int = 512


@dataclass
class CacheSettings:
    text_encoder: str = "umt5"  # umt5 (the checkpoint's) | qwen2.5-vl (SimpleTuner's; out of distribution)
    latent_dtype: str = "bfloat16"  # stored dtype of latents and text embeddings: bfloat16 | float16 | float32
    vae_tiling: bool = False  # untiled 480x832x93 encode peaks at 4.1 GiB (bf16, H100); tiling: 1.4 GiB, 3x slower
    remove_orphans: bool = False  # delete cache files no dataset.jsonl record uses (else only reported)
    # sample = a posterior draw seeded per entry (what the official pipeline feeds the DiT) | mode = its mean
    posterior: str = "sample"
    qwen_path: str = ""  # qwen2.5-vl only: local folder or Hub id; "" = Qwen/Qwen2.5-VL-7B-Instruct


@dataclass
class TrainSettings:
    steps: int = 1000
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["attn.qkv", "attn.proj", "cross_attn.q_linear",
                                                    "cross_attn.kv_linear", "cross_attn.proj"])
    lr: float = 1e-4
    optimizer: str = "adamw"  # adamw | adamw8bit | prodigy
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    timestep_sampling: str = "shift"  # shift | logit_normal
    caption_dropout: float = 0.05  # share of steps trained on the empty prompt (what CFG contrasts with)
    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | int8 | int4 | fp8 (weight-only, saves memory) |
    # fp8_rowwise (float8 matmuls: faster on Hopper and newer, bf16-sized weights) | nf4
    base_precision: str = "auto"
    gradient_checkpointing: bool = True
    # checkpointing also keeps each block's video self-attention output, so the backward does not
    # recompute attention (+0.3 GiB a block at 480x832x93): auto = when the VRAM planner says it fits
    keep_attention: str = "auto"  # auto | on | off
    activation_offload: bool = False  # checkpointed block inputs in pinned CPU memory
    blocks_to_swap: int = 0
    # torch.compile of each whole block: auto = on CUDA with a working Triton (the first step takes
    # about 40 s longer, then each is faster), eager elsewhere | on | off
    compile: str = "auto"
    seed: int = 42
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    validate_every: int = 0
    validation_prompts: list = field(default_factory=list)
    # one per prompt (or fewer): an image path makes that prompt image-to-video, "" keeps it text-to-video
    validation_images: list = field(default_factory=list)
    validation_steps: int = 20  # sampling steps of a validation clip (a preview; 04_sample uses 50)
    validation_height: int = 480
    validation_width: int = 832
    validation_frames: int = 93
    validation_guidance: float = 4.0


@dataclass
class SampleSettings:
    # 04_sample's settings as last asked (recorded there; the sampler itself takes a SampleRequest). 0 in
    # height/width/num_frames/steps/guidance = auto (sample.auto_settings: from the checkpoint and
    # `distilled`), kept as 0 so a rerun re-derives them; each clip's JSON in samples/ has the values used.
    prompt: str = "A red ball bounces across a blue floor from left to right, soft shadows."
    # "" with guidance > 1 = the empty negative, as the official pipeline; "official" = the official
    # demos' negative prompt (text.OFFICIAL_NEGATIVE_PROMPT); any other text as given
    negative_prompt: str = ""
    mode: str = "t2v"  # t2v | i2v | continuation
    image: str = ""  # i2v conditioning image
    video: str = ""  # continuation input (resampled to fps)
    num_cond_frames: int = 13  # continuation: last k frames (4k+1) -> 1 + (k-1)/4 latents
    # i2v/continuation with height = width = 0: the official bucket nearest to the input's aspect
    # ratio, from this table ("" = 480p); the input is center-cropped, never stretched
    resolution: str = ""
    height: int = 0  # 0 = auto: 480x832 for t2v, the bucket of the input for i2v/continuation
    width: int = 0
    num_frames: int = 0
    steps: int = 0
    guidance: float = 0.0
    seed: int = 0
    fps: int = 15
    distilled: bool = False  # the checkpoint's cfg_step_lora: 16 steps, guidance 1
    use_kv_cache: bool = True  # continuation: cache the conditioning tokens' k/v
    enhance_hf: bool = True  # continuation (not distilled): 10 uniform steps below t=500
    offload: str = "none"  # none | model (DiT/VAE/text encoder on the GPU only while used)
    precision: str = "auto"  # DiT base weights: auto (model.dit_dtype) | bf16 | fp16 | fp32 | int8 | int4 | fp8 | fp8_rowwise | nf4
    blocks_to_swap: int = 0  # last N DiT blocks' weights in CPU memory, streamed in per block
    # torch.compile of each DiT block: auto = on CUDA with a working Triton | on | off. The first clip
    # (and each LoRA change) compiles for about 15 s, then every step is faster (6.9 vs 9.4 s per CFG
    # step at 480x832x93 on an H200)
    compile: str = "auto"
    loras: list = field(default_factory=list)  # [{"path": ..., "scale": 1.0}]


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
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return int(as_float)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


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
        setattr(inst, key, _coerce(value, getattr(inst, key), f"{source}: {name}.{key}"))
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


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read ``run_dir/config.json``; a missing file gives the defaults."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.exists():
        return RunConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e}). Fix the file by hand or delete it to start from defaults."
        ) from None
    return config_from_dict(data, str(path))


def save_config(run_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def update_section(run_dir: str | os.PathLike, name: str, **values: Any) -> RunConfig:
    """Change some keys of one section, keep everything else, write atomically."""
    if name not in SECTIONS:
        raise ConfigError(f"unknown section '{name}'; valid sections: {sorted(SECTIONS)}")
    cfg = load_config(run_dir)
    current = asdict(getattr(cfg, name))
    current.update(values)
    setattr(cfg, name, section_from_dict(name, current, str(Path(run_dir) / CONFIG_NAME)))
    save_config(run_dir, cfg)
    return cfg


def resolve_parameters(run_dir: str | os.PathLike, name: str, **parameters: Any) -> dict:
    """The values a notebook's form starts from, for the settings of section ``name``.

    A parameter that is given (papermill ``-p``, or typed into the parameters cell) wins, coerced to
    the setting's type; one left at ``None`` takes the run's saved value from ``run_dir/config.json``,
    else the kit default (the dataclass above). So re-running a notebook without parameters keeps
    what an earlier run set, and the notebooks, the command line and a fresh config share one set of
    defaults."""
    if name not in SECTIONS:
        raise ConfigError(f"unknown section '{name}'; valid sections: {sorted(SECTIONS)}")
    defaults = SECTIONS[name]()
    unknown = sorted(k for k in parameters if not hasattr(defaults, k))
    if unknown:
        raise ConfigError(f"parameter(s) {unknown} are not settings of section '{name}'; "
                          f"valid: {sorted(f.name for f in fields(defaults))}")
    saved = getattr(load_config(run_dir), name)
    return {k: getattr(saved, k) if v is None else _coerce(v, getattr(defaults, k), f"parameter {k} ({name} settings)")
            for k, v in parameters.items()}


def replace(section: Any, **changes: Any) -> Any:
    return dataclasses.replace(section, **changes)
