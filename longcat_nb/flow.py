"""The flow-matching schedule, shared by training and sampling (spec §7-§8).

A clip at noise level σ ∈ [0, 1] is x_σ = (1 − σ)·x0 + σ·ε and the DiT sees the timestep 1000·σ.
It predicts the velocity from noise to data, x0 − ε (the official sampler negates it before its
Euler step; SimpleTuner's ε − x0 is the opposite sign). Both stages move σ toward 1 with the
checkpoint scheduler's static shift of 12: the sampler shifts its σ list, training draws σ from the
same shifted distribution.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .config import LOSS_WEIGHTING, TIMESTEP_SAMPLING

SHIFT = 12.0  # scheduler_config.json: shift=12.0, use_dynamic_shifting=false
NUM_TRAIN_TIMESTEPS = 1000  # model timestep = 1000·σ
DISTILL_GRID = 50  # the distilled list picks from 50 σ values 1.00, 0.98, ..., 0.02


def shift_sigmas(sigmas, shift: float = SHIFT) -> torch.Tensor:
    """The static shift σ' = s·σ / (1 + (s − 1)·σ). A tensor keeps its dtype; a list or number
    becomes float32, the dtype diffusers' scheduler shifts in."""
    s = sigmas if torch.is_tensor(sigmas) else torch.as_tensor(sigmas, dtype=torch.float32)
    return shift * s / (1 + (shift - 1) * s)


# ---------------------------------------------------------------------------------------------
# training: the σ draw, the noisy input and the loss target
# ---------------------------------------------------------------------------------------------
def sample_sigmas(n: int, generator: torch.Generator, mode: str = "shift", shift: float = SHIFT, *,
                  mean: float = 0.0, std: float = 1.0, scale: float = 1.0, sigma_min: float = 0.0,
                  sigma_max: float = 1.0) -> torch.Tensor:
    """σ in (0, 1) per sample. 'shift': uniform then shifted, the distribution the sampler visits
    (46 of its 50 steps are above t = 500); 'logit_normal': sigmoid(N(mean, std)) then shifted;
    'uniform': uniform, unshifted; 'sigmoid': sigmoid(scale·N(0, 1)), unshifted (kohya's names).
    Then mapped linearly onto [sigma_min, sigma_max] (kohya's min/max timestep)."""
    if mode in ("shift", "uniform"):
        u = torch.rand(n, generator=generator)
    elif mode == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif mode == "sigmoid":
        u = torch.sigmoid(scale * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"timestep_sampling={mode!r}: use one of {TIMESTEP_SAMPLING}")
    u = u.clamp(1e-3, 1 - 1e-3)
    sigma = shift_sigmas(u, shift) if mode in ("shift", "logit_normal") else u
    if (sigma_min, sigma_max) != (0.0, 1.0):
        sigma = sigma_min + (sigma_max - sigma_min) * sigma
    return sigma


def train_sigmas(n: int, generator: torch.Generator, s) -> torch.Tensor:
    """``sample_sigmas`` with a run's TrainSettings."""
    return sample_sigmas(n, generator, s.timestep_sampling, s.shift, mean=s.logit_mean, std=s.logit_std,
                         scale=s.sigmoid_scale, sigma_min=s.sigma_min, sigma_max=s.sigma_max)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε for latents [B, C, T, h, w] and σ [B], in x0's dtype."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the DiT is trained to output at any σ: x0 − ε."""
    return x0 - noise


