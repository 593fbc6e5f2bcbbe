"""The official layout (spec §9) of one target Linear at module path P:
``lora___lorahyphen___<P with . -> ___lorahyphen___>`` + ``.lora_down.weight`` [n·r, in],
``.lora_up.weight`` [out, r] or ``.lora_up.blocks.{j}.weight`` [out/n, r] (n-way split of the output
rows), ``.alpha_scale`` (0-d). ΔW = alpha_scale · blockdiag(up_0..up_{n-1}) · down. Loaded by the official
``dit.load_lora(path, key, lora_network_dim=r)``, which takes ONE rank r for every module.

The official demos' ``load_lora`` builds every module at ``lora_network_dim`` (128 by default) and loads
with strict=True, so ``official_tensors`` pads every module to one rank: zero rows in lora_down and zero
columns in lora_up leave ΔW = alpha_scale · up · down unchanged.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ...io import atomic_save_safetensors
from ..kinds import require_lora
from ..state import LoraError, _alphas_from_meta, _peft_modules, _peft_state, _ranks

OFFICIAL_SEP = "___lorahyphen___"
OFFICIAL_PREFIX = "lora" + OFFICIAL_SEP
OFFICIAL_RANK = 128  # lora_network_dim of the official dit.load_lora (and of the shipped LoRAs)
FILE_SUFFIX = "-official"


def detect(state: dict) -> bool:
    return any(k.startswith(OFFICIAL_PREFIX) for k in state)


def to_internal(state: dict, where: str = "", meta: Optional[dict] = None) -> tuple[dict, dict]:
    """(PEFT state, alphas); the header plays no part (alpha_scale is a tensor)."""
    return official_to_peft(state, where)


def _official_name(module: str) -> str:
    return OFFICIAL_PREFIX + module.replace(".", OFFICIAL_SEP)


def official_to_peft(state: dict, where: str = "") -> tuple[dict, dict]:
    """Official layout -> (PEFT state, alphas). n-split ups become one block-diagonal B of rank
    r' = n·r, and alpha = alpha_scale · r', so alpha / r' = alpha_scale: exact."""
    groups: dict = {}
    for k, v in state.items():
        name, dot, rest = k.partition(".")
        if not k.startswith(OFFICIAL_PREFIX) or not dot:
            raise LoraError(f"{where}unexpected key {k!r} in an official-layout LoRA")
        groups.setdefault(name, {})[rest] = v
    mods, alphas = {}, {}
    for name, parts in groups.items():
        module = name[len(OFFICIAL_PREFIX):].replace(OFFICIAL_SEP, ".")
        ups = {int(m.group(1)): v for p, v in parts.items()
               if (m := re.fullmatch(r"lora_up\.blocks\.(\d+)\.weight", p))}
        known = {"lora_down.weight", "lora_up.weight", "alpha_scale"} | {f"lora_up.blocks.{j}.weight" for j in ups}
        if extra := sorted(set(parts) - known):
            raise LoraError(f"{where}unexpected key {name}.{extra[0]} in an official-layout LoRA")
        if "lora_down.weight" not in parts or ("lora_up.weight" in parts) == bool(ups):
            raise LoraError(f"{where}module {module!r} needs lora_down.weight and either lora_up.weight or "
                            f"lora_up.blocks.<j>.weight (found {sorted(parts)})")
        if "alpha_scale" not in parts:
            raise LoraError(f"{where}{name}.alpha_scale is missing (official files always carry it); "
                            f"add it as a 0-d tensor alpha/rank")
        down = parts["lora_down.weight"]
        if "lora_up.weight" in parts:
            up = parts["lora_up.weight"]
        else:
            if sorted(ups) != list(range(len(ups))) or len({tuple(u.shape) for u in ups.values()}) != 1:
                raise LoraError(f"{where}module {module!r}: lora_up.blocks must be numbered 0..n-1 with equal shapes")
            up = torch.block_diag(*[ups[j] for j in range(len(ups))])
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"{where}module {module!r}: lora_down {tuple(down.shape)} and lora_up (as one matrix) "
                            f"{tuple(up.shape)} do not fit (need down [n·r, in], up blocks [out/n, r])")
        mods[module] = {"A": down, "B": up}
        alphas[module] = float(parts["alpha_scale"]) * down.shape[0]
    return _peft_state(mods), alphas


def _split_blockdiag(B: torch.Tensor, n: int) -> Optional[list]:
    """The n diagonal blocks of B if everything off them is exactly zero, else None."""
    out, r2 = B.shape
    if out % n or r2 % n:
        return None
    o, r = out // n, r2 // n
    blocks = []
    for j in range(n):
        rows = B[j * o:(j + 1) * o]
        if rows[:, :j * r].count_nonzero() or rows[:, (j + 1) * r:].count_nonzero():
            return None
        blocks.append(rows[:, j * r:(j + 1) * r].clone())
    return blocks


