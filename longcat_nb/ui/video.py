"""Inline videos for the notebooks, encoded with PyAV's own FFmpeg: H.264 mp4 in a <video> tag, or,
headless (papermill), a small GIF (Pillow) so executed notebooks stay light.

Written here rather than with mediapy, whose encoders shell out to an ffmpeg binary, which a GPU host
or a fresh environment often lacks; PyAV brings its own libx264 and the kit already decodes with it.
"""
from __future__ import annotations

import base64
import html
import io
import os
import tempfile

import numpy as np


def mp4_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 [F, H, W, 3] frames as an H.264 mp4 (yuv420p, so odd sizes lose their last row/column)."""
    from ..data.video import encode_mp4

    fd, tmp = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        encode_mp4(tmp, frames, fps)
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        os.unlink(tmp)


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, int(round(1000 / fps))))
    return buf.getvalue()


def video_tag(frames: np.ndarray, fps: float, small: bool = False) -> str:
    """One clip as HTML: a looping muted <video> (mp4 as a data URI), or an animated GIF <img>."""
    if small:
        data = base64.b64encode(gif_bytes(frames, fps)).decode()
        return f'<img src="data:image/gif;base64,{data}"/>'
    data = base64.b64encode(mp4_bytes(frames, fps)).decode()
    return (f'<video controls autoplay loop muted playsinline style="max-width:100%">'
            f'<source src="data:video/mp4;base64,{data}" type="video/mp4"/></video>')


def _shrink(v: np.ndarray) -> np.ndarray:
    """At most 32 frames and about 128 pixels on the long side (headless previews)."""
    from ..data.video import crop_resize

    s = max(1, max(v.shape[1:3]) // 128)
    return crop_resize(v[:32], max(2, v.shape[1] // s // 2 * 2), max(2, v.shape[2] // s // 2 * 2), "none")


def videos_html(videos: dict, fps: float, small: bool = False, columns: int = 3) -> str:
    cells = [f'<td style="text-align:center;vertical-align:top"><div>{html.escape(str(title))}</div>'
             f'{video_tag(_shrink(v) if small else v, fps, small)}</td>' for title, v in videos.items()]
    rows = ["<tr>" + "".join(cells[i:i + columns]) + "</tr>" for i in range(0, len(cells), columns)]
    return '<table class="longcat-videos">' + "".join(rows) + "</table>"


def show_videos(videos: dict, fps: float, small: bool = False) -> None:
    """Side-by-side clips ({title: uint8 [F, H, W, 3]}) in the notebook's output."""
    from IPython.display import HTML, display

    if videos:
        display(HTML(videos_html(videos, fps, small)))