def loss_weights(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample weight of the velocity MSE at noise level σ, the SD3 paper's schemes (Esser et al. 2024,
    §3.1; diffusers' compute_loss_weighting_for_sd3): 'none' 1; 'sigma_sqrt' σ⁻²; 'cosmap'
    2 / (π·(1 − 2σ + 2σ²)), the weight of the cosine-map schedule."""
    sigma = sigma.float()
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma.clamp_min(1e-3) ** -2.0  # σ is drawn ≥ 1e-3; the clamp keeps an explicit σ=0 finite
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    raise ValueError(f"loss_weighting={weighting!r}: use one of {LOSS_WEIGHTING}")


def flow_matching_loss(dit, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor, num_cond: int = 0, *, weighting: str = "none",
                       loss_mask: Optional[torch.Tensor] = None, sample_weight: Optional[torch.Tensor] = None,
                       reduction: str = "mean") -> torch.Tensor:
    """MSE between the DiT output and x0 − ε on the noisy frames, in float32.

    x0, noise: [B, 16, T, h, w] float32; sigma: [B]; the first ``num_cond`` latent frames are clean
    conditioning (timestep 0, no loss, no gradient into them). ``loss_mask`` [B, 1 or C, T, h, w] weighs
    each latent element (1 learn, 0 ignore: no gradient); each sample's loss is the mean over its weighted
    elements (0 where nothing is weighted), times ``loss_weights(σ, weighting)`` and ``sample_weight`` [B].
    reduction 'mean': the batch mean (a scalar); 'none': the per-sample losses [B]."""
    B, _, T = x0.shape[:3]
    x_t = noisy_latents(x0, noise, sigma)
    t = (sigma.to(x0) * NUM_TRAIN_TIMESTEPS)[:, None].expand(B, T).clone()
    if num_cond:
        x_t[:, :, :num_cond] = x0[:, :, :num_cond]
        t[:, :num_cond] = 0.0
    pred = dit(x_t.detach(), t, text, mask, num_cond_latents=num_cond)
    target = velocity_target(x0, noise)[:, :, num_cond:]
    err = (pred[:, :, num_cond:].float() - target.float()).square()
    if loss_mask is None:
        per_sample = err.flatten(1).mean(1)
    else:
        m = loss_mask[:, :, num_cond:].to(err).expand_as(err)
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-12)
    per_sample = per_sample * loss_weights(sigma, weighting).to(per_sample)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")


# ---------------------------------------------------------------------------------------------
# sampling: the σ lists handed to the scheduler (numbers checked against spec §7.3 in the tests)
# ---------------------------------------------------------------------------------------------
def base_sigmas(steps: int, distilled: bool = False) -> torch.Tensor:
    """The σ list handed to ``set_timesteps`` (the scheduler then shifts it).

    normal: linspace(1, 0.001, steps). distilled: from the grid 1.00, 0.98, ..., 0.02 take the
    indices ⌊linspace(0, 50, steps, endpoint=False)⌋ (16 steps: 0, 3, 6, ..., 46)."""
    if distilled:
        grid = (torch.arange(1, DISTILL_GRID + 1, dtype=torch.float32) * (NUM_TRAIN_TIMESTEPS // DISTILL_GRID))
        grid = grid.round().long().flip(0)
        idx = np.floor(np.linspace(0, DISTILL_GRID, steps, endpoint=False)).astype(np.int64)
        return grid[torch.from_numpy(idx)].float() / NUM_TRAIN_TIMESTEPS
    return torch.linspace(1.0, 0.001, steps, dtype=torch.float32)


SCHEDULES = ("normal", "distilled", "enhance_hf", "refine")


class SampleError(ValueError):
    """Sampling settings that cannot work, with the fix (defined here, below the sampler, so that the
    schedule functions raise it too; longcat_nb.sampling re-exports it)."""


# ---------------------------------------------------------------------------------------------
# sampling: the sampler's named schedules, from the σ lists above
# ---------------------------------------------------------------------------------------------
def _derived_timesteps(normal: torch.Tensor, schedule: str, t_thresh: float) -> torch.Tensor:
    """enhance_hf / refine lists from the normal schedule's timesteps (as the pipeline derives them)."""
    if schedule == "enhance_hf":
        # keep the high-noise part, then 10 uniform steps 500, 450, ..., 50
        tail = torch.from_numpy(np.linspace(500, 0, 10, endpoint=False, dtype=np.float32)).to(normal.device)
        return torch.cat([normal[normal > 500], tail])
    if schedule == "refine":
        if not t_thresh:
            return normal
        start = torch.tensor([t_thresh * NUM_TRAIN_TIMESTEPS], dtype=normal.dtype, device=normal.device)
        return torch.cat([start, normal[normal < start]])
    raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")


def timesteps_for(steps: int, schedule: str = "normal", t_thresh: float = 0.5, shift: float = SHIFT) -> list[float]:
    """Model timesteps (1000·σ, σ after the shift) of a schedule; the Euler steps end at σ = 0.

    normal: shift(linspace(1, 0.001, N)) (50 steps: 1000.0, 998.27, ..., 207.77, 11.87);
    distilled: the 16-step list (1000.0 ... 510.6); enhance_hf: the normal timesteps > 500 then
    500, 450, ..., 50 (56 steps for N = 50); refine: 1000·t_thresh then the normal timesteps below it
    (t_thresh 0.5, N = 50: 500, 443.02, 343.47, 207.77, 11.87)."""
    if schedule not in SCHEDULES:
        raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if schedule == "distilled":
        return (shift_sigmas(base_sigmas(steps, True), shift) * NUM_TRAIN_TIMESTEPS).tolist()
    normal = shift_sigmas(base_sigmas(steps), shift) * NUM_TRAIN_TIMESTEPS
    if schedule == "normal":
        return normal.tolist()
    return _derived_timesteps(normal, schedule, t_thresh).tolist()


def set_scheduler(scheduler, steps: int, schedule: str = "normal", device=None, t_thresh: float = 0.5) -> list[float]:
    """Configure the checkpoint's FlowMatchEulerDiscreteScheduler for a schedule; returns its timesteps.

    normal/distilled go through ``set_timesteps(sigmas=...)`` (the scheduler applies its shift).
    enhance_hf/refine are explicit timesteps with σ = t/1000 and no further shift: the scheduler has
    no argument for that, so, like the official pipeline, its ``timesteps``/``sigmas`` are replaced
    right after ``set_timesteps`` reset its step index."""
    if schedule not in SCHEDULES:
        raise SampleError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise SampleError("the checkpoint's scheduler uses dynamic shifting; LongCat-Video samples with a static "
                          f"shift of {SHIFT:g} (scheduler_config.json: use_dynamic_shifting=false, shift={SHIFT})")
    distilled = schedule == "distilled"
    scheduler.set_timesteps(steps, sigmas=base_sigmas(steps, distilled).tolist(), device=device)
    if schedule in ("enhance_hf", "refine"):
        ts = _derived_timesteps(scheduler.timesteps, schedule, t_thresh)
        scheduler.timesteps = ts
        scheduler.sigmas = torch.cat([ts / NUM_TRAIN_TIMESTEPS, ts.new_zeros(1)])
    return scheduler.timesteps.tolist()
