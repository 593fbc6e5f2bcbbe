"""mediapy needs an ffmpeg binary to show/write videos: use imageio-ffmpeg's when none is on PATH."""
from __future__ import annotations

import shutil


def ensure_ffmpeg() -> None:
    import mediapy

    if shutil.which("ffmpeg"):
        return
    try:
        import imageio_ffmpeg

        mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # mediapy's GIF path still works without ffmpeg
        pass


def show_videos(videos: dict, fps: float, small: bool = False) -> None:
    import mediapy

    from ..data.video import crop_resize

    ensure_ffmpeg()
    if small:
        out = {}
        for k, v in videos.items():
            s = max(1, max(v.shape[1:3]) // 128)
            out[k] = crop_resize(v[:32], max(2, v.shape[1] // s // 2 * 2), max(2, v.shape[2] // s // 2 * 2), "none")
        videos = out
    mediapy.show_videos(videos, fps=fps, codec="gif" if small else "h264", columns=3)
