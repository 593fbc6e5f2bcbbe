"""03_train_lora without Jupyter: LoRA training on the cache, resumed from the newest checkpoint, then
the LoRA exported in the layouts asked for (``export_formats``: peft always; official, comfy)."""
from __future__ import annotations

from . import apply_settings, split_parameters

OPTIONS = ("export_formats", "max_steps")


def run(run_dir, params: dict, log=print, on_step=None, on_validation=None) -> dict:
    from ..train import check_resume, export_lora, train

    sections, options = split_parameters("train", params, OPTIONS)
    formats = options.get("export_formats", ["peft"])
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - {"peft", "official", "comfy"})
    if unknown:
        raise ValueError(f"export_formats={formats!r}: {unknown} unknown; choose from peft, official, comfy")
    # checkpoints/ made with another rank, targets, alpha or optimizer: stop before config.json changes
    check_resume(run_dir, sections.get("train", {}))
    cfg = apply_settings(run_dir, sections)
    res = train(run_dir, on_step=on_step, on_validation=on_validation, max_steps=options.get("max_steps"), log=log)
    out = {"steps": res.steps, "first_loss": res.losses[0] if res.losses else None,
           "last_loss": res.losses[-1] if res.losses else None,
           "lora": None if res.lora_path is None else str(res.lora_path),
           "checkpoint": None if res.checkpoint is None else str(res.checkpoint)}
    extra = [f for f in formats if f != "peft"]
    if extra and res.lora_path is not None:
        export_lora(run_dir, res.model, cfg.train, cfg.model.checkpoint, res.steps, formats=tuple(extra))
        out["exports"] = sorted(str(p) for p in res.lora_path.parent.glob(f"{res.lora_path.stem}-*.safetensors"))
    return out
