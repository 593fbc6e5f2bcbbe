"""The sampler: text-to-video, image-to-video, video continuation and the 720p refinement stage,
computing what the official pipeline computes (spec §6-§7), in the same order:

* prompts cleaned and UMT5-encoded to 512 tokens; with guidance > 1 a negative prompt (the empty
  one when none is given) goes first in the CFG batch [negative, positive];
* noise from a seeded CPU generator (identical on every device), then the conditioning frames
  encoded with the same generator (a posterior sample), normalized and written into the first
  latent frames, which keep timestep 0 and are never stepped;
* the checkpoint's FlowMatchEuler scheduler (shift 12) on an explicit sigma list (normal, the
  16-step distilled list, ``enhance_hf``, refinement), CFG-Zero* guidance per sample, and the DiT
  output (x0 − ε) negated before each Euler step;
* continuation through a prompt-independent KV cache of the conditioning tokens by default.

``generate`` takes loaded components and changes nothing on them beyond the call: LoRAs it is given
(and the checkpoint's ``cfg_step_lora`` for ``distilled``) are applied for the call and removed
after, so the training loop can pass its in-memory DiT with a LoRA already injected.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .config import BASE_FPS, MODES, OFFLOAD
from .flow import NUM_TRAIN_TIMESTEPS, SHIFT, base_sigmas, shift_sigmas
from .io import atomic_write, atomic_write_json
from .resolution import RESOLUTIONS, nearest_bucket, refine_bucket
from .text import encode_prompts, named_encoder, required_encoder, resolve_negative_prompt
from .vae import check_num_frames, check_size, decode_latents, encode_video, set_tiling, to_uint8_frames

SCHEDULES = ("normal", "distilled", "enhance_hf", "refine")
DISTILL_LORA = "cfg_step_lora"
REFINE_LORA = "refinement_lora"
DEFAULT_STEPS, DISTILLED_STEPS = 50, 16
DEFAULT_GUIDANCE = 4.0
T2V_SIZE = (480, 832)  # the official text-to-video size


class SampleError(ValueError):
    """Sampling settings that cannot work, with the fix."""


# ---------------------------------------------------------------------------------------------
# schedules: the sampler's named lists, from flow.py's σ lists (numbers checked against spec §7.3)
# ---------------------------------------------------------------------------------------------
def _derived_timesteps(normal: torch.Tensor, schedule: str, t_thresh: float) -> torch.Tensor:
    """enhance_hf / refine lists from the normal schedule's timesteps (as the pipeline derives them)."""
    if schedule == "enhance_hf":
        # keep the high-noise part, then 10 uniform steps 500, 450, ..., 50
        tail = torch.from_numpy(np.linspace(500, 0, 10, endpoint=False, dtype=np.float32)).to(normal.device)
        return torch.cat([normal[normal > 500], tail])
    if schedule == "refine":
        if not t_thresh:
            return normal
        start = torch.tensor([t_thresh * NUM_TRAIN_TIMESTEPS], dtype=normal.dtype, device=normal.device)
        return torch.cat([start, normal[normal < start]])
    raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")


def timesteps_for(steps: int, schedule: str = "normal", t_thresh: float = 0.5, shift: float = SHIFT) -> list[float]:
    """Model timesteps (1000·σ, σ after the shift) of a schedule; the Euler steps end at σ = 0.

    normal: shift(linspace(1, 0.001, N)) (50 steps: 1000.0, 998.27, ..., 207.77, 11.87);
    distilled: the 16-step list (1000.0 ... 510.6); enhance_hf: the normal timesteps > 500 then
    500, 450, ..., 50 (56 steps for N = 50); refine: 1000·t_thresh then the normal timesteps below it
    (t_thresh 0.5, N = 50: 500, 443.02, 343.47, 207.77, 11.87)."""
    if schedule not in SCHEDULES:
        raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if schedule == "distilled":
        return (shift_sigmas(base_sigmas(steps, True), shift) * NUM_TRAIN_TIMESTEPS).tolist()
    normal = shift_sigmas(base_sigmas(steps), shift) * NUM_TRAIN_TIMESTEPS
    if schedule == "normal":
        return normal.tolist()
    return _derived_timesteps(normal, schedule, t_thresh).tolist()


def set_scheduler(scheduler, steps: int, schedule: str = "normal", device=None, t_thresh: float = 0.5) -> list[float]:
    """Configure the checkpoint's FlowMatchEulerDiscreteScheduler for a schedule; returns its timesteps.

    normal/distilled go through ``set_timesteps(sigmas=...)`` (the scheduler applies its shift).
    enhance_hf/refine are explicit timesteps with σ = t/1000 and no further shift: the scheduler has
    no argument for that, so, like the official pipeline, its ``timesteps``/``sigmas`` are replaced
    right after ``set_timesteps`` reset its step index."""
    if schedule not in SCHEDULES:
        raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise SampleError("the checkpoint's scheduler uses dynamic shifting; LongCat-Video samples with a static "
                          f"shift of {SHIFT:g} (scheduler_config.json: use_dynamic_shifting=false, shift={SHIFT})")
    distilled = schedule == "distilled"
    scheduler.set_timesteps(steps, sigmas=base_sigmas(steps, distilled).tolist(), device=device)
    if schedule in ("enhance_hf", "refine"):
        ts = _derived_timesteps(scheduler.timesteps, schedule, t_thresh)
        scheduler.timesteps = ts
        scheduler.sigmas = torch.cat([ts / NUM_TRAIN_TIMESTEPS, ts.new_zeros(1)])
    return scheduler.timesteps.tolist()


