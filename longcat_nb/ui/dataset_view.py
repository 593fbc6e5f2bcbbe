"""Displays for 01_dataset: summary, buckets, histograms, previews of samples as trained."""
from __future__ import annotations

from collections import Counter

from .widgets import headless


def frame_rate_note(num_frames: int) -> str:
    return (f"{num_frames} frames last {num_frames / 15:.1f} s at 15 fps (the base stage) "
            f"or {num_frames / 30:.1f} s at 30 fps (the refinement stage)")


def summary_rows(report) -> list[dict]:
    n_rec = Counter(r["file"] for r in report.records)
    num_frames = report.settings.get("num_frames")
    rows = []
    for f in report.files:
        trained = f.get("train_frames", 1 if f.get("kind") == "image" else None)
        if f.get("shortened"):
            trained = f"{trained} (shorter than {num_frames})"
        rows.append({"file": f["file"], "size": f"{f['width']}x{f['height']}", "fps": _fps(f, report.settings),
                     "frames": f["frames"] if "frames" in f else f.get("frame_count"), "seconds": round(f.get("duration", 0), 2),
                     "codec": f.get("codec", "image"), "rotation": f.get("rotation", 0),
                     "caption tokens": f.get("caption_tokens"), "trained frames": trained,
                     "samples": n_rec.get(f["file"], 0)})
    return rows


def _fps(f: dict, settings: dict):
    """The clip's frame rate; one below target_fps says that its frames are repeated to keep its speed."""
    fps = round(f["fps"] or 0, 2)
    if f.get("frames_repeated"):
        return f"{fps:g} -> {settings.get('target_fps'):g} (frames repeated)"
    return fps


def summary_title(report) -> str:
    """The scan in one line: files, samples, clips kept shorter than num_frames, problems."""
    title = f"{len(report.files)} files, {len(report.records)} training samples"
    if report.shortened:
        n = len(report.shortened)
        title += (f" ({n} clip{'s' * (n > 1)} shorter than num_frames={report.settings.get('num_frames')} "
                  "kept at their own 4k+1 length, bucketed by frame count)")
    return title + f", {len(report.problems)} problems"


def bucket_rows(report) -> list[dict]:
    rows = {}
    for r in report.records:
        b = rows.setdefault(r["bucket"], {"bucket (WxH@F)": r["bucket"], "samples": 0, "mean crop loss": 0.0})
        b["samples"] += 1
        b["mean crop loss"] += r["crop_loss"]
    for b in rows.values():
        b["mean crop loss"] = f"{100 * b['mean crop loss'] / b['samples']:.1f}%"
    return sorted(rows.values(), key=lambda b: -b["samples"])


def histograms(report):
    import matplotlib.pyplot as plt

    vids = [f for f in report.files if f.get("kind") == "video"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 2.6))
    data = [([f["duration"] for f in vids], "duration (s)"), ([f["fps"] for f in vids], "fps"),
            ([f["width"] / f["height"] for f in report.files], "aspect W/H"),
            ([f["caption_tokens"] for f in report.files if f.get("caption_tokens")], "caption tokens")]
    for ax, (values, label) in zip(axes, data):
        ax.hist(values or [0], bins=min(20, max(3, len(values))))
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    plt.show()


def preview_samples(records: list[dict], count: int = 3, fps: float = 15.0):
    """Show a few samples after resample, crop and resize; small and short when headless."""
    from ..data.video import load_sample_frames
    from .video import show_videos

    videos = {f"{r['bucket']} · {r['caption'][:40]}": load_sample_frames(r) for r in records[:count]}
    show_videos(videos, fps=fps, small=headless())  # headless: short, small GIFs keep executed notebooks light
