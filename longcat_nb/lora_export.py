"""LoRA files that load at the trained scale in every consumer.

A PEFT-layout file has no tensor for alpha: header-aware readers (this kit, diffusers'
``load_lora_adapter``, peft with the header's LoraConfig) take alpha from the header; readers that
ignore headers (older diffusers, plain state-dict code, ComfyUI) use alpha = rank, i.e. scale 1. So:

* every PEFT file the kit writes (checkpoints included) has the per-module alphas in its header;
* ``fold_alpha`` multiplies lora_B by alpha/r and sets alpha = r, so a header-blind reader is exact too
  (an option for exports only: checkpoints keep the trained B so a resume is bit-identical);
* the ComfyUI layout carries ``.alpha`` tensors and the official one ``alpha_scale`` (lora.py);
* ``official_tensors`` pads every module to one rank (the official demos' ``load_lora`` builds every
  module at ``lora_network_dim``, 128 by default, and loads with strict=True): zero rows in lora_down and
  zero columns in lora_up leave ΔW = alpha_scale · up · down unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from . import lora as L
from .io import atomic_save_safetensors

OFFICIAL_RANK = 128  # lora_network_dim of the official dit.load_lora (and of the shipped LoRAs)


def fold_alpha(state: dict, alphas: dict) -> tuple[dict, dict]:
    """(state with lora_B · alpha/r, alphas = r): the same ΔW at scale alpha/r = 1, which is what a
    reader that ignores the header assumes."""
    mods, new_alphas = {}, {}
    for module, t in L._peft_modules(state).items():
        r = t["A"].shape[0]
        mods[module] = {"A": t["A"], "B": t["B"] * (float(alphas[module]) / r)}
        new_alphas[module] = float(r)
    return L._peft_state(mods), new_alphas


def pad_rank(state: dict, alphas: dict, rank: int) -> tuple[dict, dict]:
    """Modules of rank r < ``rank`` padded to ``rank`` (zero rows in A, zero columns in B; alpha scaled
    by rank/r so alpha/rank stays alpha/r): ΔW is unchanged, exactly. Other modules as they are."""
    mods, new_alphas = {}, {}
    for module, t in L._peft_modules(state).items():
        A, B, r = t["A"], t["B"], t["A"].shape[0]
        if r < rank:
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        mods[module] = {"A": A, "B": B}
        new_alphas[module] = float(alphas[module]) * max(rank, r) / r
    return L._peft_state(mods), new_alphas


def official_tensors(state: dict, alphas: dict, network_rank: int = OFFICIAL_RANK) -> dict:
    """The official layout at one rank ``network_rank`` for every module: smaller ranks padded with
    zeros, a rank n·R module with a block-diagonal lora_B written n-split (lora.peft_to_official)."""
    if int(network_rank) < 1:
        raise L.LoraError(f"network_rank={network_rank}: use the lora_network_dim the loader is called with "
                          f"({OFFICIAL_RANK} in the official demos)")
    padded, padded_alphas = pad_rank(state, alphas, int(network_rank))
    try:
        return L.peft_to_official(padded, padded_alphas, network_rank=int(network_rank))
    except L.LoraError as e:
        raise L.LoraError(f"{e}; or export with network_rank >= the largest rank "
                          f"({max(L._ranks(state).values())}) and load with that lora_network_dim") from None


def official_usage(network_rank: int) -> str:
    """The official code's call that loads an official file written at ``network_rank``."""
    dim = "" if int(network_rank) == OFFICIAL_RANK else f", lora_network_dim={int(network_rank)}"
    return (f"pipe.dit.load_lora(path, 'my_lora'{dim}); pipe.dit.enable_loras(['my_lora']) "
            "(alpha_scale is in the file)")


def save_official_padded(path, state: dict, alphas: dict, network_rank: int = OFFICIAL_RANK) -> Path:
    try:
        tensors = official_tensors(state, alphas, network_rank)
    except L.LoraError as e:
        raise L.LoraError(f"{path}: {e}") from e
    header = {"format": "pt", "lora_layout": "official", "rank": str(int(network_rank)),
              "trained_ranks": json.dumps(sorted(set(L._ranks(state).values()))),
              "usage": official_usage(network_rank)}
    return atomic_save_safetensors(path, tensors, metadata=header)


def save_trained(path, model, metadata: Optional[dict] = None, fold: bool = False,
                 adapter_name: str = "default") -> Path:
    """The adapter being trained in ``model`` as a PEFT-layout file whose header holds each module's
    alpha as trained (``fold``: alpha folded into lora_B, header alpha = rank)."""
    state = L.lora_state_dict(model, adapter_name)
    _, alphas = L.module_ranks_alphas(model, adapter_name)
    meta = dict(metadata or {})
    for key in ("rank", "alpha"):  # the header's rank/alpha are recomputed from the tensors and alphas
        meta.pop(key, None)
    if fold:
        meta["alpha_folded"] = True
        meta["trained_alphas"] = sorted(set(alphas.values()))
        state, alphas = fold_alpha(state, alphas)
    return L.save_lora(path, state, meta, alphas=alphas)


def run_metadata(run_dir, step: int) -> dict:
    """Header entries of a run's LoRA file: the step, and the text encoder its cache was built with (a
    LoRA trained on Qwen2.5-VL embeddings must be sampled with them: text.required_encoder reads it)."""
    from .cache import CacheError
    from .cache_manifest import cache_text_encoder

    meta: dict = {"steps": int(step)}
    try:
        enc = cache_text_encoder(run_dir)
    except CacheError:  # a damaged manifest does not stop a save; the file is then assumed UMT5
        enc = None
    if enc is not None:
        meta["text_encoder"] = enc
    return meta


def usage_of(path) -> str:
    """How to load a LoRA file the kit wrote, from its header (the official call for official files)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("usage", "")