# ---------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------
def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* 'optimized scale' per sample: s* = ⟨c, u⟩ / (‖u‖² + 1e-8) over all C·T·H·W
    elements, v = s*·u + g·(c − s*·u). s* is broadcast per sample ([B, 1, 1, 1, 1]; the official
    4-D view is right only for batch 1). Float32 out."""
    B = cond.shape[0]
    c, u = cond.float(), uncond.float()
    cf, uf = c.reshape(B, -1), u.reshape(B, -1)
    s = (cf * uf).sum(1, keepdim=True) / (uf.square().sum(1, keepdim=True) + 1e-8)
    s = s.view(B, *([1] * (cond.dim() - 1)))
    return u * s + scale * (c - u * s)


# ---------------------------------------------------------------------------------------------
# request / result
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleRequest:
    prompt: str
    # None or "" with guidance > 1: the empty negative prompt (the pipeline's default); "official":
    # the official demos' one (text.OFFICIAL_NEGATIVE_PROMPT); anything else as given
    negative_prompt: Optional[str] = None
    mode: str = "t2v"  # t2v | i2v | continuation
    image: Any = None  # i2v: path, uint8 [H, W, 3] array or PIL image
    video: Any = None  # continuation: path (resampled to fps) or uint8 [F, H, W, 3] frames
    num_cond_frames: int = 13  # continuation: the last k (4k+1) frames -> 1 + (k − 1)/4 latents
    # None: T2V 480x832; I2V/continuation the official bucket of the image/first frame at
    # ``resolution`` (480p when ""). Both given: that size. The input is center-cropped to the
    # size's aspect ratio and resized, never stretched.
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: int = 93
    steps: Optional[int] = None  # None: 50, or 16 when distilled
    guidance: Optional[float] = None  # None: 4.0, or 1.0 when distilled; 1 = no guidance
    seed: int = 0
    fps: float = BASE_FPS  # of the output file; continuation inputs from a file are resampled to it
    use_kv_cache: bool = True  # continuation: cache the conditioning tokens' k/v (official default)
    enhance_hf: Optional[bool] = None  # None: on for continuation unless distilled (official default)
    distilled: bool = False  # the checkpoint's cfg_step_lora, 16-step list, no guidance
    resolution: str = ""  # i2v/continuation without height/width: "" or 480p | 720p = the bucket's table
    size_multiple: int = 16  # 16 (official check), 32 or 64 (the 64-px grid that suits BSA)

    def resolved(self) -> "SampleRequest":
        """A copy with the mode-dependent defaults filled in."""
        return replace(
            self,
            negative_prompt=resolve_negative_prompt(self.negative_prompt) or None,
            steps=self.steps if self.steps is not None else (DISTILLED_STEPS if self.distilled else DEFAULT_STEPS),
            guidance=self.guidance if self.guidance is not None else (1.0 if self.distilled else DEFAULT_GUIDANCE),
            enhance_hf=(self.mode == "continuation" and not self.distilled) if self.enhance_hf is None
            else self.enhance_hf,
        )

    def validate(self) -> "SampleRequest":
        """Raise SampleError naming the value and the fix; returns self."""
        if not isinstance(self.prompt, str):
            raise SampleError(f"prompt={self.prompt!r}: must be text")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise SampleError(f"negative_prompt={self.negative_prompt!r}: must be text (or None for the empty one)")
        if self.mode not in MODES:
            raise SampleError(f"mode={self.mode!r}: choose one of {MODES}")
        if self.resolution not in ("",) + RESOLUTIONS:
            raise SampleError(f"resolution={self.resolution!r}: use '' (height/width as given), '480p' or '720p'")
        if self.size_multiple not in (16, 32, 64):
            raise SampleError(f"size_multiple={self.size_multiple!r}: use 16 (official), 32 or 64")
        for name in ("height", "width", "num_frames", "num_cond_frames", "steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise SampleError(f"{name}={v!r}: must be a whole number")
        if (self.height is None) != (self.width is None):
            raise SampleError(f"height={self.height!r}, width={self.width!r}: give both (a size) or neither "
                              "(480x832 for t2v, the official bucket of the image/video for i2v/continuation)")
        if self.height is not None and self.resolution and self.mode != "t2v":
            raise SampleError(f"resolution={self.resolution!r} with height={self.height}, width={self.width}: the "
                              "bucket picks the size from the input; give either resolution or height/width")
        try:
            if self.height is not None:
                check_size(self.height, self.width, self.size_multiple, "sample size")
            check_num_frames(self.num_frames, "num_frames")
        except ValueError as e:
            raise SampleError(str(e)) from None
        if self.steps is not None and self.steps < 1:
            raise SampleError(f"steps={self.steps}: use at least 1 (50 is the official default, 16 distilled)")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float))
                                          or not math.isfinite(self.guidance) or self.guidance < 1):
            raise SampleError(f"guidance={self.guidance!r}: use 1 (no guidance) or more (4.0 is the official default)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
            raise SampleError(f"seed={self.seed!r}: must be a whole number from 0 to 2**63 − 1 (e.g. seed=0)")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise SampleError(f"fps={self.fps!r}: must be a positive number (15 for the base model)")
        if self.distilled and self.enhance_hf:
            raise SampleError("distilled=True with enhance_hf=True: the distilled 16-step list cannot take the "
                              "enhance_hf tail; set enhance_hf=False (or None)")
        if self.mode == "i2v" and _missing(self.image):
            raise SampleError("mode='i2v' needs an image: image='path/to.png' (or an uint8 [H, W, 3] array)")
        if self.mode == "continuation":
            if _missing(self.video):
                raise SampleError("mode='continuation' needs a video to continue: video='path/to.mp4' (or frames)")
            try:
                check_num_frames(self.num_cond_frames, "num_cond_frames")
            except ValueError as e:
                raise SampleError(str(e)) from None
            if self.num_cond_frames >= self.num_frames:
                raise SampleError(f"num_cond_frames={self.num_cond_frames} must be below num_frames={self.num_frames} "
                                  "(official: 13 of 93)")
        return self


def _missing(x) -> bool:
    return x is None or (isinstance(x, str) and not x.strip())


@dataclass
class SampleResult:
    video: np.ndarray  # uint8 [F, H, W, 3]
    latents: torch.Tensor  # normalized latents [1, 16, T, h, w] on the CPU (conditioning frames included)
    settings: dict = field(default_factory=dict)  # what made it (JSON-ready)
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        return self.settings.get("fps", BASE_FPS)


def checkpoint_offers(components) -> dict:
    """Optional modes the checkpoint's lora/ folder enables."""
    loras = getattr(components, "loras", None) or {}
    return {"distilled": DISTILL_LORA in loras, "refinement": REFINE_LORA in loras}


# ---------------------------------------------------------------------------------------------
# inputs: conditioning frames
# ---------------------------------------------------------------------------------------------
def load_image_frames(image) -> np.ndarray:
    """A path, PIL image or uint8 array -> uint8 [1, H, W, 3]."""
    if isinstance(image, (str, Path)):
        from .data.video import load_image

        path = Path(image)
        if not path.exists():
            raise SampleError(f"image {path} does not exist")
        return load_image(path)[None]
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))[None]
    return _as_uint8_frames(image, "image")


def load_video_frames(video, fps: Optional[float] = BASE_FPS, last: Optional[int] = None) -> np.ndarray:
    """A path (resampled to ``fps`` by taking every round(src_fps/fps)-th frame, as the official
    continuation demo does) or frames -> uint8 [F, H, W, 3]; ``last`` keeps the last frames only."""
    if isinstance(video, (str, Path)):
        from .data.video import IMAGE_EXTS, decode_frames, probe

        path = Path(video)
        if not path.exists():
            raise SampleError(f"video {path} does not exist")
        if path.suffix.lower() in IMAGE_EXTS:
            return load_image_frames(path)
        info = probe(path)
        stride = max(1, round(info.fps / fps)) if fps and info.fps else 1
        idx = list(range(0, info.frame_count, stride))
        if last:
            idx = idx[-last:]
        return decode_frames(path, idx)
    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "convert"):
        frames = np.stack([np.asarray(im.convert("RGB")) for im in video])
    else:
        frames = _as_uint8_frames(video, "video")
    return frames[-last:] if last else frames