def peft_to_official(state: dict, alphas: dict, network_rank: Optional[int] = None) -> dict:
    """PEFT layout -> official layout: lora_down = A, lora_up = B (n = 1), alpha_scale = alpha/r as a
    0-d float32. With ``network_rank`` R, a module of rank n·R whose B is exactly block-diagonal is
    written n-split (``lora_up.blocks.j``) so every module has the one rank the official loader takes."""
    require_lora(state, "official")
    out = {}
    for module, t in _peft_modules(state).items():
        name, r2 = _official_name(module), t["A"].shape[0]
        if module not in alphas:
            raise LoraError(f"no alpha for module {module!r}")
        out[f"{name}.lora_down.weight"] = t["A"]
        out[f"{name}.alpha_scale"] = torch.tensor(float(alphas[module]) / r2, dtype=torch.float32)
        ups = None
        if network_rank and r2 != network_rank:
            ups = _split_blockdiag(t["B"], r2 // network_rank) if r2 % network_rank == 0 else None
            if ups is None:
                raise LoraError(f"module {module!r} has rank {r2}, and its lora_B is not {r2 // max(network_rank, 1)} "
                                f"blocks of rank {network_rank}: the official loader takes one rank "
                                f"(lora_network_dim) for all modules. Keep this LoRA in the PEFT layout")
            for j, u in enumerate(ups):
                out[f"{name}.lora_up.blocks.{j}.weight"] = u
        else:
            out[f"{name}.lora_up.weight"] = t["B"]
    return out


def pad_rank(state: dict, alphas: dict, rank: int) -> tuple[dict, dict]:
    """Modules of rank r < ``rank`` padded to ``rank`` (zero rows in A, zero columns in B; alpha scaled
    by rank/r so alpha/rank stays alpha/r): ΔW is unchanged, exactly. Other modules as they are."""
    mods, new_alphas = {}, {}
    for module, t in _peft_modules(state).items():
        A, B, r = t["A"], t["B"], t["A"].shape[0]
        if r < rank:
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        mods[module] = {"A": A, "B": B}
        new_alphas[module] = float(alphas[module]) * max(rank, r) / r
    return _peft_state(mods), new_alphas


def official_tensors(state: dict, alphas: dict, network_rank: int = OFFICIAL_RANK) -> dict:
    """The official layout at one rank ``network_rank`` for every module: smaller ranks padded with
    zeros, a rank n·R module with a block-diagonal lora_B written n-split (peft_to_official)."""
    if int(network_rank) < 1:
        raise LoraError(f"network_rank={network_rank}: use the lora_network_dim the loader is called with "
                        f"({OFFICIAL_RANK} in the official demos)")
    padded, padded_alphas = pad_rank(state, alphas, int(network_rank))
    try:
        return peft_to_official(padded, padded_alphas, network_rank=int(network_rank))
    except LoraError as e:
        raise LoraError(f"{e}; or export with network_rank >= the largest rank "
                        f"({max(_ranks(state).values())}) and load with that lora_network_dim") from None


def official_usage(network_rank: int) -> str:
    """The official code's call that loads an official file written at ``network_rank``."""
    dim = "" if int(network_rank) == OFFICIAL_RANK else f", lora_network_dim={int(network_rank)}"
    return (f"pipe.dit.load_lora(path, 'my_lora'{dim}); pipe.dit.enable_loras(['my_lora']) "
            "(alpha_scale is in the file)")


def save_official_padded(path, state: dict, alphas: dict, network_rank: int = OFFICIAL_RANK) -> Path:
    try:
        tensors = official_tensors(state, alphas, network_rank)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from e
    header = {"format": "pt", "lora_layout": "official", "rank": str(int(network_rank)),
              "trained_ranks": json.dumps(sorted(set(_ranks(state).values()))),
              "usage": official_usage(network_rank)}
    return atomic_save_safetensors(path, tensors, metadata=header)


def save_official(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None,
                  network_rank: Optional[int] = None) -> Path:
    """Official layout, loadable with ``dit.load_lora(path, key, lora_network_dim=<rank>)`` (the rank
    is in the header; alpha_scale is in the file and overrides the loader's alpha). ``network_rank``
    (e.g. OFFICIAL_RANK, the demos' default 128): every module padded to that one rank."""
    require_lora(state, "official", f"{path}: ")
    ranks = _ranks(state)
    alphas = alphas or _alphas_from_meta(ranks, dict(metadata or {}))
    if network_rank is not None:
        return save_official_padded(path, state, alphas, network_rank)
    rank = min(ranks.values())
    try:
        tensors = peft_to_official(state, alphas, network_rank=rank if len(set(ranks.values())) > 1 else None)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from e
    header = {"format": "pt", "lora_layout": "official", "rank": str(rank),
              "usage": f"dit.load_lora(path, key, lora_network_dim={rank}); alpha_scale is in the file"}
    return atomic_save_safetensors(path, tensors, metadata=header)


from_internal = peft_to_official
save = save_official
