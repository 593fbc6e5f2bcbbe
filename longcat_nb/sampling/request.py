"""A sampling request and its inputs: the settings (:class:`SampleRequest`, validated with the fix named),
the 04_sample form's values turned into one (auto values filled from the checkpoint), the size it samples
at, and the conditioning image/video decoded and prepared as the official pipeline does."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import BASE_FPS, MODES
from ..flow import SampleError  # noqa: F401  (the sampler's one error type, re-exported here)
from ..resolution import RESOLUTIONS, nearest_bucket
from ..text import resolve_negative_prompt
from ..vae import check_num_frames, check_size

DISTILL_LORA = "cfg_step_lora"
REFINE_LORA = "refinement_lora"
DEFAULT_STEPS, DISTILLED_STEPS = 50, 16
DEFAULT_GUIDANCE = 4.0
T2V_SIZE = (480, 832)  # the official text-to-video size


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
    # where the seconds went: text_s (prompt encoding, and the I2V image's VAE encode), place_s (LoRAs applied, the DiT moved to the
    # GPU), steps_s (each denoising step: the first compiles), decode_s (VAE); CUDA synchronized
    timings: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.settings.get("fps", BASE_FPS)



# ---------------------------------------------------------------------------------------------
# inputs: conditioning frames
# ---------------------------------------------------------------------------------------------
def load_image_frames(image) -> np.ndarray:
    """A path, PIL image or uint8 array -> uint8 [1, H, W, 3]."""
    if isinstance(image, (str, Path)):
        from ..data.video import load_image

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
        from ..data.video import IMAGE_EXTS, decode_frames, probe

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
    from ..data.video import crop_box

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
# the 04_sample form: auto values, what is saved, the request
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
                from ..data.video import probe

                info = probe(request.video, check_last=False)
                return info.height, info.width
            return tuple(load_video_frames(request.video, None, last=1).shape[1:3])
    except Exception:  # the sampler itself reports a bad input, with the fix
        return None
    return None
