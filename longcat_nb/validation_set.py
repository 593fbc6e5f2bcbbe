"""Validation clips from the held-out data (issue 28): the captions of the run's eval samples become
validation prompts, and an eval sample with a conditioning image, or any eval sample when
``validation_eval_i2v`` is on (its first frame), becomes an image-to-video prompt. So the clips
validation draws can be held against clips the LoRA never trained on, with the same seed for base
and LoRA."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FIRST_FRAMES = "validation_inputs"  # run-folder subfolder for the first frames used as I2V inputs


def eval_records(run_dir: Path) -> list[dict]:
    """The run's eval samples (dataset.jsonl records with role eval), one per clip, in scan order."""
    path = Path(run_dir) / "dataset.jsonl"
    if not path.is_file():
        return []
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("role") == "eval" and rec.get("file") not in seen and not rec.get("problems"):
            seen.add(rec.get("file"))
            out.append(rec)
    return out


def first_frame_png(run_dir: Path, rec: dict) -> str:
    """The clip's first training frame (cropped as cached) written once as a PNG; its path."""
    from PIL import Image

    from .data.video import load_sample_frames
    from .io import atomic_write

    out = Path(run_dir) / FIRST_FRAMES / f"{Path(rec['file']).stem}_w{rec.get('window', 0)}.png"
    if not out.is_file():
        frame = load_sample_frames({**rec, "frame_indices": rec["frame_indices"][:1]})[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Image.fromarray(frame).save(tmp, format="PNG"))
    return str(out)


def with_eval_prompts(run_dir: Path, s):
    """TrainSettings with up to ``validation_from_eval`` eval samples appended to the validation prompts
    (after validation_prompts and the prompts file); as given when the setting is 0."""
    if not s.validation_from_eval:
        return s
    recs = eval_records(run_dir)[:s.validation_from_eval]
    if not recs:
        raise ValueError(f"validation_from_eval={s.validation_from_eval} but {Path(run_dir) / 'dataset.jsonl'} has no "
                         "eval sample: add a dataset entry with role \"eval\" (or eval_fraction / eval_files on a "
                         "train entry) in 01_dataset, or set validation_from_eval=0")
    images = list(s.validation_images) + [""] * (len(s.validation_prompts) - len(s.validation_images))
    for rec in recs:
        cond = rec.get("condition_image")
        images.append(cond or (first_frame_png(run_dir, rec) if s.validation_eval_i2v else ""))
    return dataclasses.replace(s, validation_prompts=list(s.validation_prompts) + [r["caption"] for r in recs],
                               validation_images=images)
