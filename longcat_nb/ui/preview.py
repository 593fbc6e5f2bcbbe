"""The latent preview in a notebook: one image line (a few frames of the clean estimate side by side)
that is replaced in place every few steps. Nothing is shown headless (an executed notebook keeps no
stream of images)."""
from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np

from ..preview import preview_every
from .widgets import headless


def _strip(frames: np.ndarray, count: int = 4) -> np.ndarray:
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in idx], axis=1)


def live_preview(every: int, title: str = "preview") -> Optional[Callable]:
    """A ``preview`` callback for sampling.generate that redraws one PNG strip in place, or None
    (``every`` = 0, or headless)."""
    if every <= 0 or headless():
        return None
    from IPython.display import Image, display
    from PIL import Image as PILImage

    handle = display(display_id=True)

    def show(step: int, frames: np.ndarray) -> None:
        buf = io.BytesIO()
        PILImage.fromarray(_strip(frames)).save(buf, format="PNG")
        handle.update(Image(data=buf.getvalue(), format="png", metadata={"title": f"{title}, step {step + 1}"}))
    return preview_every(every, show)
