"""One module per notebook stage, called by ``python -m longcat_nb scan|cache|train|sample``: each takes
the run folder and ``key=value`` settings, writes them to config.json (after they are validated, as
the notebook's form does), runs the stage's own functions, the ones the notebook cells call, and
returns what the stage made. No Jupyter, no widgets.

Settings are routed to sections by :func:`split_parameters`: a key of the stage's own section goes
there, a key of the model section (checkpoint, device, attention, dtypes) to ``model``, and
``section.key=value`` names the section outright (``-p train.seed=3`` from the sample stage)."""
from __future__ import annotations

import importlib
import resource
import sys
import time
from dataclasses import fields
from typing import Any, Callable

from ..config import SECTIONS, ConfigError

STAGES = {"scan": "dataset", "cache": "cache", "train": "train", "sample": "sample"}
# what `python -m longcat_nb STAGE --help` says of each (a new stage: its module, a line in each table)
STAGE_HELP = {
    "scan": "01_dataset: scan and validate the dataset folder, write dataset.jsonl",
    "cache": "02_cache: VAE latents and text embeddings on disk (resumable)",
    "train": "03_train_lora: LoRA training from RUN_DIR/config.json, resumed from the newest checkpoint; "
             "also under `torchrun --nproc_per_node N -m longcat_nb train` (FSDP2)",
    "sample": "04_sample: one clip, base and LoRA side by side (-p lora_path=none: base only)",
}


def split_parameters(stage_section: str, params: dict, extra: tuple = ()) -> tuple[dict, dict]:
    """({section: {key: value}}, {extra key: value}) from flat ``-p`` parameters; ``extra`` names the
    stage's own options that are not saved settings (e.g. the sample stage's ``lora_scale``)."""
    own = {f.name for f in fields(SECTIONS[stage_section])}
    model = {f.name for f in fields(SECTIONS["model"])}
    out: dict[str, dict] = {}
    options = {}
    for key, value in params.items():
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"-p {key}: no section {section!r}; sections: {sorted(SECTIONS)}")
        elif key in extra:
            options[key] = value
            continue
        elif key in own:
            section, name = stage_section, key
        elif key in model:
            section, name = "model", key
        else:
            raise ConfigError(
                f"-p {key}: not a setting of section '{stage_section}' or 'model'"
                f"{' or an option of this stage ' + str(sorted(extra)) if extra else ''}; "
                f"write section.{key}=value for another section. Settings of '{stage_section}': {sorted(own)}")
        out.setdefault(section, {})[name] = value
    return out, options


def apply_settings(run_dir, sections: dict) -> Any:
    """Validate every section's new values first, then write config.json once."""
    from dataclasses import asdict

    from ..config import load_config, save_config, section_from_dict

    cfg = load_config(run_dir)
    for name, values in sections.items():
        merged = {**asdict(getattr(cfg, name)), **values}
        setattr(cfg, name, section_from_dict(name, merged, f"{run_dir}/config.json"))
    if sections:
        save_config(run_dir, cfg)
    return cfg


def host_rss_peak_gib() -> float:
    """This process's peak resident memory (pinned memory included: it is mapped into the process).
    /proc's VmHWM belongs to this program; getrusage's ru_maxrss can carry the parent's peak across
    fork and exec, so it is only the fallback off Linux."""
    from ..envinfo import proc_status_gib

    peak = proc_status_gib("VmHWM")
    if peak is not None:
        return peak
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def resources() -> dict:
    """This process's peaks so far: GPU memory allocated (torch's allocator) and host RSS."""
    out = {"host_rss_peak_gib": host_rss_peak_gib()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["gpu_reserved_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def run_stage(stage: str, run_dir, params: dict, log: Callable[[str], None] = print, **kwargs) -> dict:
    """Run one stage; the summary it returns gets ``seconds`` and the resource peaks."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: choose one of {sorted(STAGES)}")
    from ..envinfo import RssPeaks, apply_gpu_memory_cap

    module = importlib.import_module(f".{stage}", __name__)
    cap = apply_gpu_memory_cap()
    if cap is not None:
        log(f"GPU memory capped at {cap:.1f} GiB (LONGCAT_NB_GPU_MEMORY_GIB)")
    t0 = time.time()
    with RssPeaks() as rss:
        summary = module.run(run_dir, params, log=log, **kwargs)
    return {"stage": stage, **summary, "seconds": round(time.time() - t0, 2), **resources(), **rss.gib()}