def _as_uint8_frames(x, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise SampleError(f"{what}: expected uint8 frames [F, H, W, 3] (or [H, W, 3]), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def image_from_upload(value) -> Optional[np.ndarray]:
    """ipywidgets FileUpload value (v8 tuple of dicts, v7 dict) -> uint8 [H, W, 3], or None."""
    if not value:
        return None
    item = value[0] if isinstance(value, (list, tuple)) else next(iter(value.values()))
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(bytes(item["content"]))) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def sample_size(request: SampleRequest, frame_hw=None) -> tuple[int, int]:
    """(height, width) a request samples at: its own when given; else for I2V/continuation the
    official bucket nearest to the conditioning frame's aspect ratio (``frame_hw``) at
    ``request.resolution`` (480p when ""), from the table for its ``size_multiple``; else 480x832."""
    if request.height is not None and request.width is not None:
        return int(request.height), int(request.width)
    if frame_hw is not None and request.mode != "t2v":
        h, w = (int(v) for v in tuple(frame_hw)[:2])
        return nearest_bucket(h, w, request.resolution or "480p", request.size_multiple)
    return T2V_SIZE


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] cut to the largest centered region with the aspect ratio height:width
    (what the training data path does before resizing), so a resize never stretches the input."""
    from .data.video import crop_box

    top, left, ch, cw = crop_box(frames.shape[1], frames.shape[2], height, width, "center")
    return frames[:, top:top + ch, left:left + cw]


def preprocess_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [1, 3, F, height, width] in [−1, 1]: center-cropped to the target's
    aspect ratio, then diffusers' VideoProcessor as the pipeline uses it (Lanczos resize, normalize).
    The official pipeline resizes without the crop; at its bucket sizes the crop is a few pixels."""
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    frames = center_crop(frames, height, width)
    vp = VideoProcessor(vae_scale_factor=8)
    return vp.preprocess_video([Image.fromarray(np.ascontiguousarray(f)) for f in frames], height=height, width=width)


# ---------------------------------------------------------------------------------------------
# devices and memory
# ---------------------------------------------------------------------------------------------
def _param_device(module) -> torch.device:
    return next(module.parameters()).device


def dit_dtype(dit) -> torch.dtype:
    """Compute dtype of the DiT (its patch embedding is never quantized or LoRA-wrapped)."""
    return dit.x_embedder.proj.weight.dtype


def _exec_device(dit, offload: str, device) -> torch.device:
    if offload not in OFFLOAD:
        raise SampleError(f"offload={offload!r}: use 'none' (models stay where they are) or 'model' "
                          "(each model on the GPU only while it runs)")
    home = _param_device(dit)
    if offload == "none":
        d = torch.device(device) if device is not None else home
        if d.type != home.type or (d.index is not None and d.index != home.index):
            raise SampleError(f"device={device!r} but the DiT is on {home}: move it there first, "
                              "or use offload='model'")
        return home
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else home


@contextlib.contextmanager
def placed(module, device: torch.device, enabled: bool = True):
    """Move ``module`` to ``device`` for the block and back to where it was (offload='model').
    A block-swapped DiT moves only its resident part: the swapped blocks' weights stay in CPU
    memory and stream in block by block, as without the offload."""
    if not enabled or module is None or _param_device(module) == device:
        yield module
        return
    from .memory import block_swap_of

    swap = block_swap_of(module)
    move = swap.move_resident if swap is not None else module.to
    home = _param_device(module)
    move(device)
    try:
        yield module
    finally:
        move(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def vae_tiling(vae, enabled: Optional[bool]):
    """Tiled VAE decode/encode for the block (None leaves the VAE as it is)."""
    if enabled is None:
        yield
        return
    before = bool(getattr(vae, "use_tiling", False))
    set_tiling(vae, enabled)
    try:
        yield
    finally:
        set_tiling(vae, before)


@contextlib.contextmanager
def temporary_loras(dit, loras: Sequence[tuple]):
    """Apply LoRA files [(path, scale)] for the block (lora.apply_loras: any layout, scale 0 ==
    base), then remove them; adapters that were active before (a LoRA being trained) stay active
    alongside and keep their requires_grad flags."""
    loras = [(str(p), float(s)) for p, s in loras]
    if not loras:
        yield []
        return
    from . import lora as lora_lib
    from .memory import block_swap_of

    grad = {n: p.requires_grad for n, p in dit.named_parameters()}
    before = _active_adapters(dit)
    swap = block_swap_of(dit)
    with warnings.catch_warnings():  # a second adapter on the same model is what we mean to do
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        names = lora_lib.apply_loras(dit, loras)
    if before:
        _activate(dit, before + names)
    try:
        if swap is not None:  # the new LoRA weights of swapped blocks stream in with their block
            swap.sync()
        yield names
    finally:
        lora_lib.remove_loras(dit, names)
        if swap is not None:
            swap.sync()
        if before:
            _activate(dit, before)
        for n, p in dit.named_parameters():
            if n in grad:
                p.requires_grad_(grad[n])


def _tuner_layers(model):
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _active_adapters(model) -> list:
    for m in _tuner_layers(model):
        return [a for a in m.active_adapters]
    return []


def _activate(model, names: list) -> None:
    from .lora import activate_adapters

    activate_adapters(model, names)  # each adapter keeps its scale


def _memory(components) -> dict:
    """How the DiT was loaded (precision, blocks_to_swap), for the settings record."""
    from .memory import block_swap_of

    mem = dict(getattr(components, "memory", None) or {})
    swap = block_swap_of(components.dit) if components.dit is not None else None
    mem.setdefault("blocks_to_swap", len(swap.swapped) if swap is not None else 0)
    return mem


def _progress(progress, total: int, desc: str):
    if not progress:
        return None
    if progress is True:
        from .ui.widgets import progress as bar

        return bar(total=total, desc=desc)
    return progress(total=total, desc=desc)


def _oom_error(e: Exception, device, height: int, width: int, num_frames: int, guided: bool,
               memory: Optional[dict] = None) -> SampleError:
    from .planner import sampling_plan_settings, suggest

    memory = memory or {}
    budget = torch.cuda.get_device_properties(device).total_memory / 2**30 - 1
    sug = suggest(sampling_plan_settings(height, width, num_frames, guided=guided,
                                         precision=memory.get("precision", "bf16"),
                                         blocks_to_swap=memory.get("blocks_to_swap", 0)), budget)
    fix = (f"load the DiT with {sug[0]} (04_sample: blocks_to_swap; load_sampling_components), and/or "
           "precision='int8', and sample with offload='model'" if sug
           else "use offload='model', precision='int8', or lower the resolution or the frame count")
    return SampleError(f"out of GPU memory while sampling {height}x{width}x{num_frames}: {fix}")


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def encode_text(components, prompt: str, negative_prompt: Optional[str], guided: bool, device, dtype,
                offload: str = "none", text_encoder_to_cpu: bool = True,
                encoder: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, 1, 512, C], mask [B, 512]) for [negative, positive] (guided) or [positive].
    The text encoder runs where it is (offload='model': on ``device`` for the call) and is moved to
    the CPU afterwards when ``text_encoder_to_cpu`` (it is not needed while denoising). ``encoder``
    (text.required_encoder of the LoRAs): the cache's other encoder, loaded for this call and freed."""
    prompts = ([negative_prompt or ""] if guided else []) + [prompt]
    device = torch.device(device)
    if encoder is not None:  # a LoRA trained on Qwen2.5-VL embeddings: UMT5 ones would be out of distribution
        from .checkpoint import pick_dtype

        emb, mask = named_encoder(encoder, device, pick_dtype("auto", device))(prompts)
        return emb.to(device=device, dtype=dtype), mask.to(device)
    tok, enc = components.tokenizer, components.text_encoder
    if tok is None or enc is None:
        raise SampleError("no text encoder loaded: load_components(...) with the 'tokenizer' and 'text_encoder' "
                          "parts, or pass text=(embeddings, mask) for [negative, positive]")
    with placed(enc, device, offload == "model"):
        emb, mask = encode_prompts(tok, enc, prompts, device=device, dtype=dtype)
    if text_encoder_to_cpu and offload != "model" and _param_device(enc).type != "cpu":
        enc.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return emb, mask


