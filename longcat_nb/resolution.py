"""The official pipeline's resolution buckets (spec §7.10): ratio H/W -> (H, W).

Image-to-video and video continuation pick the bucket whose ratio is closest to the conditioning
frame's H/W (ties go to the smaller ratio, the first in table order); the 720p refinement stage uses
the 64-pixel table so the latent grid splits into BSA's 4x4 blocks. The tables for factors 128 and
256 exist in the official code only for context parallelism, which the kit does not run.
"""
from __future__ import annotations

RESOLUTIONS = ("480p", "720p")

# 480p, spatial factor 16 or 32 (official ASPECT_RATIO_627)
BUCKETS_480P = {
    0.26: (320, 1216), 0.31: (352, 1120), 0.38: (384, 1024), 0.43: (416, 960), 0.52: (448, 864),
    0.58: (480, 832), 0.67: (512, 768), 0.74: (544, 736), 0.86: (576, 672), 0.95: (608, 640),
    1.05: (640, 608), 1.17: (672, 576), 1.29: (704, 544), 1.35: (736, 544), 1.50: (768, 512),
    1.67: (800, 480), 1.73: (832, 480), 2.00: (896, 448), 2.31: (960, 416), 2.58: (992, 384),
    2.75: (1056, 384), 3.09: (1088, 352), 3.70: (1184, 320), 3.80: (1216, 320), 3.90: (1248, 320),
    4.00: (1280, 320),
}

# 480p, factor 64 (ASPECT_RATIO_627_F64)
BUCKETS_480P_F64 = {
    0.26: (320, 1216), 0.38: (384, 1024), 0.50: (448, 896), 0.67: (512, 768), 0.82: (576, 704),
    1.00: (640, 640), 1.22: (704, 576), 1.50: (768, 512), 1.86: (832, 448), 2.00: (896, 448),
    2.50: (960, 384), 2.83: (1088, 384), 3.60: (1152, 320), 3.80: (1216, 320), 4.00: (1280, 320),
}

# 720p, factor 16 or 32 (ASPECT_RATIO_960): a 16:9 frame maps to 704x1312
BUCKETS_720P = {
    0.25: (480, 1920), 0.29: (512, 1792), 0.32: (544, 1696), 0.36: (576, 1600), 0.40: (608, 1504),
    0.49: (672, 1376), 0.54: (704, 1312), 0.59: (736, 1248), 0.69: (800, 1152), 0.74: (832, 1120),
    0.82: (864, 1056), 0.88: (896, 1024), 0.94: (928, 992), 1.00: (960, 960), 1.07: (992, 928),
    1.14: (1024, 896), 1.22: (1056, 864), 1.31: (1088, 832), 1.35: (1120, 832), 1.44: (1152, 800),
    1.70: (1248, 736), 2.00: (1344, 672), 2.05: (1376, 672), 2.47: (1504, 608), 2.53: (1536, 608),
    2.83: (1632, 576), 3.06: (1664, 544), 3.12: (1696, 544), 3.62: (1856, 512), 3.93: (1888, 480),
    4.00: (1920, 480),
}

# 720p, factor 64 (ASPECT_RATIO_960_F64), the refinement stage's table: 480x832 -> 704x1280
BUCKETS_720P_F64 = {
    0.22: (448, 2048), 0.29: (512, 1792), 0.36: (576, 1600), 0.45: (640, 1408), 0.55: (704, 1280),
    0.63: (768, 1216), 0.76: (832, 1088), 0.88: (896, 1024), 1.00: (960, 960), 1.14: (1024, 896),
    1.31: (1088, 832), 1.50: (1152, 768), 1.58: (1216, 768), 1.82: (1280, 704), 1.91: (1344, 704),
    2.20: (1408, 640), 2.30: (1472, 640), 2.67: (1536, 576), 2.89: (1664, 576), 3.62: (1856, 512),
    3.75: (1920, 512),
}

TABLES = {
    ("480p", 16): BUCKETS_480P, ("480p", 32): BUCKETS_480P, ("480p", 64): BUCKETS_480P_F64,
    ("720p", 16): BUCKETS_720P, ("720p", 32): BUCKETS_720P, ("720p", 64): BUCKETS_720P_F64,
}


def bucket_table(resolution: str = "480p", scale_factor: int = 16) -> dict:
    """The official table for a resolution and spatial alignment (16/32 share one table)."""
    try:
        return TABLES[(resolution, int(scale_factor))]
    except KeyError:
        raise ValueError(
            f"no bucket table for resolution={resolution!r}, scale_factor={scale_factor!r}: "
            f"use resolution in {RESOLUTIONS} and scale_factor 16, 32 or 64"
        ) from None


def nearest_bucket(height: int, width: int, resolution: str = "480p", scale_factor: int = 16) -> tuple[int, int]:
    """(H, W) of the bucket whose ratio key is closest to height/width."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size {height}x{width}: height and width must be positive")
    table = bucket_table(resolution, scale_factor)
    ratio = height / width
    return table[min(table, key=lambda r: abs(r - ratio))]


def i2v_bucket(image_hw, resolution: str = "480p") -> tuple[int, int]:
    """Generation size for a conditioning image (or first video frame) of size (H, W), as the
    official image-to-video and continuation pipelines choose it (factor 16). 1080x1920 -> 480x832."""
    h, w = (int(v) for v in tuple(image_hw)[:2])
    return nearest_bucket(h, w, resolution, 16)


def refine_bucket(height: int, width: int) -> tuple[int, int]:
    """Target size of the 720p refinement stage for a stage-1 clip: 480x832 -> 704x1280."""
    return nearest_bucket(height, width, "720p", 64)
