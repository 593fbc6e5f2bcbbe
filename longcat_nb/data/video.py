"""Video I/O and the frame path: decode (PyAV, its own FFmpeg), resample to the target frame rate,
cut windows of 4k+1 frames, crop and resize to the bucket, write mp4.

Decoding and encoding go through PyAV, which brings its own FFmpeg (libx264 included): no ffmpeg
binary is needed (mediapy's reader shells out to one, whose options changed: FFmpeg 9 rejects its
'-vsync').
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".ts"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class VideoError(ValueError):
    """A file that cannot be decoded as the scan said it could."""


@dataclass
class VideoInfo:
    container: str
    codec: str
    width: int  # as displayed (after rotation)
    height: int
    rotation: int
    fps: float
    variable_fps: bool
    frame_count: int
    duration: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rotate(frame: np.ndarray, rotation: int) -> np.ndarray:
    # PyAV reports the display-matrix angle counter-clockwise; np.rot90 turns counter-clockwise too.
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def probe(path: str | Path, check_last: bool = True) -> VideoInfo:
    """Read container facts and decode every frame's timestamp (not its pixels) to count frames
    and detect variable frame rate; decode the first (and last) frame to prove they decode."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoError("no video stream")
            s = c.streams.video[0]
            tb = float(s.time_base) if s.time_base else 0.0
            pts = [p.pts for p in c.demux(s) if p.pts is not None and p.size > 0]
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            first = next(c.decode(s), None)
            if first is None:
                raise VideoError("the first frame does not decode")
            rotation = int(getattr(first, "rotation", 0) or 0)
            w, h = first.width, first.height
            codec, fmt = s.codec_context.name, c.format.name
            rate = float(s.average_rate) if s.average_rate else 0.0
        if check_last:
            last = None
            with av.open(str(path)) as c:
                for last in c.decode(video=0):
                    pass
            if last is None:
                raise VideoError("the last frame does not decode")
    except VideoError:
        raise
    except Exception as e:  # av.error.* and friends: not a video, truncated, unknown codec
        raise VideoError(f"{type(e).__name__}: {e}") from None
    pts = sorted(pts)
    n = len(pts)
    variable = False
    if n >= 3 and tb:
        d = np.diff(np.array(pts, dtype=np.float64)) * tb
        med = float(np.median(d))
        variable = bool(med > 0 and np.max(np.abs(d - med)) > 0.5 * med)
        if not rate and med > 0:
            rate = 1.0 / med
    duration = n / rate if rate else 0.0
    if rotation % 180:
        w, h = h, w
    return VideoInfo(fmt, codec, w, h, rotation, rate, variable, n, duration)


# A source this close below target_fps is taken frame for frame (29.97 for 30: 0.1% fast), not repeated.
FPS_TOLERANCE = 0.02


def _step(src_fps: float, target_fps: float, repeat: bool) -> float:
    """Source frames per output frame: > 1 drops frames, < 1 repeats them (``repeat`` only)."""
    if target_fps < src_fps or (repeat and src_fps < target_fps * (1 - FPS_TOLERANCE)):
        return src_fps / target_fps
    return 1.0


def repeats_frames(src_fps: float, target_fps: float) -> bool:
    """Whether a clip at ``src_fps`` reaches target_fps only by repeating frames."""
    return 0 < _step(src_fps, target_fps, True) < 1


def resampled_count(info_frames: int, src_fps: float, target_fps: float, repeat: bool = False) -> int:
    """Frames available after resampling to ``target_fps``: never more than the source has, unless
    ``repeat`` (a slower source then repeats frames and keeps its real speed)."""
    if src_fps <= 0:
        return 0
    if _step(src_fps, target_fps, repeat) == 1.0:
        return info_frames
    return int(math.floor(info_frames * target_fps / src_fps + 1e-6))


def resample_indices(n_out: int, src_fps: float, target_fps: float, start: int = 0, repeat: bool = False) -> list[int]:
    """Source frame index for each output frame start..start+n_out-1 (nearest earlier-or-equal)."""
    ratio = _step(src_fps, target_fps, repeat)
    return [int(math.floor((start + k) * ratio + 1e-6)) for k in range(n_out)]


