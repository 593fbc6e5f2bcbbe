"""Buckets: which size (and frame count) each sample is trained at.

* ``aspect_ratio`` (default): a fixed pixel area (e.g. 480x832 = 399,360 px) at many aspect ratios,
  sizes on a grid (32 px like the official 480p table; 64 px keeps latents divisible for BSA); each
  clip goes to the bucket whose aspect ratio is nearest, then is center-cropped to it.
* ``resolution_frames``: groups ``WxH@F`` from the clip's own size (rounded down to the grid and
  capped at the target area) and frame count (rounded down with ``frame_interval``).

Either way ``F`` is the frame count the sample trains at: num_frames, or less for a clip shorter than
that (``train_frames``), so the trainer's batches, one bucket each, never mix frame counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class BucketError(ValueError):
    """Bucket settings that cannot produce valid training sizes."""


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}@{self.frames}"


def parse_resolution(text: str) -> tuple[int, int]:
    """'480x832' (H x W) -> (480, 832), each divisible by 16."""
    try:
        h, w = (int(v) for v in str(text).lower().replace(" ", "").split("x"))
    except ValueError:
        raise BucketError(f"resolution={text!r}: write it as HEIGHTxWIDTH, e.g. 480x832") from None
    bad = [f"{n}={v}" for n, v in (("height", h), ("width", w)) if v <= 0 or v % 16]
    if bad:
        raise BucketError(f"resolution={text!r}: {', '.join(bad)} must be a positive multiple of 16 "
                          f"(e.g. {round(h / 16) * 16 or 16}x{round(w / 16) * 16 or 16})")
    return h, w


def check_frames(num_frames: int, name: str = "num_frames") -> int:
    if num_frames < 1 or (num_frames - 1) % 4:
        lo = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise BucketError(f"{name}={num_frames}: the VAE needs 4k+1 frames; use {lo} or {lo + 4}")
    return num_frames


SHORT_CLIPS = ("keep", "drop")


def check_short_clips(settings) -> None:
    """Refuse a short_clips / min_frames pair the scan cannot use."""
    mode = getattr(settings, "short_clips", "keep")
    if mode not in SHORT_CLIPS:
        raise BucketError(f"short_clips={mode!r}: use keep (train short clips at their own length) or drop")
    check_frames(getattr(settings, "min_frames", 17), "min_frames")


def train_frames(available: int, settings) -> int | None:
    """Frames a clip with ``available`` frames (at target_fps) trains at, or None when too short.

    A clip of at least num_frames gives num_frames. A shorter one gives the longest 4k+1 count it
    holds when short_clips is keep and that count reaches min_frames (capped at num_frames), else None.
    """
    n = settings.num_frames
    if available >= n:
        return n
    if getattr(settings, "short_clips", "keep") != "keep" or available < 1:
        return None
    frames = 1 + (available - 1) // 4 * 4
    return frames if frames >= min(getattr(settings, "min_frames", 17), n) else None


def aspect_buckets(resolution: str = "480x832", grid: int = 32, min_ratio: float = 0.25,
                   max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(H, W) pairs on the grid with area close to the target, one per distinct aspect ratio."""
    if grid % 16:
        raise BucketError(f"bucket grid {grid} must be a multiple of 16")
    h0, w0 = parse_resolution(resolution)
    area = h0 * w0
    out = {(h0, w0), (w0, h0)}
    h = grid
    while h * h <= area * max_ratio:
        w = max(grid, round(area / h / grid) * grid)
        if min_ratio <= h / w <= max_ratio:
            out.add((h, w))
        h += grid
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(h / w)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - ratio), -hw[0] * hw[1]))


def crop_loss(h: int, w: int, th: int, tw: int) -> float:
    """Fraction of the source pixels a center crop to the bucket's aspect ratio throws away."""
    target = tw / th
    kept = (h * target) * h if w / h > target else w * (w / target)
    return max(0.0, 1.0 - kept / (h * w))


# Beyond this a clip is mostly interpolation (a 1x1 clip at 64x64 is one colour): the scan refuses it.
# The bundled 144x256 samples need 3.3x at the default 480x832.
MAX_UPSCALE = 4.0


def upscale_factor(h: int, w: int, th: int, tw: int, policy: str = "center") -> float:
    """How much the resize to the bucket th x tw enlarges the source (> 1: upscaled); center and random
    crops keep the bucket's aspect, so one factor holds for both sides."""
    if policy == "none":
        return max(th / h, tw / w)
    return th / h if w / h > tw / th else tw / w


def assign_bucket(h: int, w: int, frames: int, settings, buckets=None) -> Bucket:
    """The bucket of a clip of size h x w contributing ``frames`` frames per window."""
    strategy = settings.bucket_strategy
    if strategy == "aspect_ratio":
        bh, bw = nearest_bucket(h, w, buckets or aspect_buckets(settings.resolution, getattr(settings, "bucket_grid", 32)))
        return Bucket(bh, bw, frames)
    if strategy == "resolution_frames":
        h0, w0 = parse_resolution(settings.resolution)
        scale = min(1.0, math.sqrt(h0 * w0 / (h * w)))
        grid = max(16, getattr(settings, "bucket_grid", 32))
        bh = max(grid, int(h * scale) // grid * grid)
        bw = max(grid, int(w * scale) // grid * grid)
        step = max(4, settings.frame_interval // 4 * 4)
        f = frames if frames == 1 else 1 + (frames - 1) // step * step
        return Bucket(bh, bw, f)
    raise BucketError(f"bucket_strategy={strategy!r}: use aspect_ratio or resolution_frames")
