"""03_train_lora, its cells and its CLI: the VRAM plan of the run's settings (:func:`plan`), LoRA training
on the cache on one GPU or several (:func:`train_lora`), the LoRA in the layouts asked for
(:func:`export`); :func:`run` is ``python -m longcat_nb train``: training resumed from the newest
checkpoint, then the exports (``export_formats``: peft always; official, comfy)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from . import apply_settings, split_parameters

OPTIONS = ("export_formats", "max_steps")
FORMATS = ("peft", "official", "comfy")


def save_settings(run_dir, sections: dict):
    """Write the settings to config.json, once checkpoints/ is known to resume under them: a checkpoint
    made with another rank, targets, alpha or optimizer stops here, before config.json changes."""
    from ..train import check_resume

    check_resume(run_dir, sections.get("train", {}))
    return apply_settings(run_dir, sections)


def plan(run_dir, settings: Optional[dict] = None) -> dict:
    """planner.report for the full-size DiT with this run's train and dataset settings (``settings``:
    train settings to save first, see :func:`save_settings`), on this machine's GPU (none: no verdict).
    Adds ``checkpointing`` (train.checkpointing_mode) and ``summary``, the line 03 prints."""
    import torch

    from ..config import load_config
    from ..envinfo import gpu_memory_gib
    from ..planner import report, training_plan_settings
    from ..speed import compile_choice, compile_wanted
    from ..train import checkpointing_mode

    cfg = save_settings(run_dir, {"train": settings}) if settings is not None else load_config(run_dir)
    s, ds = cfg.train, cfg.dataset
    cuda = torch.cuda.is_available()
    checkpointing = checkpointing_mode(s, "cuda" if cuda else "cpu", ds)
    # as the trainer decides on a GPU; without one, the plan is for a CUDA GPU, where auto compiles
    compiled = compile_wanted(s.compile, "cuda") if cuda else compile_choice(s.compile) != "off"
    out = report(training_plan_settings(s, ds, compile=compiled, selective=checkpointing == "selective"),
                 gpu_memory_gib(0) if cuda else None)
    out["checkpointing"] = checkpointing
    out["summary"] = (f"full-size model at {ds.resolution}x{ds.num_frames}: predicted peak {out['peak_gib']} GiB "
                      f"GPU, {out['host_ram_gib']} GiB host RAM; checkpointing: {checkpointing}")
    return out


def train_lora(run_dir, gpus: int = 0, on_step: Optional[Callable[[dict], None]] = None,
               on_validation: Optional[Callable[[int, dict], None]] = None, log: Callable[[str], None] = print,
               max_steps: Optional[int] = None, preview: bool = False):
    """Train the run's LoRA and return the train.TrainResult. ``gpus``: 0 = every visible GPU; with
    more than one, torchrun + FSDP2 in a subprocess (launch.py), followed from here. ``on_validation``
    gets (step, {name: (mp4 path, frames)}) either way. ``preview``: in a notebook on one GPU, show each
    validation clip forming every train.validation_preview_every steps. Ends with a one-line summary
    through ``log``."""
    from ..launch import gpu_count

    nproc = max(1, gpu_count() if gpus == 0 else gpus)
    if nproc > 1:
        res = _train_in_processes(run_dir, nproc, on_step, on_validation, log, max_steps)
    else:
        from ..train import train

        res = train(run_dir, on_step=on_step, on_validation=on_validation, max_steps=max_steps, log=log,
                    preview=_validation_preview(run_dir) if preview else None)
    loss = ""
    if res.losses:
        last = res.losses[-5:]
        loss = f"; loss {res.losses[0]:.4f} -> {sum(last) / len(last):.4f} (mean of last 5)"
    log(f"{res.steps} steps on {nproc} process(es){loss}")
    return res


def _validation_preview(run_dir):
    from ..config import load_config
    from ..ui.preview import live_preview

    return live_preview(load_config(run_dir).train.validation_preview_every, "validation")


def _train_in_processes(run_dir, nproc: int, on_step, on_validation, log, max_steps):
    from ..data.video import decode_frames, probe
    from ..launch import launch_training
    from ..report import read_train_log
    from ..train import TrainResult

    def on_files(step: int, files: list) -> None:
        on_validation(step, {p.stem: (p, decode_frames(p, list(range(probe(p).frame_count)))) for p in files})

    done = launch_training(run_dir, nproc, on_step=on_step, on_validation=on_files if on_validation else None,
                           log=log, max_steps=max_steps)
    # the losses train() returns: one per step (a step logged twice across a resume keeps its last line)
    records, _ = read_train_log(Path(run_dir))
    return TrainResult(run_dir=Path(run_dir), steps=done["steps"],
                       losses=[r["loss"] for r in records if r["step"] <= done["steps"]],
                       lora_path=Path(done["lora"]),
                       checkpoint=None if done["checkpoint"] is None else Path(done["checkpoint"]))


def export(run_dir, result, formats=("peft",)) -> dict:
    """The LoRA file of ``result`` (train.TrainResult) also in the official layout (padded to the
    official loader's default rank) and/or the ComfyUI layout, read back from the file so that a run
    on several processes exports the same; returns {what: path} of everything written."""
    from ..config import load_config
    from ..lora import load_any_lora, save_layouts, usage_of

    formats = _formats(formats)
    lora = Path(result.lora_path)
    written = {"LoRA (PEFT/diffusers)": str(lora), "checkpoint": str(result.checkpoint),
               "log": str(Path(run_dir) / "logs" / "train.jsonl")}
    state, info = load_any_lora(lora)
    s = load_config(run_dir).train
    saved = save_layouts(lora, state, info.alphas, formats, {"rank": s.rank, "alpha": s.alpha})
    if "official" in saved:
        written["official layout"] = str(saved["official"])
        written["load it in the official code"] = usage_of(saved["official"])
    if "comfy" in saved:
        written["ComfyUI layout"] = str(saved["comfy"])
    return written


def _formats(formats) -> list:
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"export_formats={formats!r}: {unknown} unknown; choose from {', '.join(FORMATS)}")
    return formats


def run(run_dir, params: dict, log=print, on_step=None, on_validation=None) -> dict:
    from ..train import export_lora, train

    sections, options = split_parameters("train", params, OPTIONS)
    formats = _formats(options.get("export_formats", ["peft"]))
    cfg = save_settings(run_dir, sections)
    # train() itself, not train_lora: under torchrun every worker runs this
    res = train(run_dir, on_step=on_step, on_validation=on_validation, max_steps=options.get("max_steps"), log=log)
    out = {"steps": res.steps, "first_loss": res.losses[0] if res.losses else None,
           "last_loss": res.losses[-1] if res.losses else None,
           "lora": None if res.lora_path is None else str(res.lora_path),
           "checkpoint": None if res.checkpoint is None else str(res.checkpoint),
           "load_s": round(getattr(res, "load_s", 0.0), 2)}  # the checkpoint read, the model ready to train
    extra = [f for f in formats if f != "peft"]
    if extra and res.lora_path is not None:
        export_lora(run_dir, res.model, cfg.train, cfg.model.checkpoint, res.steps, formats=tuple(extra),
                    ema=getattr(res, "ema", None))
        out["exports"] = sorted(str(p) for p in res.lora_path.parent.glob(f"{res.lora_path.stem}-*.safetensors"))
    return out
