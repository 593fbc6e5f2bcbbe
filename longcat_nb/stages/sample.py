"""04_sample without Jupyter: one clip from the run's sample settings, base and LoRA side by side with the
same seed (``lora_path``: "" = the newest LoRA of the run, "none" = base only, or a file)."""
from __future__ import annotations

from dataclasses import asdict

from . import apply_settings, split_parameters

OPTIONS = ("lora_path", "lora_scale")


def run(run_dir, params: dict, log=print) -> dict:
    from ..config import update_section
    from ..sample import (auto_settings, compare_base_and_lora, keep_auto, load_sampling_components, pick_lora,
                          request_from_values, sample_stem, save_sample, settings_record)

    sections, options = split_parameters("sample", params, OPTIONS)
    cfg = apply_settings(run_dir, sections)
    asked = {("bucket" if k == "resolution" else k): v for k, v in asdict(cfg.sample).items()}
    values = auto_settings(asked, cfg.model.checkpoint)
    req = request_from_values(values)
    lora = pick_lora(run_dir, str(options.get("lora_path", "")))
    scale = float(options.get("lora_scale", 1.0))
    mem = {k: values[k] for k in ("offload", "precision", "blocks_to_swap", "compile")}
    components = load_sampling_components(cfg.model, **mem)
    log(f"sampling {req.mode} {values.get('height') or 'auto'}x{values.get('width') or 'auto'}x{req.num_frames}, "
        f"{req.steps} steps, guidance {req.guidance}, LoRA {lora or 'none'}; DiT {components.memory}")
    results = compare_base_and_lora(components, req, lora, scale, progress=False, offload=values["offload"])
    stem = sample_stem(run_dir, req)
    paths = {name: str(save_sample(res, run_dir, f"{stem}_{name}")) for name, res in results.items()}
    record = settings_record(req, lora, scale, values["offload"], values["precision"], values["blocks_to_swap"],
                             values["compile"])
    update_section(run_dir, "sample", **keep_auto(record, asked, values, values))
    for name, res in results.items():
        log(f"{name}: {paths[name]} ({res.seconds:.1f} s)")
    return {"samples": paths, "seconds_per_clip": {k: round(r.seconds, 2) for k, r in results.items()},
            "size": list(next(iter(results.values())).video.shape[:3])}