def window_starts(available: int, num_frames: int, mode: str = "head", windows: int = 1, stride: int = 0) -> list[int]:
    """Starts (in resampled frames) of the training windows of ``num_frames`` in a clip."""
    if available < num_frames:
        return []
    last = available - num_frames
    if mode == "head":
        return [0]
    if mode == "uniform":
        k = max(1, windows)
        return sorted({round(last * i / (k - 1)) for i in range(k)}) if k > 1 else [0]
    if mode == "slide":
        step = stride or num_frames
        return list(range(0, last + 1, step))
    raise ValueError(f"extraction={mode!r}: use head, uniform or slide")


def decode_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] (display orientation) for source frame indices (sorted, may repeat)."""
    import av

    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as c:
            for i, fr in enumerate(c.decode(video=0)):
                if i in wanted:
                    got[i] = _rotate(fr.to_ndarray(format="rgb24"), int(getattr(fr, "rotation", 0) or 0))
                if i >= wanted[-1]:
                    break
    except Exception as e:
        raise VideoError(f"{path}: {type(e).__name__}: {e}") from None
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoError(f"{path}: frames {missing[:3]} are missing (the file has fewer frames than scanned)")
    return np.stack([got[i] for i in indices])


def load_image(path: str | Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def crop_offset(seed: int, name: str, start: int, variant: int = 0) -> list[float]:
    """Where a random crop sits, as fractions (top, left) of the room the crop leaves: drawn from the
    seed, the clip's name, the window start and the variant, so a re-scan draws the same crops and
    every window (and variant) its own. Fractions, so one draw places the crop of the clip and of its
    conditioning image alike, whatever their sizes."""
    name_key = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng([int(seed) % (1 << 63), name_key, int(start), int(variant)])
    return [round(float(v), 6) for v in rng.random(2)]


def crop_box(h: int, w: int, th: int, tw: int, policy: str = "center", offset: Optional[list] = None):
    """(top, left, height, width) of the largest region with the bucket's aspect ratio; a random crop
    sits at ``offset`` (crop_offset), a center crop (or a random one without offset) in the middle."""
    if policy == "none":
        return 0, 0, h, w
    target = tw / th
    if w / h > target:  # too wide: crop width
        cw, ch = max(1, round(h * target)), h
    else:
        cw, ch = w, max(1, round(w / target))
    if policy == "random" and offset is not None:
        return round(offset[0] * (h - ch)), round(offset[1] * (w - cw)), ch, cw
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_resize(frames: np.ndarray, th: int, tw: int, policy: str = "center", offset: Optional[list] = None) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, th, tw, 3] uint8: crop to the bucket's aspect, then area-aware resize."""
    import torch
    import torch.nn.functional as F

    top, left, ch, cw = crop_box(frames.shape[1], frames.shape[2], th, tw, policy, offset)
    x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + ch, left:left + cw])).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def encode_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 20) -> None:
    """H.264 mp4 through PyAV (no system ffmpeg) straight into ``path`` (not atomic: see write_mp4)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sizes
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=int(round(fps)) if abs(fps - round(fps)) < 1e-6 else fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": str(crf)}
        for fr in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr[:h, :w]), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 20) -> Path:
    """H.264 mp4 through PyAV (no system ffmpeg), written atomically."""
    from ..io import atomic_write

    return atomic_write(path, lambda tmp: encode_mp4(tmp, frames, fps, crf), suffix=".mp4")


# ---------------------------------------------------------------------------------------------
# what the cache stage calls: one dataset.jsonl record -> the exact training frames
# ---------------------------------------------------------------------------------------------
def load_sample_frames(record: dict) -> np.ndarray:
    """uint8 [F, H, W, 3] exactly as trained: resampled, windowed, cropped, resized."""
    h, w = record["height"], record["width"]
    if record.get("kind") == "image":
        frames = load_image(record["file"])[None]
    else:
        frames = decode_frames(record["file"], record["frame_indices"])
    return crop_resize(frames, h, w, record.get("crop", "center"), record.get("crop_offset"))


def load_condition_image(record: dict) -> Optional[np.ndarray]:
    """uint8 [1, H, W, 3] of the I2V conditioning image at the bucket size, or None."""
    if not record.get("condition_image"):
        return None
    return crop_resize(load_image(record["condition_image"])[None], record["height"], record["width"],
                       record.get("crop", "center"), record.get("crop_offset"))
