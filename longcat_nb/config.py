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
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

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
DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")  # checkpoint.pick_dtype's names
# The kit's shared choices, defined here once because this module imports no torch: memory, planner,
# lora, sample and flow import them.
QUANTIZED = ("int8", "int4", "fp8", "fp8_rowwise", "nf4")  # base precisions that replace the big Linears
PRECISIONS = ("auto", "fp32", "bf16", "fp16") + QUANTIZED  # base-weight precisions (memory.apply_base_precision)
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")  # LoRA
TIMESTEP_SAMPLING = ("shift", "logit_normal")  # training's σ draws (flow.sample_sigmas)
MODES = ("t2v", "i2v", "continuation")  # sampling modes
OFFLOAD = ("none", "model")  # sampling offload
ADAPTERS = ("lora", "dora", "lokr", "loha")  # trainable adapter types (peft's configs, lora/kinds.py)
BASE_FPS = 15  # the model's frame rate: every official stage-1 clip; refinement doubles it


def _four_k_plus_one(n: int) -> Optional[str]:
    if n >= 1 and (n - 1) % 4 == 0:
        return None
    lo = max(1, (n - 1) // 4 * 4 + 1)
    return f"the VAE takes 4k+1 frames (…, 81, 85, 89, 93, 97, …); use {lo} or {lo + 4}"


def _to_16(n: int) -> int:
    return max(16, round(n / 16) * 16)


def _multiple_of_16(n: int) -> Optional[str]:
    if n > 0 and n % 16 == 0:
        return None
    return f"must be a positive multiple of 16 (the VAE's 8x times the 2x2 patch); use {_to_16(n)}"


def _zero_is_auto(check):
    def checked(n: int) -> Optional[str]:
        problem = None if n == 0 else check(n)
        return problem and problem + " (or 0 = auto)"
    return checked


def _resolution(text: str) -> Optional[str]:
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return "write it as HEIGHTxWIDTH, e.g. 480x832"
    if any(map(_multiple_of_16, map(int, parts))):
        return f"each side must be a positive multiple of 16; use {'x'.join(str(_to_16(int(p))) for p in parts)}"
    return None


def _device(text: str) -> Optional[str]:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        return None
    return "not a device: use auto, cpu, cuda, cuda:N (N = the GPU's index) or mps"


def _guidance_or_auto(g: float) -> Optional[str]:
    return None if g == 0 or g >= 1 else "use 0 (auto) or at least 1 (1 = no guidance, 4.0 = the official default)"


def _texts(items: list) -> Optional[str]:
    bad = [x for x in items if not isinstance(x, str)]
    return f"every item must be a text; {bad[0]!r} is not (put it in quotes)" if bad else None


def _module_names(items: list) -> Optional[str]:
    if not items or not all(isinstance(x, str) and x.strip() for x in items):
        return "name at least one module, each a text (e.g. attn.qkv; presets: ffn, modulation)"
    return None


def _loras(items: list) -> Optional[str]:
    for i, x in enumerate(items):
        if not (isinstance(x, dict) and isinstance(x.get("path"), str) and x["path"]):
            return f"item {i} must be {{\"path\": \"file.safetensors\", \"scale\": 1.0}} with a path"
        scale = x.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            return f"item {i}: scale={scale!r} must be a finite number (1.0 = as trained)"
    return None


@dataclass
class ModelSettings:
    # Folder in the Hub layout (dit/ vae/ text_encoder/ tokenizer/ scheduler/). "" = tiny default.
    checkpoint: str = ""
    device: str = setting("auto", check=_device)  # auto | cpu | cuda | cuda:N | mps
    dit_dtype: str = setting("auto", choices=DTYPES)  # auto = bfloat16 on GPU, float32 on CPU
    text_encoder_dtype: str = setting("auto", choices=DTYPES)
    vae_dtype: str = setting("auto", choices=DTYPES)
    # auto (block-sparse where the official pipeline uses it: grids of 720p and more on CUDA; dense SDPA
    # elsewhere) | sdpa | xformers | bsa | quant8 (8-bit dense self-attention for sampling and
    # validation; training steps use SDPA)
    attention: str = setting("auto", choices=("auto", "sdpa", "xformers", "bsa", "quant8"))


@dataclass
class DatasetSettings:
    dataset_dir: str = ""  # "" = the bundled data_samples/
    trigger: str = ""  # prepended to every caption when set
    target_fps: float = setting(float(BASE_FPS), gt=0)
    num_frames: int = setting(93, check=_four_k_plus_one)
    # A clip shorter than num_frames (after resampling to target_fps): keep = train it at the longest
    # 4k+1 frame count it has (its bucket WxH@F carries the count, so batches never mix lengths; one
    # window per such clip) | drop = skip it, reported as "too short".
    short_clips: str = setting("keep", choices=("keep", "drop"))
    # keep only: a clip with fewer frames than this (4k+1; 17 = 1.1 s at 15 fps, under which a clip
    # shows little motion) is reported as "too short". Never more than num_frames.
    min_frames: int = setting(17, check=_four_k_plus_one)
    extraction: str = setting("head", choices=("head", "uniform", "slide"))
    windows: int = setting(1, ge=1)  # windows per clip for `uniform`
    stride: int = setting(0, ge=0)  # frames between window starts for `slide` (0 = num_frames)
    bucket_strategy: str = setting("aspect_ratio", choices=("aspect_ratio", "resolution_frames"))
    resolution: str = setting("480x832", check=_resolution)  # HxW target area for aspect_ratio buckets
    # bucket sizes are multiples of this (64 keeps BSA-friendly latents)
    bucket_grid: int = setting(32, check=_multiple_of_16)
    frame_interval: int = setting(4, ge=1)
    crop: str = setting("center", choices=("center", "random", "none"))
    # random crops: each window's crop is drawn from (crop_seed, clip, window, variant) when 01 scans, so
    # the cache holds it; crop_variants > 1 cuts that many different crops of every window
    crop_seed: int = setting(0, ge=0)
    crop_variants: int = setting(1, ge=1)
    # metadata.jsonl/csv paths that lead outside the dataset folder (../x.mp4, /abs/path) are refused
    # unless this is on
    allow_outside: bool = False
    max_caption_tokens: int = setting(512, ge=1, le=512)  # UMT5 reads 512 tokens; more would be cut


@dataclass
class CacheSettings:
    # umt5 (the checkpoint's) | qwen2.5-vl (SimpleTuner's; out of distribution)
    text_encoder: str = setting("umt5", choices=("umt5", "qwen2.5-vl"))
    # stored dtype of latents and text embeddings
    latent_dtype: str = setting("bfloat16", choices=("bfloat16", "float16", "float32"))
    vae_tiling: bool = False  # untiled 480x832x93 encode peaks at 4.1 GiB (bf16, H100); tiling: 1.4 GiB, 3x slower
    remove_orphans: bool = False  # delete cache files no dataset.jsonl record uses (else only reported)
    # sample = a posterior draw seeded per entry (what the official pipeline feeds the DiT) | mode = its mean
    posterior: str = setting("sample", choices=("sample", "mode"))
    qwen_path: str = ""  # qwen2.5-vl only: local folder or Hub id; "" = Qwen/Qwen2.5-VL-7B-Instruct


@dataclass
class TrainSettings:
    steps: int = setting(1000, ge=1)
    rank: int = setting(32, ge=1)
    alpha: float = setting(32.0, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    targets: list = setting(list(DEFAULT_TARGETS), check=_module_names)
    lr: float = setting(1e-4, gt=0)
    optimizer: str = setting("adamw", choices=("adamw", "adamw8bit", "prodigy"))
    lr_schedule: str = setting("constant", choices=("constant", "cosine"))
    warmup_steps: int = setting(0, ge=0)
    batch_size: int = setting(1, ge=1)
    grad_accum: int = setting(1, ge=1)
    max_grad_norm: float = setting(1.0, ge=0)  # 0 = no clipping
    timestep_sampling: str = setting("shift", choices=TIMESTEP_SAMPLING)
    # share of steps trained on the empty prompt (what CFG contrasts with)
    caption_dropout: float = setting(0.05, ge=0, le=1)
    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | int8 | int4 | fp8 (weight-only, saves memory) |
    # fp8_rowwise (float8 matmuls: faster on Hopper and newer, bf16-sized weights) | nf4
    base_precision: str = setting("auto", choices=PRECISIONS)
    gradient_checkpointing: bool = True
    # checkpointing also keeps each block's video self-attention output, so the backward does not
    # recompute attention (+0.3 GiB a block at 480x832x93): auto = when the VRAM planner says it fits
    keep_attention: str = setting("auto", choices=AUTO_ON_OFF)
    activation_offload: bool = False  # checkpointed block inputs in pinned CPU memory
    blocks_to_swap: int = setting(0, ge=0)
    # torch.compile of each whole block: auto = on CUDA with a working Triton (the first step takes
    # about 40 s longer, then each is faster), eager elsewhere | on | off
    compile: str = setting("auto", choices=AUTO_ON_OFF)
    verify_cache: bool = False  # at train start, also check every cache file's sha256 (else sizes and headers)
    seed: int = setting(42, ge=0, le=2**63 - 1)
    checkpoint_every: int = setting(100, ge=0)  # 0 = no checkpoints (nothing to resume from)
    keep_checkpoints: int = setting(3, ge=0)
    validate_every: int = setting(0, ge=0)
    validation_prompts: list = setting([], check=_texts)
    # one per prompt (or fewer): an image path makes that prompt image-to-video, "" keeps it text-to-video
    validation_images: list = setting([], check=_texts)
    # sampling steps of a validation clip (a preview; 04_sample uses 50)
    validation_steps: int = setting(20, ge=1)
    validation_height: int = setting(480, check=_multiple_of_16)
    validation_width: int = setting(832, check=_multiple_of_16)
    validation_frames: int = setting(93, check=_four_k_plus_one)
    validation_guidance: float = setting(4.0, ge=1)  # 1 = no guidance
    adapter: str = setting("lora", choices=ADAPTERS, help=(
        "adapter type, each peft's own: lora (low-rank B·A), dora (LoRA + a learnt magnitude per output row "
        "of each weight), lokr (Kronecker product of two small factors), loha (Hadamard product of two "
        "low-rank products). rank and alpha mean what peft means for each (scale alpha/rank); for LoKr and "
        "LoHa, dropout drops whole rank components. The official export layout takes plain LoRA only"))


@dataclass
class SampleSettings:
    # 04_sample's settings as last asked (recorded there; the sampler itself takes a SampleRequest). 0 in
    # height/width/num_frames/steps/guidance = auto (sample.auto_settings: from the checkpoint and
    # `distilled`), kept as 0 so a rerun re-derives them; each clip's JSON in samples/ has the values used.
    prompt: str = "A red ball bounces across a blue floor from left to right, soft shadows."
    # "" with guidance > 1 = the empty negative, as the official pipeline; "official" = the official
    # demos' negative prompt (text.OFFICIAL_NEGATIVE_PROMPT); any other text as given
    negative_prompt: str = ""
    mode: str = setting("t2v", choices=MODES)
    image: str = ""  # i2v conditioning image
    video: str = ""  # continuation input (resampled to fps)
    # continuation: last k frames (4k+1) -> 1 + (k-1)/4 latents
    num_cond_frames: int = setting(13, check=_four_k_plus_one)
    # i2v/continuation with height = width = 0: the official bucket nearest to the input's aspect
    # ratio, from this table ("" = 480p); the input is center-cropped, never stretched
    resolution: str = setting("", choices=("", "480p", "720p"))
    # 0 = auto: 480x832 for t2v, the bucket of the input for i2v/continuation
    height: int = setting(0, check=_zero_is_auto(_multiple_of_16))
    width: int = setting(0, check=_zero_is_auto(_multiple_of_16))
    num_frames: int = setting(0, check=_zero_is_auto(_four_k_plus_one))
    steps: int = setting(0, ge=0)
    guidance: float = setting(0.0, check=_guidance_or_auto)
    seed: int = setting(0, ge=0, le=2**63 - 1)
    fps: int = setting(BASE_FPS, ge=1)
    distilled: bool = False  # the checkpoint's cfg_step_lora: 16 steps, guidance 1
    use_kv_cache: bool = True  # continuation: cache the conditioning tokens' k/v
    enhance_hf: bool = True  # continuation (not distilled): 10 uniform steps below t=500
    # none | model (DiT/VAE/text encoder on the GPU only while used)
    offload: str = setting("none", choices=OFFLOAD)
    # DiT base weights: auto (model.dit_dtype) | bf16 | fp16 | fp32 | int8 | int4 | fp8 | fp8_rowwise | nf4
    precision: str = setting("auto", choices=PRECISIONS)
    # last N DiT blocks' weights in CPU memory, streamed in per block
    blocks_to_swap: int = setting(0, ge=0)
    # torch.compile of each DiT block: auto = on CUDA with a working Triton | on | off. The first clip
    # (and each LoRA change) compiles for about 15 s, then every step is faster (6.9 vs 9.4 s per CFG
    # step at 480x832x93 on an H200)
    compile: str = setting("auto", choices=AUTO_ON_OFF)
    loras: list = setting([], check=_loras)  # [{"path": ..., "scale": 1.0}]


def _train_together(s: TrainSettings) -> list[str]:
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