def _text_batch(text, guided: bool, device, dtype):
    emb, mask = text
    emb, mask = emb.to(device=device, dtype=dtype), mask.to(device)
    if emb.dim() == 3:
        emb = emb[:, None]
    if guided and emb.shape[0] < 2:
        raise SampleError("guidance > 1 needs text=(embeddings, mask) for [negative, positive] (2 rows); "
                          "encode the empty prompt as the negative")
    return (emb[-2:], mask[-2:]) if guided else (emb[-1:], mask[-1:])


# ---------------------------------------------------------------------------------------------
# the denoising loop
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def build_kv_cache(dit, cond_latents: torch.Tensor, text_like: torch.Tensor, offload_kv_cache: bool = False) -> dict:
    """Per-block (k, v) of the conditioning tokens (t = 0, self-attention only, no text): prompt
    independent, shared by both CFG rows (spec §4)."""
    dtype = dit_dtype(dit)
    n = cond_latents.shape[2]
    t = torch.zeros(cond_latents.shape[0], n, device=cond_latents.device, dtype=dtype)
    _, cache = dit(cond_latents.to(dtype), t, torch.zeros_like(text_like[:1]), None, return_kv=True,
                   skip_crs_attn=True, offload_kv_cache=offload_kv_cache)
    return cache


@torch.no_grad()
def predict_velocity(dit, latents: torch.Tensor, t: float, emb: torch.Tensor, mask: torch.Tensor,
                     guidance: float, num_cond_latents: int = 0, kv_cache: Optional[dict] = None) -> torch.Tensor:
    """One guided DiT evaluation: the velocity (x0 − ε, float32) for the noisy frames of ``latents``
    [1, C, T, h, w]. The CFG batch is [negative, positive] when guidance > 1."""
    dtype = dit_dtype(dit)
    n = num_cond_latents
    B = emb.shape[0]
    if kv_cache is not None:
        x = latents[:, :, n:].to(dtype)
        ts = torch.full((B,), float(t), device=latents.device, dtype=dtype)
        out = dit(torch.cat([x] * B), ts, emb, mask, num_cond_latents=n, kv_cache_dict=kv_cache)
    else:
        x = latents.to(dtype)
        ts = torch.full((B, latents.shape[2]), float(t), device=latents.device, dtype=dtype)
        ts[:, :n] = 0  # conditioning frames are clean
        out = dit(torch.cat([x] * B), ts, emb, mask, num_cond_latents=n)
    # CFG over every output element, conditioning frames included (as the pipeline sums them)
    v = cfg_zero_star(out[1:], out[:1], guidance) if guidance > 1 else out.float()
    return v if kv_cache is not None else v[:, :, n:]


@torch.no_grad()
def denoise(dit, scheduler, latents: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor, steps: int,
            schedule: str = "normal", guidance: float = 1.0, num_cond_latents: int = 0, use_kv_cache: bool = False,
            offload_kv_cache: bool = False, t_thresh: float = 0.5, progress=None,
            callback: Optional[Callable[[int, float, torch.Tensor], None]] = None) -> tuple[torch.Tensor, list]:
    """Run the Euler loop on ``latents`` [1, C, T, h, w] (fp32; the first ``num_cond_latents`` frames
    are clean conditioning and are never changed). Returns (latents, timesteps).
    ``callback(i, t, latents)`` sees all frames after every step."""
    n = num_cond_latents
    timesteps = set_scheduler(scheduler, steps, schedule, latents.device, t_thresh)
    kv_cache = build_kv_cache(dit, latents[:, :, :n], emb, offload_kv_cache) if (use_kv_cache and n) else None
    bar = _progress(progress, len(timesteps), "refining" if schedule == "refine" else "denoising")
    try:
        for i, t in enumerate(scheduler.timesteps):
            v = predict_velocity(dit, latents, t, emb, mask, guidance, n, kv_cache)
            # the DiT predicts x0 − ε; the scheduler's Euler step wants dx/dσ = ε − x0
            noisy = scheduler.step(-v, t, latents[:, :, n:], return_dict=False)[0]
            latents = torch.cat([latents[:, :, :n], noisy], dim=2) if n else noisy
            if callback is not None:
                callback(i, float(t), latents)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return latents, timesteps


def _schedule_name(req: SampleRequest) -> str:
    if req.distilled:
        return "distilled"
    return "enhance_hf" if req.enhance_hf else "normal"


