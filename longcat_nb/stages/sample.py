"""04_sample, its cells and its CLI: the form's values (:func:`form_values`), the VRAM plan (:func:`plan`),
the components (:func:`load`), base and LoRA sampled with the same seed and saved (:func:`sample`), the
optional 720p refinement (:func:`refine_samples`). :func:`run` is ``python -m longcat_nb sample``: one
clip from the run's sample settings (``lora_path``: "" = the newest LoRA of the run, "none" = base only,
or a file)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config import load_config, resolve_parameters  # noqa: F401  (04's form cell)
from ..paths import resolve_run_dir  # noqa: F401  (04's form cell)
from ..sampling.request import DISTILL_LORA, REFINE_LORA, SampleError
from ..ui import show_table  # noqa: F401  (04's cells display through these)
from ..ui.stage_forms import sample_form  # noqa: F401  (04's form cell)
from . import apply_settings, split_parameters

OPTIONS = ("lora_path", "lora_scale")
# the 04_sample form: sample_form(values, image getter, upload, **FORM) (grouped, with the card preset and estimate)
FORM = dict(suggestions=dict(negative_prompt=["official"]),
            descriptions=dict(negative_prompt="negative prompt ('' or official)", height="height (0 = auto)",
                              width="width (0 = auto)"))
MEMORY_KEYS = ("offload", "precision", "blocks_to_swap", "compile")


# ---------------------------------------------------------------------------------------------
# the form
# ---------------------------------------------------------------------------------------------
def form_values(run_dir, asked: dict, **options) -> dict:
    """The form's values: the run's ``sample`` settings as asked (0 = auto, config.resolve_parameters),
    ``bucket`` for ``resolution``, plus the stage's ``options``, with the auto values filled in
    (sampling.auto_settings) for the run's checkpoint."""
    from ..sampling import auto_settings

    values = {("bucket" if k == "resolution" else k): v for k, v in asked.items()}
    return auto_settings({**values, **options}, load_config(run_dir).model.checkpoint)


def image_upload():
    """The form's image button (i2v): an uploaded image turns a t2v request into i2v."""
    import ipywidgets as w

    return w.FileUpload(accept="image/*", multiple=False, description="image (i2v)")


def image_from_upload(value) -> Optional[np.ndarray]:
    """ipywidgets FileUpload value (v8 tuple of dicts, v7 dict) -> uint8 [H, W, 3], or None."""
    if not value:
        return None
    item = value[0] if isinstance(value, (list, tuple)) else next(iter(value.values()))
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(bytes(item["content"]))) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def plan(values: dict, upload_value=None) -> dict:
    """sampling.sampling_plan of the form's values (``summary`` is the line 04 prints)."""
    from ..sampling import sampling_plan

    return sampling_plan(values, image_from_upload(upload_value))


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def checkpoint_offers(components) -> dict:
    """Optional modes the checkpoint's lora/ folder enables."""
    loras = getattr(components, "loras", None) or {}
    return {"distilled": DISTILL_LORA in loras, "refinement": REFINE_LORA in loras}


def load(run_dir, values: dict):
    """The run's components with the form's memory options (sampling.load_sampling_components)."""
    from ..sampling import load_sampling_components

    return load_sampling_components(load_config(run_dir).model, **{k: values[k] for k in MEMORY_KEYS})


def loaded_table(components) -> dict:
    """What 04 shows after loading: the checkpoint, how the DiT sits, the optional modes."""
    offers = checkpoint_offers(components)
    mem = components.memory
    return {"checkpoint": str(components.folder), "DiT": f"{components.dit.dtype} on {components.dit.device}",
            "DiT weights": f"{mem['precision']}, {mem['blocks_to_swap']} blocks swapped"
                           + (", compiled blocks" if mem['compile'] else ""),
            "16-step distilled mode (cfg_step_lora)": offers["distilled"],
            "720p refinement (refinement_lora)": offers["refinement"]}


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def pick_lora(run_dir, lora_path: str = "") -> Optional[Path]:
    """'' = the newest LoRA trained in run_dir/lora/ (None if there is none); 'none' = no LoRA."""
    from ..lora import newest_lora

    if not lora_path:
        return newest_lora(run_dir)
    if str(lora_path).lower() == "none":
        return None
    p = Path(lora_path)
    if not p.exists():
        raise SampleError(f"lora_path={lora_path!r} does not exist; give a .safetensors file, '' for the newest "
                          f"in {Path(run_dir) / 'lora'}, or 'none'")
    return p


@dataclass
class Samples:
    """A group of clips with the same seed ({name: SampleResult}), where they were saved and how 04 labels them."""
    results: dict
    paths: dict
    request: object
    fps: float
    labels: dict = field(default_factory=dict)
    stem: str = ""

    def table(self) -> list[dict]:
        return [{"sample": name, "file": str(self.paths[name]), "seconds": round(res.seconds, 1),
                 "size": "x".join(map(str, res.video.shape[:3])), "steps": res.settings["steps"],
                 "guidance": res.settings["guidance"], "LoRA": res.settings["loras"] or "none"}
                for name, res in self.results.items()]


