"""Make the bundled sample dataset: tiny procedural clips with English and Chinese captions.

    python data_samples/make_samples.py

Deterministic (numpy drawing, fixed seeds), license-clean, H.264 mp4 at 30 fps through PyAV.
"""
from pathlib import Path

import av
import numpy as np

OUT = Path(__file__).resolve().parent

CLIPS = [
    # name, (height, width), seconds, caption
    ("red_ball_bounce", (144, 256), 3.0, "A red ball bounces across a blue floor from left to right, soft shadows."),
    ("sunset_gradient", (288, 160), 2.5, "夕阳下的天空从橙色慢慢变成紫色，镜头缓缓向上移动。"),
    ("green_square_spin", (192, 192), 3.0, "A green square spins slowly in the center of a dark room."),
    ("rain_stripes", (144, 256), 4.0, "蓝色的雨滴从上往下落，背景是灰色的城市夜景。"),
]


def frame(name: str, t: float, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if name == "red_ball_bounce":
        img = np.zeros((h, w, 3), np.float32)
        img[..., 2] = 120 + 40 * (y / h)
        cx = (0.1 + 0.8 * (t / 3.0)) * w
        cy = h * (0.75 - 0.5 * abs(np.sin(np.pi * 2 * t)))
        shadow = ((x - cx) ** 2 / 400 + (y - 0.85 * h) ** 2 / 20) < 1
        img[shadow] *= 0.5
        ball = (x - cx) ** 2 + (y - cy) ** 2 < (0.08 * h) ** 2
        img[ball] = (230, 40, 30)
    elif name == "sunset_gradient":
        k = t / 2.5
        top = np.array([255 * (1 - k) + 120 * k, 140 * (1 - k) + 60 * k, 40 * (1 - k) + 160 * k])
        bottom = np.array([90, 30, 60])
        a = ((y + 40 * k * h / 100) / h).clip(0, 1)[..., None]
        img = top * (1 - a) + bottom * a
    elif name == "green_square_spin":
        img = np.full((h, w, 3), 25, np.float32)
        ang = t * 1.2
        u = (x - w / 2) * np.cos(ang) + (y - h / 2) * np.sin(ang)
        v = -(x - w / 2) * np.sin(ang) + (y - h / 2) * np.cos(ang)
        img[(np.abs(u) < h * 0.2) & (np.abs(v) < h * 0.2)] = (40, 200, 70)
    else:  # rain_stripes
        img = np.full((h, w, 3), 70, np.float32)
        img[int(h * 0.6):, :, :] = (50, 50, 60)
        for i in range(40):
            x0 = (i * 37) % w
            y0 = ((i * 53) + t * 180) % h
            img[int(y0):int(y0) + 6, x0:x0 + 1] = (120, 160, 255)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write(path: Path, frames, fps: int = 30) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "30", "preset": "veryslow"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main() -> None:
    from PIL import Image

    for i, (name, (h, w), secs, caption) in enumerate(CLIPS):
        rng = np.random.default_rng(i)
        frames = [frame(name, k / 30, h, w, rng) for k in range(int(secs * 30))]
        write(OUT / f"{name}.mp4", frames)
        (OUT / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        if name == "red_ball_bounce":  # the I2V conditioning image: the clip's first frame
            Image.fromarray(frames[0]).save(OUT / f"{name}.png")
    print("wrote", sorted(p.name for p in OUT.iterdir() if p.suffix in (".mp4", ".txt", ".png")))


if __name__ == "__main__":
    main()