def _describe(x) -> Optional[str]:
    if x is None or isinstance(x, (str, Path)):
        return str(x) if x is not None and str(x) else None
    shape = getattr(x, "shape", None) or getattr(x, "size", None)
    return f"<{type(x).__name__} {tuple(shape) if shape is not None else ''}>"


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(components, request: SampleRequest, loras: Optional[Sequence[tuple]] = None, progress=True,
             callback: Optional[Callable[[int, float, torch.Tensor], None]] = None, *,
             text: Optional[tuple] = None, offload: str = "none", device=None, text_encoder_to_cpu: bool = True,
             vae_tiling_enabled: Optional[bool] = None, offload_kv_cache: bool = False) -> SampleResult:
    """Sample one video (T2V, I2V or continuation) with loaded ``components`` (dit, vae, scheduler,
    and tokenizer + text_encoder unless ``text`` gives precomputed (embeddings, mask) rows
    [negative, positive]).

    loras: [(path, scale), ...] applied for this call only (any layout; scale 0 == base).
    progress: True = a tqdm bar (text when headless), False = none, or a tqdm-like factory.
    callback(i, t, latents): after every step, with all latent frames (conditioning included).
    offload: 'none' (models stay where they are) or 'model' (text encoder, DiT and VAE each moved
    to ``device`` only while they run). vae_tiling_enabled: tiled VAE for this call (None = as is).
    """
    req = request.resolved().validate()
    t0 = time.time()
    dit, vae = components.dit, components.vae
    if dit is None or vae is None or components.scheduler is None:
        raise SampleError("generate needs components with dit, vae and scheduler loaded (checkpoint.load_components)")
    dev = _exec_device(dit, offload, device)
    dtype = dit_dtype(dit)
    guided = req.guidance > 1
    lora_list = list(loras or [])
    if req.distilled:
        if DISTILL_LORA not in (components.loras or {}):
            where = Path(components.folder) / "lora" / f"{DISTILL_LORA}.safetensors"
            raise SampleError(f"distilled=True needs {where} (download lora/ from meituan-longcat/LongCat-Video), "
                              "or set distilled=False")
        lora_list = [(components.loras[DISTILL_LORA], 1.0)] + lora_list

    # the conditioning frames decide the size unless height/width are given (sample_size)
    cond_frames = None
    if req.mode == "i2v":
        cond_frames = load_image_frames(req.image)
    elif req.mode == "continuation":
        cond_frames = load_video_frames(req.video, req.fps, last=req.num_cond_frames)
        if len(cond_frames) < req.num_cond_frames:
            raise SampleError(f"the video has {len(cond_frames)} frames at {req.fps} fps; continuation needs "
                              f"num_cond_frames={req.num_cond_frames}: lower it (4k+1) or give a longer video")
        cond_frames = cond_frames[-req.num_cond_frames:]
    req.height, req.width = sample_size(req, None if cond_frames is None else cond_frames.shape[1:3])
    try:
        check_size(req.height, req.width, req.size_multiple, "sample size")
    except ValueError as e:
        raise SampleError(str(e)) from None

    # text first, so the encoder can leave the GPU before the DiT needs it
    if text is not None:
        emb, mask = _text_batch(text, guided, dev, dtype)
    else:
        emb, mask = encode_text(components, req.prompt, req.negative_prompt, guided, dev, dtype, offload,
                                text_encoder_to_cpu, required_encoder(p for p, _ in lora_list))

    # noise from a CPU generator, then the conditioning frames with the same generator (official order)
    g = torch.Generator().manual_seed(int(req.seed))
    C = dit.config.in_channels
    T = 1 + (req.num_frames - 1) // 4
    latents = torch.randn((1, C, T, req.height // 8, req.width // 8), generator=g, dtype=torch.float32)
    n_cond = 0
    if cond_frames is not None:
        pixels = preprocess_frames(cond_frames, req.height, req.width)
        with placed(vae, dev, offload == "model"):
            z = encode_video(vae, pixels, generator=g)
        n_cond = z.shape[2]
        latents[:, :, :n_cond] = z.float().cpu()
    latents = latents.to(dev)

    schedule = _schedule_name(req)
    try:
        with temporary_loras(dit, lora_list), placed(dit, dev, offload == "model"):
            latents, timesteps = denoise(
                dit, components.scheduler, latents, emb, mask, req.steps, schedule, req.guidance, n_cond,
                use_kv_cache=req.mode == "continuation" and req.use_kv_cache, offload_kv_cache=offload_kv_cache,
                progress=progress, callback=callback)
    except torch.cuda.OutOfMemoryError as e:
        raise _oom_error(e, dev, req.height, req.width, req.num_frames, guided, _memory(components)) from e

    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        frames = to_uint8_frames(decode_latents(vae, latents))[0]
    settings = {k: v for k, v in asdict(req).items() if k not in ("image", "video")}
    settings.update(
        image=_describe(req.image), video=_describe(req.video), schedule=schedule,
        num_cond_latents=n_cond, loras=[[str(p), float(s)] for p, s in lora_list],
        timesteps=[round(float(x), 3) for x in timesteps], checkpoint=str(getattr(components, "folder", "")),
        device=str(dev), dtype=str(dtype).replace("torch.", ""), **_memory(components),
    )
    return SampleResult(video=frames, latents=latents.cpu(), settings=settings, seconds=time.time() - t0)


def compare_base_and_lora(components, request: SampleRequest, lora=None, scale: float = 1.0,
                          progress=True, **kwargs) -> dict:
    """{'base': result, 'lora': result} with the same seed and settings (text encoded once, and once
    more with the LoRA's own text encoder when its cache was not UMT5); only 'base' when ``lora`` is
    None. ``kwargs`` go to ``generate`` (offload, device, ...)."""
    req = request.resolved().validate()
    given = kwargs.pop("text", None)
    dev = _exec_device(components.dit, kwargs.get("offload", "none"), kwargs.get("device"))

    def encoded(encoder=None):
        return encode_text(components, req.prompt, req.negative_prompt, req.guidance > 1, dev,
                           dit_dtype(components.dit), kwargs.get("offload", "none"),
                           kwargs.get("text_encoder_to_cpu", True), encoder)

    text = given if given is not None else encoded()
    out = {"base": generate(components, req, None, progress, text=text, **kwargs)}
    if lora:
        encoder = required_encoder([lora])
        lora_text = text if given is not None or encoder is None else encoded(encoder)
        out["lora"] = generate(components, req, [(lora, scale)], progress, text=lora_text, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_video(path, frames: np.ndarray, fps: float) -> Path:
    """H.264 mp4 through PyAV (its own FFmpeg: no binary needed), written to a temporary name and
    renamed (io.atomic_write: the file gets the umask's permissions, not mkstemp's 0600)."""
    from .data.video import write_mp4

    frames = np.asarray(frames, dtype=np.uint8)
    return write_mp4(path, frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2], fps)


def _free_name(folder: Path, name: str) -> str:
    """``name``, or name-2, name-3, ... : the first whose .mp4 and .json are both unused."""
    taken = lambda n: (folder / f"{n}.mp4").exists() or (folder / f"{n}.json").exists()  # noqa: E731
    if not taken(name):
        return name
    i = 2
    while taken(f"{name}-{i}"):
        i += 1
    return f"{name}-{i}"


def save_sample(result: SampleResult, run_dir, name: str, fps: Optional[float] = None) -> Path:
    """run_dir/samples/<name>.mp4 plus <name>.json with the settings that made it (both atomic).
    Never overwrites: when <name> is taken, <name>-2 (-3, ...) is used for both files."""
    folder = (Path(run_dir) / "samples" / name).parent
    out = folder / f"{_free_name(folder, Path(name).name)}.mp4"
    fps = fps or result.fps
    write_video(out, result.video, fps)
    meta = {**result.settings, "fps": fps, "seconds": round(result.seconds, 2), "file": out.name,
            "frames": int(result.video.shape[0]), "size": [int(result.video.shape[1]), int(result.video.shape[2])]}
    atomic_write_json(out.with_suffix(".json"), meta)
    return out


def prompt_words(prompt: str, words: int = 4, max_chars: int = 32) -> str:
    """The first few words of a prompt as a file-name part: 'a-red-ball-bounces' (ASCII only)."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", prompt or "").encode("ascii", "ignore").decode().lower()
    return "-".join(re.findall(r"[a-z0-9]+", text)[:words])[:max_chars].strip("-")


def sample_stem(run_dir, request: SampleRequest) -> str:
    """'<NNN>_<mode>_seed<seed>_<first words of the prompt>' for the next group of samples (base,
    LoRA, their 720p refinements) in run_dir/samples/: NNN is one more than the highest number
    there, so the files list in the order they were made and no sample overwrites another."""
    import re

    folder = Path(run_dir) / "samples"
    used = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else [])
            if (m := re.match(r"^(\d+)_", p.name))]
    words = prompt_words(request.prompt)
    return f"{max(used, default=0) + 1:03d}_{request.mode}_seed{request.seed}" + (f"_{words}" if words else "")


# ---------------------------------------------------------------------------------------------
# notebook helpers
# ---------------------------------------------------------------------------------------------
TINY_DEFAULTS = dict(height=64, width=64, num_frames=9, steps=8)
OFFICIAL_DEFAULTS = dict(height=T2V_SIZE[0], width=T2V_SIZE[1], num_frames=93, steps=DEFAULT_STEPS)


def auto_settings(values: dict, checkpoint: str = "") -> dict:
    """Fill the 0 ('auto') entries of num_frames/steps/guidance: the official 93 frames, 50 steps (16
    distilled), guidance 4 (1 distilled) for a real checkpoint; 9 frames, 8 steps for the tiny
    default checkpoint (checkpoint == ''), so a CPU run takes seconds.

    height = width = 0 stay 0 for a real checkpoint: the sampler then takes 480x832 for T2V and,
    for I2V/continuation, the official bucket nearest to the input's aspect ratio (sample_size),
    also when an uploaded image turns a T2V request into I2V. The tiny checkpoint gets 64x64
    unless I2V/continuation asks for a ``bucket``."""
    out = dict(values)
    base = TINY_DEFAULTS if not checkpoint else OFFICIAL_DEFAULTS
    distilled = bool(out.get("distilled"))
    if not checkpoint and not (out.get("mode", "t2v") != "t2v" and out.get("bucket")):
        for k in ("height", "width"):
            if not out.get(k):
                out[k] = base[k]
    if not out.get("num_frames"):
        out["num_frames"] = base["num_frames"]
    if not out.get("steps"):
        out["steps"] = DISTILLED_STEPS if distilled else base["steps"]
    if not out.get("guidance"):
        out["guidance"] = 1.0 if distilled else DEFAULT_GUIDANCE
    return out


AUTO_KEYS = ("height", "width", "num_frames", "steps", "guidance")


def keep_auto(record: dict, asked: dict, shown: dict, used: dict) -> dict:
    """The ``sample`` section to save (config.SampleSettings) from ``settings_record``: a value asked as
    0 (auto), filled in by auto_settings (``shown``) and left as shown in the form (``used``), is saved
    as 0, so the next run derives it again from its checkpoint and ``distilled`` instead of reusing
    this run's number. Each clip's JSON in samples/ keeps the value actually used."""
    out = dict(record)
    for k in AUTO_KEYS:
        if k in out and not asked.get(k) and used.get(k) == shown.get(k):
            out[k] = type(out[k])(0)
    return out


def pick_lora(run_dir, lora_path: str = "") -> Optional[Path]:
    """'' = the newest LoRA trained in run_dir/lora/ (None if there is none); 'none' = no LoRA."""
    from .lora import newest_lora

    if not lora_path:
        return newest_lora(run_dir)
    if str(lora_path).lower() == "none":
        return None
    p = Path(lora_path)
    if not p.exists():
        raise SampleError(f"lora_path={lora_path!r} does not exist; give a .safetensors file, '' for the newest "
                          f"in {Path(run_dir) / 'lora'}, or 'none'")
    return p


def request_from_values(values: dict, uploaded_image=None) -> SampleRequest:
    """A SampleRequest from the 04_sample form (``bucket`` is the request's ``resolution``, height =
    width = 0 is 'by the input'); an uploaded image is used for i2v (and switches t2v to i2v)."""
    v = dict(values)
    image = uploaded_image if uploaded_image is not None else (v.get("image") or None)
    mode = v.get("mode", "t2v")
    if uploaded_image is not None and mode == "t2v":
        mode = "i2v"
    size = [int(v.get(k) or 0) or None for k in ("height", "width")]
    return SampleRequest(
        prompt=v["prompt"], negative_prompt=v.get("negative_prompt") or None, mode=mode, image=image,
        video=v.get("video") or None, num_cond_frames=int(v.get("num_cond_frames", 13)),
        height=size[0], width=size[1], num_frames=int(v["num_frames"]), steps=int(v["steps"]),
        guidance=float(v["guidance"]), seed=int(v.get("seed", 0)), fps=v.get("fps", BASE_FPS),
        distilled=bool(v.get("distilled", False)), resolution=v.get("bucket", v.get("resolution", "")) or "",
        use_kv_cache=bool(v.get("use_kv_cache", True)),
    )


_DTYPE_PRECISION = {"auto": "auto", "": "auto", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
                    "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}  # checkpoint._DTYPES' names


def base_precision(precision: str, dit_dtype: str = "auto") -> str:
    """memory.PRECISIONS value for the sampling DiT: 'auto' follows the model's ``dit_dtype``."""
    from .memory import PRECISIONS

    if precision not in PRECISIONS:
        raise SampleError(f"precision={precision!r}: choose one of {PRECISIONS} (int8 fits the DiT in 13 GiB)")
    if precision != "auto":
        return precision
    try:
        return _DTYPE_PRECISION[str(dit_dtype).lower()]
    except KeyError:
        raise SampleError(f"model dit_dtype={dit_dtype!r}: use auto, bfloat16, float16 or float32") from None


def load_sampling_components(model, offload: str = "none", precision: str = "auto", blocks_to_swap: int = 0,
                             compile="auto"):
    """Components for sampling from the run's ``model`` settings (config.ModelSettings).

    offload='model': every part is loaded on the CPU in the dtype it will run in on the accelerator
    (bf16 for 'auto', not the CPU's float32), and ``generate(..., offload='model')`` moves each to
    the GPU only while it runs. ``precision`` (memory.PRECISIONS; 'auto' = the model's dit_dtype)
    and ``blocks_to_swap`` are applied to the DiT as training applies them (memory.py:
    apply_inference_memory): quantized block by block on the GPU, then the last N blocks' weights
    to pinned CPU memory. LoRAs (yours, cfg_step_lora, refinement_lora) are applied per call on
    top of the quantized weights and stream in with their swapped block. ``compile`` (auto | on |
    off, speed.compile_wanted) compiles each DiT block on CUDA: the first call compiles."""
    from .checkpoint import PARTS, load_components, load_dit, pick_device, pick_dtype
    from .memory import QUANTIZED, apply_inference_memory, compute_dtype

    if offload not in OFFLOAD:
        raise SampleError(f"offload={offload!r}: use 'none' or 'model'")
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, (int, np.integer)) or blocks_to_swap < 0:
        raise SampleError(f"blocks_to_swap={blocks_to_swap!r}: use a whole number from 0 (none) to 48 (24 fits "
                          "bf16 sampling in 24 GiB)")
    prec = base_precision(precision, model.dit_dtype)
    dev = pick_device(model.device)
    dtypes = {"dit": model.dit_dtype, "vae": model.vae_dtype, "text_encoder": model.text_encoder_dtype}
    home = dev
    if offload == "model":
        dtypes = {k: pick_dtype(v, dev) for k, v in dtypes.items()}
        home = torch.device("cpu")
    if prec not in QUANTIZED and not blocks_to_swap:  # the plain path: the DiT loads where it runs
        if precision != "auto":
            dtypes["dit"] = compute_dtype(prec, dev)
        comps = load_components(model.checkpoint, device=str(home), dtypes=dtypes, attention=model.attention)
        comps.memory = {"precision": prec, "blocks_to_swap": 0, "compile": _compile_dit(comps.dit, compile, dev)}
        return comps
    comps = load_components(model.checkpoint, parts=[p for p in PARTS if p != "dit"], device=str(home), dtypes=dtypes)
    dit = load_dit(model.checkpoint, "cpu", compute_dtype(prec, dev), model.attention)
    try:
        apply_inference_memory(dit, prec, int(blocks_to_swap), dev, home)
    except ImportError as e:
        raise SampleError(f"precision={precision!r}: {e}") from None
    comps.dit = dit
    comps.memory = {"precision": prec, "blocks_to_swap": int(blocks_to_swap), "compile": _compile_dit(dit, compile, dev)}
    return comps


def _compile_dit(dit, compile, device) -> bool:
    """Compile each DiT block where it pays (CUDA); True when compiled. Attention on CUDA gets the
    fastest fused kernel of the GPU (speed.default_sdpa_preference), as in training."""
    from .speed import apply_compile, compile_wanted, default_sdpa_preference, set_sdpa_preference

    if torch.device(device).type == "cuda":
        set_sdpa_preference(default_sdpa_preference())
    if not compile_wanted(compile, device, print):
        return False

    apply_compile(dit, scope="blocks")
    return True


def settings_record(request: SampleRequest, lora=None, scale: float = 1.0, offload: str = "none",
                    precision: str = "auto", blocks_to_swap: int = 0, compile="auto") -> dict:
    """The run config's ``sample`` section (config.SampleSettings) for what was just sampled (as asked:
    height = width = 0 when the size came from the input, the negative prompt's name if it had one)."""
    from .speed import compile_choice

    r = request.resolved()
    return dict(
        prompt=r.prompt, negative_prompt=request.negative_prompt or "", mode=r.mode,
        image=str(r.image) if isinstance(r.image, (str, Path)) else ("<uploaded>" if r.image is not None else ""),
        video=str(r.video) if isinstance(r.video, (str, Path)) else "", num_cond_frames=r.num_cond_frames,
        resolution=r.resolution, height=r.height or 0, width=r.width or 0, num_frames=r.num_frames, steps=r.steps,
        guidance=r.guidance, seed=r.seed, fps=int(round(r.fps)), distilled=r.distilled, use_kv_cache=r.use_kv_cache,
        enhance_hf=bool(r.enhance_hf), offload=offload, precision=precision, blocks_to_swap=int(blocks_to_swap),
        compile=compile_choice(compile), loras=[{"path": str(lora), "scale": float(scale)}] if lora else [],
    )


def input_size(request: SampleRequest) -> Optional[tuple[int, int]]:
    """(H, W) of the request's conditioning image / video without decoding the whole input; None for
    t2v or when it cannot be read."""
    try:
        if request.mode == "i2v" and not _missing(request.image):
            if isinstance(request.image, (str, Path)):
                from PIL import Image, ImageOps

                with Image.open(request.image) as im:
                    w, h = ImageOps.exif_transpose(im).size
                return h, w
            return tuple(load_image_frames(request.image).shape[1:3])
        if request.mode == "continuation" and not _missing(request.video):
            if isinstance(request.video, (str, Path)):
                from .data.video import probe

                info = probe(request.video, check_last=False)
                return info.height, info.width
            return tuple(load_video_frames(request.video, None, last=1).shape[1:3])
    except Exception:  # the sampler itself reports a bad input, with the fix
        return None
    return None


def sampling_plan(values: dict, uploaded_image=None, gpu_gib="auto") -> dict:
    """planner.report for the full-size DiT with the 04_sample settings (precision, blocks_to_swap,
    size, frames, CFG or not), plus the text encoder, which training never loads: with offload='none'
    the UMT5-XXL encoder is on the GPU with the DiT's resident weights until the prompts are encoded,
    and in host memory after that.
    ``summary`` is the line 04 prints; ``fits``/``advice`` as in planner.report."""
    from .envinfo import gpu_memory_gib
    from .planner import GIB, plan, report, sampling_plan_settings, text_encoder_bytes
    from .speed import compile_choice

    req = request_from_values(values, uploaded_image).resolved()
    h, w = sample_size(req, input_size(req))
    if gpu_gib == "auto":
        gpu_gib = gpu_memory_gib(0) if torch.cuda.is_available() else None
    s = sampling_plan_settings(h, w, req.num_frames, guided=req.guidance > 1,
                               precision=base_precision(values.get("precision", "auto")),
                               blocks_to_swap=values.get("blocks_to_swap", 0),
                               compile=compile_choice(values.get("compile", "auto")) != "off")  # a plan is for a CUDA GPU
    prec, swap = s.precision, s.blocks_to_swap
    out = report(s, gpu_gib)
    parts = plan(s).parts
    offload = values.get("offload", "none")
    encode = parts["weights_resident"] + parts["swap_buffers"] if offload == "none" else 0.0
    encode += text_encoder_bytes() / GIB
    out["encode_peak_gib"] = round(encode, 1)
    out["host_ram_gib"] = round(out["host_ram_gib"] + text_encoder_bytes() / GIB, 1)  # it waits there after encoding
    out["summary"] = (f"full-size model at {h}x{w}x{req.num_frames}, {prec}, {swap} blocks swapped, "
                      f"{'CFG' if req.guidance > 1 else 'no guidance'}: predicted denoising peak {out['peak_gib']} GiB "
                      f"GPU, {out['host_ram_gib']} GiB host RAM; while encoding the prompt {out['encode_peak_gib']} GiB "
                      f"({'text encoder + the DiT' if offload == 'none' else 'text encoder alone, offload=model'})")
    if gpu_gib and offload == "none" and encode > gpu_gib - 1.0:
        out["fits"] = False
        out["advice"] = ((out["advice"] + "; ") if out["advice"] else "") + (
            f"the text encoder ({text_encoder_bytes() / GIB:.1f} GiB) and the DiT do not fit together "
            f"({encode:.1f} GiB > {gpu_gib - 1.0:.1f} GiB usable): set offload='model'")
    return out


# ---------------------------------------------------------------------------------------------
# 720p refinement stage (spec §7.9): stage-1 clip -> 704x1280 at 30 fps, refinement_lora + BSA
# ---------------------------------------------------------------------------------------------
BSA_LATENT_GRANULARITY = 4  # BSA's 4x4x4 blocks: latent frame counts are padded to multiples of 4


def upsample_for_refinement(frames: np.ndarray, height: int, width: int, double_frames: bool = True) -> torch.Tensor:
    """uint8 [F1, H, W, 3] -> [1, 3, F2, height, width] in [−1, 1]: bilinear in space, then linear in
    time to F2 = 2·F1 (or F1) frames, both with align_corners=True, as the pipeline's input."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True) / 255.0
    x = x.permute(1, 0, 2, 3)[None]  # [1, 3, F1, H, W]
    f2 = 2 * x.shape[2] if double_frames else x.shape[2]
    x = F.interpolate(x, size=(f2, height, width), mode="trilinear", align_corners=True)
    return x * 2 - 1


def refinement_padding(num_frames: int, num_cond_frames: int = 0) -> dict:
    """Latent counts in multiples of 4 (spec §7.9 step 3) for F2 frames with k conditioning frames:
    n = ⌈(1 + ⌈(k−1)/4⌉)/4⌉·4 conditioning latents (0 when k = 0) made of 1 + 4(n−1) frames (the
    first frame repeated in front), m = ⌈⌈(F2−k)/4⌉/4⌉·4 noisy latents (last frame repeated at the end)."""
    k, f2, g = num_cond_frames, num_frames, BSA_LATENT_GRANULARITY
    n = math.ceil((1 + math.ceil((k - 1) / 4)) / g) * g if k > 0 else 0
    front = 1 + 4 * (n - 1) - k if k > 0 else 0
    m = math.ceil(math.ceil((f2 - k) / 4) / g) * g
    back = 4 * m - (f2 - k)
    return {"cond_latents": n, "noisy_latents": m, "front": front, "back": back}


@torch.no_grad()
def refine(components, stage1, prompt: Optional[str] = None, *, image=None, video=None, num_cond_frames: int = 0,
           steps: int = DEFAULT_STEPS, t_thresh: float = 0.5, spatial_refine_only: bool = False,
           size: Optional[tuple] = None, seed: int = 0, loras: Optional[Sequence[tuple]] = None,
           use_bsa: bool = True, progress=True, callback=None, offload: str = "none", device=None,
           text_encoder_to_cpu: bool = True, vae_tiling_enabled: Optional[bool] = None) -> SampleResult:
    """Refine a stage-1 clip (a SampleResult or uint8 [F1, H, W, 3], normally the 480p/15 fps
    distilled output) to the 720p 64-px bucket (480x832 -> 704x1280) and, unless
    ``spatial_refine_only``, twice the frames (30 fps).

    The checkpoint's ``refinement_lora`` (or ``loras``) is applied for the call, block-sparse
    attention is switched on (dense where BSA cannot run), the positive prompt only, no guidance.
    The upsampled clip is encoded, then re-noised to σ = t_thresh: x = (1 − t)·z + t·ε, and denoised
    with the refine schedule (5 steps from t = 500 for steps = 50). For I2V/continuation give
    ``image`` (k = 1) or ``video`` (its last ``num_cond_frames`` frames at the refined frame rate): they
    are encoded at the target size and held clean in front, padded to 4 latents. ε and the posterior
    samples come from a seeded generator (the official code draws them unseeded)."""
    t0 = time.time()
    if isinstance(stage1, SampleResult):
        frames, src = stage1.video, stage1.settings
        prompt = src.get("prompt", "") if prompt is None else prompt
        base_fps = float(src.get("fps", BASE_FPS))
    else:
        frames, base_fps = _as_uint8_frames(stage1, "stage1"), float(BASE_FPS)
        prompt = prompt or ""
    if not 0 < t_thresh < 1:
        raise SampleError(f"t_thresh={t_thresh}: use a value in (0, 1) (official 0.5)")
    if steps < 1:
        raise SampleError(f"steps={steps}: use at least 1 (official 50, which gives 5 refinement steps)")
    if image is not None and video is not None:
        raise SampleError("refine: give image or video for conditioning, not both")
    dit, vae = components.dit, components.vae
    dev = _exec_device(dit, offload, device)
    dtype = dit_dtype(dit)
    if loras is None:
        if REFINE_LORA not in (components.loras or {}):
            raise SampleError(f"refinement needs {Path(components.folder) / 'lora' / (REFINE_LORA + '.safetensors')} "
                              "(from meituan-longcat/LongCat-Video), or pass loras=[(path, scale)]")
        loras = [(components.loras[REFINE_LORA], 1.0)]
    h, w = tuple(size) if size else refine_bucket(frames.shape[1], frames.shape[2])
    try:
        check_size(h, w, 64, "refinement size")  # 64-px grid: the latent grid splits into BSA's 4x4 blocks
    except ValueError as e:
        raise SampleError(str(e)) from None

    cond = None
    if image is not None:
        cond = load_image_frames(image)
        num_cond_frames = 1
    elif video is not None:
        if num_cond_frames < 1:
            raise SampleError("refine with video conditioning needs num_cond_frames >= 1 (official: 26 at 30 fps)")
        cond = load_video_frames(video, None)
        if len(cond) < num_cond_frames:
            raise SampleError(f"conditioning video has {len(cond)} frames < num_cond_frames={num_cond_frames}")
        cond = cond[-num_cond_frames:]
    else:
        num_cond_frames = 0

    emb, mask = encode_text(components, prompt, None, False, dev, dtype, offload, text_encoder_to_cpu)
    g = torch.Generator().manual_seed(int(seed))
    up = upsample_for_refinement(frames, h, w, not spatial_refine_only)
    f2 = up.shape[2]
    pad = refinement_padding(f2, num_cond_frames)
    n, m = pad["cond_latents"], pad["noisy_latents"]
    up = torch.cat([up[:, :, :1].expand(-1, -1, pad["front"], -1, -1), up,
                    up[:, :, -1:].expand(-1, -1, pad["back"], -1, -1)], dim=2)
    up = up[:, :, : 1 + 4 * (n + m - 1)]  # the VAE reads 1 + 4(L − 1) frames for L latents (k = 0: 3 unused)
    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        z = encode_video(vae, up, generator=g).float().cpu()
        noise = torch.randn(z.shape, generator=g, dtype=torch.float32)
        latents = (1 - t_thresh) * z + t_thresh * noise
        if cond is not None:
            pixels = preprocess_frames(cond, h, w)
            pixels = torch.cat([pixels[:, :, :1].expand(-1, -1, pad["front"], -1, -1), pixels], dim=2)
            latents[:, :, :n] = encode_video(vae, pixels, generator=g).float().cpu()
    del up
    latents = latents.to(dev)

    previous = getattr(dit, "attention_backend", "sdpa")
    try:
        with temporary_loras(dit, loras), placed(dit, dev, offload == "model"):
            if use_bsa:
                dit.enable_bsa()
            latents, timesteps = denoise(dit, components.scheduler, latents, emb, mask, steps, "refine", 1.0, n,
                                         t_thresh=t_thresh, progress=progress, callback=callback)
    except torch.cuda.OutOfMemoryError as e:
        raise _oom_error(e, dev, h, w, f2, False, _memory(components)) from e
    finally:
        dit.set_attention_backend(previous)

    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        out = to_uint8_frames(decode_latents(vae, latents))[0]
    out = out[pad["front"]: pad["front"] + f2]
    fps = base_fps if spatial_refine_only else 2 * base_fps
    settings = {
        "mode": "refine", "prompt": prompt, "height": h, "width": w, "num_frames": int(len(out)), "steps": steps,
        "t_thresh": t_thresh, "seed": seed, "fps": fps, "spatial_refine_only": spatial_refine_only,
        "num_cond_frames": num_cond_frames, "num_cond_latents": n, "latent_frames": n + m, "padding": pad,
        "bsa": use_bsa, "loras": [[str(p), float(s)] for p, s in loras],
        "timesteps": [round(float(x), 3) for x in timesteps], "checkpoint": str(getattr(components, "folder", "")),
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""), **_memory(components),
    }
    return SampleResult(video=out, latents=latents.cpu(), settings=settings, seconds=time.time() - t0)