def sample(run_dir, components, values: dict, upload_value=None, asked: Optional[dict] = None,
           shown: Optional[dict] = None, progress=True, log: Optional[Callable[[str], None]] = None) -> Samples:
    """Base and LoRA (``values['lora_path']``, see :func:`pick_lora`) with the same seed, saved under a new
    NNN_mode_seedS_first-prompt-words stem in run_dir/samples/; the run's ``sample`` section is rewritten
    with what was sampled, a value asked as auto (``asked``) and left as filled in (``shown``) kept auto.
    progress: True = the notebook's bar (plain text headless), False = none."""
    from ..config import update_section
    from ..sampling import (compare_base_and_lora, keep_auto, request_from_values, sample_stem, save_sample,
                            settings_record)

    req = request_from_values(values, image_from_upload(upload_value))
    lora = pick_lora(run_dir, str(values.get("lora_path", "")))
    scale = float(values.get("lora_scale", 1.0))
    if log is not None:
        log(f"sampling {req.mode} {values.get('height') or 'auto'}x{values.get('width') or 'auto'}x{req.num_frames}, "
            f"{req.steps} steps, guidance {req.guidance}, LoRA {lora or 'none'}; DiT {components.memory}")
    results = compare_base_and_lora(components, req, lora, scale, progress=_bar(progress), offload=values["offload"],
                                    preview=_preview(progress, values.get("preview_every", 0)))
    stem = sample_stem(run_dir, req)  # a new number each time: nothing is overwritten
    paths = {name: save_sample(res, run_dir, f"{stem}_{name}") for name, res in results.items()}
    record = settings_record(req, lora, scale, *(values[k] for k in MEMORY_KEYS))
    update_section(run_dir, "sample", **keep_auto(record, values if asked is None else asked,
                                                  values if shown is None else shown, values))
    return Samples(results, paths, req, req.fps, {"base": "base", "lora": f"LoRA x{values.get('lora_scale', 1.0)}"},
                   stem)


def _preview(progress, every: int):
    """The notebook's live latent preview (only where the notebook's progress bar is wanted)."""
    if progress is not True or not every:
        return None
    from ..ui.preview import live_preview

    return live_preview(int(every))


def _bar(progress):
    if progress is True:
        from ..ui import progress as bar

        return bar
    return progress


def show_samples(samples: Samples) -> None:
    """The clips side by side, small when headless."""
    from ..ui import headless
    from ..ui.video import show_videos

    show_videos({samples.labels.get(k, k): res.video for k, res in samples.results.items()}, fps=samples.fps,
                small=headless())


def refine_samples(run_dir, components, samples: Samples, enabled: bool, offload: str = "none",
                   log: Callable[[str], None] = print) -> Optional[Samples]:
    """The 720p / 30 fps refinement of each clip, saved beside it (None when off or not offered)."""
    from ..sampling import refine, save_sample

    offered = checkpoint_offers(components)["refinement"]
    if not enabled:
        log(f"720p refinement is off (refine_720p=True to run it); available: {offered}")
        return None
    if not offered:
        log(f"refine_720p needs {components.folder}/lora/refinement_lora.safetensors (from the Hub repo)")
        return None
    req = samples.request
    refined = {k: refine(components, res, image=req.image if req.mode == "i2v" else None, offload=offload,
                         progress=_bar(True)) for k, res in samples.results.items()}
    paths = {k: save_sample(res, run_dir, f"{samples.stem}_{k}_720p") for k, res in refined.items()}
    for p in paths.values():
        log(str(p))
    return Samples(refined, paths, req, 30, {k: samples.labels.get(k, k) + " 720p" for k in refined}, samples.stem)


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
def _rounded(timings: dict) -> dict:
    return {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in timings.items()}


def run(run_dir, params: dict, log=print) -> dict:
    sections, options = split_parameters("sample", params, OPTIONS)
    cfg = apply_settings(run_dir, sections)
    values = form_values(run_dir, asdict(cfg.sample), lora_path=str(options.get("lora_path", "")),
                         lora_scale=float(options.get("lora_scale", 1.0)))
    t0 = time.perf_counter()
    components = load(run_dir, values)
    load_s = time.perf_counter() - t0
    out = sample(run_dir, components, values, asked={("bucket" if k == "resolution" else k): v
                                                     for k, v in asdict(cfg.sample).items()},
                 progress=False, log=log)
    for name, res in out.results.items():
        log(f"{name}: {out.paths[name]} ({res.seconds:.1f} s)")
    return {"samples": {k: str(p) for k, p in out.paths.items()}, "load_s": round(load_s, 2),
            "seconds_per_clip": {k: round(r.seconds, 2) for k, r in out.results.items()},
            "timings": {k: _rounded(r.timings) for k, r in out.results.items()},
            "size": list(next(iter(out.results.values())).video.shape[:3])}
