"""Exponential moving average of the trainable (adapter) weights, in float32.

After every optimizer step ema ← decay·ema + (1 − decay)·w, starting from the weights as EMA begins
(the fresh adapter, or the checkpoint's weights when a run without EMA resumes with it). The average
is kept in each checkpoint (``ema.safetensors``, keyed by parameter name) and restored on resume;
``applied`` puts it into the model for a while (validation, the ``_ema`` export) and then puts the
trained weights back.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

CHECKPOINT_FILE = "ema.safetensors"


class AdapterEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay={decay}: use a value in (0, 1), e.g. 0.999, or 0 for no EMA")
        self.decay = float(decay)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        if set(tensors) != set(self.shadow):
            extra, missing = sorted(set(tensors) - set(self.shadow)), sorted(set(self.shadow) - set(tensors))
            raise ValueError(f"the EMA weights in {where} do not match the adapter being trained (in the file only: "
                             f"{extra[:3]}, in the model only: {missing[:3]}): were rank, targets or adapter "
                             "changed? Start a new run_dir for them")
        for n, t in tensors.items():
            self.shadow[n].copy_(t)

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the model inside the block, the trained ones again after it."""
        trained = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])


def make_ema(model: nn.Module, decay: float, saved: Optional[dict] = None, log=print) -> Optional[AdapterEMA]:
    """The run's EMA (None for decay 0), restored from a resumed checkpoint's extra files ``saved``."""
    if not decay:
        return None
    ema = AdapterEMA(model, decay)
    if saved is not None and CHECKPOINT_FILE in saved:
        ema.load_state_dict(saved[CHECKPOINT_FILE])
    elif saved is not None:
        log(f"EMA (decay {decay}) starts from the resumed weights: the checkpoint has none")
    return ema


def checkpoint_files(ema: Optional[AdapterEMA]) -> dict:
    """The extra tensor files of a checkpoint (resume.save_checkpoint's ``extra``)."""
    return {CHECKPOINT_FILE: ema.state_dict()} if ema is not None else {}


def maybe_applied(ema: Optional[AdapterEMA], use: bool):
    """``ema.applied()`` where there is an EMA and ``use``; else nothing changes."""
    return ema.applied() if ema is not None and use else contextlib.nullcontext()
