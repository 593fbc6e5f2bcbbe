"""A sample on disk: the mp4 (H.264 through PyAV) and the JSON of the settings that made it, named so that
nothing is overwritten, and the run config's ``sample`` section for what was sampled."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..io import atomic_write_json
from .request import SampleRequest, SampleResult


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_video(path, frames: np.ndarray, fps: float) -> Path:
    """H.264 mp4 through PyAV (its own FFmpeg: no binary needed), written to a temporary name and
    renamed (io.atomic_write: the file gets the umask's permissions, not mkstemp's 0600)."""
    from ..data.video import write_mp4

    frames = np.asarray(frames, dtype=np.uint8)
    return write_mp4(path, frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2], fps)


def _free_name(folder: Path, name: str) -> str:
    """``name``, or name-2, name-3, ... : the first whose .mp4 and .json are both unused."""
    taken = lambda n: (folder / f"{n}.mp4").exists() or (folder / f"{n}.json").exists()  # noqa: E731
    if not taken(name):
        return name
    i = 2
    while taken(f"{name}-{i}"):
        i += 1
    return f"{name}-{i}"


def save_sample(result: SampleResult, run_dir, name: str, fps: Optional[float] = None) -> Path:
    """run_dir/samples/<name>.mp4 plus <name>.json with the settings that made it (both atomic).
    Never overwrites: when <name> is taken, <name>-2 (-3, ...) is used for both files."""
    folder = (Path(run_dir) / "samples" / name).parent
    out = folder / f"{_free_name(folder, Path(name).name)}.mp4"
    fps = fps or result.fps
    write_video(out, result.video, fps)
    meta = {**result.settings, "fps": fps, "seconds": round(result.seconds, 2), "file": out.name,
            "frames": int(result.video.shape[0]), "size": [int(result.video.shape[1]), int(result.video.shape[2])]}
    atomic_write_json(out.with_suffix(".json"), meta)
    return out


def prompt_words(prompt: str, words: int = 4, max_chars: int = 32) -> str:
    """The first few words of a prompt as a file-name part: 'a-red-ball-bounces' (ASCII only)."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", prompt or "").encode("ascii", "ignore").decode().lower()
    return "-".join(re.findall(r"[a-z0-9]+", text)[:words])[:max_chars].strip("-")


def sample_stem(run_dir, request: SampleRequest) -> str:
    """'<NNN>_<mode>_seed<seed>_<first words of the prompt>' for the next group of samples (base,
    LoRA, their 720p refinements) in run_dir/samples/: NNN is one more than the highest number
    there, so the files list in the order they were made and no sample overwrites another."""
    import re

    folder = Path(run_dir) / "samples"
    used = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else [])
            if (m := re.match(r"^(\d+)_", p.name))]
    words = prompt_words(request.prompt)
    return f"{max(used, default=0) + 1:03d}_{request.mode}_seed{request.seed}" + (f"_{words}" if words else "")



def settings_record(request: SampleRequest, lora=None, scale: float = 1.0, offload: str = "none",
                    precision: str = "auto", blocks_to_swap: int = 0, compile="auto") -> dict:
    """The run config's ``sample`` section (config.SampleSettings) for what was just sampled (as asked:
    height = width = 0 when the size came from the input, the negative prompt's name if it had one)."""
    from ..speed import compile_choice

    r = request.resolved()
    return dict(
        prompt=r.prompt, negative_prompt=request.negative_prompt or "", mode=r.mode,
        image=str(r.image) if isinstance(r.image, (str, Path)) else ("<uploaded>" if r.image is not None else ""),
        video=str(r.video) if isinstance(r.video, (str, Path)) else "", num_cond_frames=r.num_cond_frames,
        resolution=r.resolution, height=r.height or 0, width=r.width or 0, num_frames=r.num_frames, steps=r.steps,
        guidance=r.guidance, seed=r.seed, fps=int(round(r.fps)), distilled=r.distilled, use_kv_cache=r.use_kv_cache,
        enhance_hf=bool(r.enhance_hf), offload=offload, precision=precision, blocks_to_swap=int(blocks_to_swap),
        compile=compile_choice(compile), loras=[{"path": str(lora), "scale": float(scale)}] if lora else [],
    )
