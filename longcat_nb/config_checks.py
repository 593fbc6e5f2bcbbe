"""The checks of single settings (config.py's ``check=`` rules): each returns what is wrong with a value
and the fix, or None. Torch-free, as config.py."""
from __future__ import annotations

import math
import re
from typing import Optional


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
