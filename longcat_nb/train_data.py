"""What training takes from the dataset list: which samples are drawn how often, how each one weighs in
the loss (its entry's loss weight, its loss mask), and the eval loss on the held-out samples.

* ``training_groups``: the trainer's shape groups with eval samples left out and every other sample
  listed ``repeats`` times, so an epoch draws it that often; the order stays a function of (seed,
  epoch), so a resumed run continues exactly (train.MicroBatches).
* ``batch_weights``: the ``loss_mask`` [B, 1, T, h, w] and ``sample_weight`` [B] of a batch, or
  nothing for a batch of plain train samples (the loss is then computed exactly as before).
* ``EvalLoss``: the mean loss over the eval samples at fixed sigmas with fixed noise (seeded by each
  sample's cache key), without caption dropout, so the same LoRA scores the same in any run.
"""
from __future__ import annotations

from typing import Optional

import torch

EVAL_SIGMAS = (0.2, 0.4, 0.6, 0.8)  # spread over the schedule; fixed so curves from two runs compare
EVAL_SEED = 20_240_601  # the eval noise does not depend on train.seed either


def sample_meta(dataset, i: int) -> dict:
    """A sample's role, loss weight and repeats without reading its tensors (CachedDataset keeps the
    record in its manifest); datasets without records count as plain train samples."""
    from .cache_read import sample_role

    meta = getattr(dataset, "entry_meta", None)
    return sample_role((meta(i).get("record") or {}) if meta is not None else {})


def training_groups(dataset, groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """``groups`` (train.group_by_shape) without eval samples, each other index ``repeats`` times."""
    out = {}
    for key, indices in groups.items():
        drawn = []
        for i in indices:
            m = sample_meta(dataset, i)
            drawn += [] if m["role"] == "eval" else [i] * m["repeats"]
        if drawn:
            out[key] = drawn
    if not out:
        raise ValueError("nothing to train on: every cached sample is held out for evaluation (role \"eval\", "
                         "eval_fraction or eval_files); give a train entry in 01_dataset and re-run 01 and 02")
    return out


def bucket_tokens(group: str) -> int:
    """Latent tokens of one clip of a group ``HxW@F|condN`` (train.group_by_shape's key)."""
    from .planner import PlanSettings, tokens  # the one token count, the planner's

    size, frames = group.split("|")[0].split("@")
    h, w = (int(v) for v in size.lower().split("x"))
    return tokens(PlanSettings(height=h, width=w, num_frames=int(frames)))


def bucket_batch_sizes(groups: dict[str, list[int]], batch_size: int, batch_tokens: int = 0) -> dict[str, int]:
    """Clips per batch in each group: ``batch_size``, or with ``batch_tokens`` > 0 as many clips as fit
    that many latent tokens (never fewer than batch_size), so short or small buckets use the GPU as
    the largest one does."""
    from .planner import clips_per_batch

    return {k: clips_per_batch(bucket_tokens(k), batch_size, batch_tokens) for k in groups}


def collate(items: list[dict], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack a batch; an I2V item's first latent frame becomes its image latent."""
    n = int(items[0].get("num_cond_latents", 0))
    lat = []
    for it in items:
        x = it["latents"].float()
        if n and it.get("cond_latents") is not None:
            x = torch.cat([it["cond_latents"].float(), x[:, n:]], dim=1)
        lat.append(x)
    x0 = torch.stack(lat).to(device)
    text = torch.stack([it["text_embeds"] for it in items]).to(device, dtype)
    mask = torch.stack([it["text_mask"] for it in items]).to(device)
    return x0, text, mask, n


def eval_indices(dataset) -> list[int]:
    return [i for i in range(len(dataset)) if sample_meta(dataset, i)["role"] == "eval"]


def batch_weights(items: list[dict], device) -> dict:
    """flow_matching_loss's ``loss_mask``/``sample_weight`` for a batch; {} when every item is a plain
    train sample, so such batches take the loss's unweighted path."""
    out = {}
    weights = [float(it.get("loss_weight", 1.0)) for it in items]
    if any(w != 1.0 for w in weights):
        out["sample_weight"] = torch.tensor(weights, device=device)
    masks = [it.get("loss_mask") for it in items]
    if any(m is not None for m in masks):
        shape = next(m for m in masks if m is not None).shape
        out["loss_mask"] = torch.stack([torch.ones(shape) if m is None else m.float() for m in masks]).to(device)
    return out


class EvalLoss:
    """The loss on the eval samples, the same numbers for the same LoRA in any run: every sample is
    scored at each of EVAL_SIGMAS with noise drawn from its cache key, with its real caption."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    @torch.no_grad()
    def __call__(self, dit, device, dtype) -> float:
        from .flow import flow_matching_loss

        was_training = dit.training
        dit.eval()  # no LoRA dropout while scoring
        total, n = 0.0, 0
        try:
            for i in self.indices:
                item = self.dataset[i]
                x0, text, mask, n_cond = collate([item], device, dtype)
                weights = {k: v for k, v in batch_weights([item], device).items() if k == "loss_mask"}
                key = item.get("key")
                gen = torch.Generator().manual_seed(EVAL_SEED + (int(key[:12], 16) if key else i))
                for sigma in EVAL_SIGMAS:
                    noise = torch.randn(x0.shape, generator=gen).to(device)
                    loss = flow_matching_loss(dit, x0, text, mask, torch.tensor([sigma], device=device), noise,
                                              n_cond, **weights)
                    total, n = total + float(loss), n + 1
        finally:
            dit.train(was_training)
        return total / max(1, n)


def eval_loss_for(dataset, every: int, log) -> Optional[EvalLoss]:
    """The run's EvalLoss, or None (eval_every = 0; or no eval sample, said once in the log)."""
    if not every:
        return None
    indices = eval_indices(dataset)
    if not indices:
        log(f"eval_every={every} but the dataset has no eval sample: add a dataset entry with role \"eval\" (or "
            "eval_fraction / eval_files on a train entry) in 01_dataset; no eval loss is computed")
        return None
    log(f"eval loss every {every} steps on {len(indices)} held-out sample(s) at sigmas {list(EVAL_SIGMAS)}")
    return EvalLoss(dataset, indices)
