"""Where a training run's numbers go: logs/train.jsonl (always; report.py reads it), TensorBoard (when
installed) and Weights & Biases (train.wandb: auto = when installed, on = required, off).

wandb runs offline by default (train.wandb_mode): it writes under logs/wandb/ and needs no network or
login; ``wandb sync logs/wandb/offline-run-*`` uploads a run later. Its config is the run's whole
config.json, so every setting of the run is on the run's page.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable


class RunLoggers:
    """One object for the three logs: ``write(rec)`` after every step, ``close()`` at the end."""

    def __init__(self, run_dir: Path, config: dict, log: Callable[[str], None] = print):
        s = config["train"]
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.jsonl = logs / "train.jsonl"
        self.tb = _tensorboard(logs / "tensorboard")
        self.wandb = _wandb(Path(run_dir), logs, config, s.get("wandb", "off"), s.get("wandb_project", ""),
                            s.get("wandb_mode", "offline"), log)

    def write(self, rec: dict) -> None:
        """The step into every log. A Ctrl-C meanwhile waits until all have it: no half line in
        train.jsonl, and no interrupt inside TensorBoard's or wandb's own code."""
        from .resume import interrupt_held

        with interrupt_held():
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            step = rec["step"]
            if self.tb is not None:
                self.tb.add_scalar("loss", rec["loss"], step)
                self.tb.add_scalar("lr", rec["lr"], step)
                if "eval_loss" in rec:
                    self.tb.add_scalar("eval_loss", rec["eval_loss"], step)
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in rec.items() if _number(v) and k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the JSONL log still has every number
        return None
    return SummaryWriter(str(path))


def _wandb(run_dir: Path, logs: Path, config: dict, use: str, project: str, mode: str, log):
    if use == "off":
        return None
    try:
        import wandb
    except ImportError:
        if use == "on":
            raise ImportError("train.wandb='on' needs wandb: pip install wandb (or set train.wandb='auto' to log "
                              "to it only where installed)") from None
        return None
    (logs / "wandb").mkdir(exist_ok=True)
    run = wandb.init(project=project or "longcat-nb", name=run_dir.name, dir=str(logs), mode=mode, config=config)
    log(f"wandb: {mode} run {run.id} in {logs / 'wandb'}" +
        (f" (upload later: wandb sync {logs / 'wandb'}/offline-run-*)" if mode == "offline" else ""))
    return run

