"""The PEFT/diffusers layout (ours, the default) of one target Linear at module path P:
``transformer.P.lora_A.weight`` [r, in], ``transformer.P.lora_B.weight`` [out, r]; ΔW = alpha/r · B·A.

The header holds ``rank``/``alpha`` (the most common values), ``rank_pattern``/``alpha_pattern`` (exact
module names, only where they differ), ``targets``, ``base_model``, ``steps``, ``settings`` (JSON strings),
and diffusers' own ``lora_adapter_metadata`` (a ``transformer.``-prefixed LoraConfig), so
``model.load_lora_adapter(file, prefix="transformer")`` in diffusers reads the right alphas without us.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from ...io import atomic_save_safetensors
from .. import kinds
from ..state import (PEFT_PREFIX, LoraError, _alphas_from_meta, _json_header, _lora_config_kwargs, _peft_modules,
                     _peft_state, _rank_alpha_patterns)

logger = logging.getLogger("longcat_nb.lora")
FILE_SUFFIX = ""  # lora-stepN.safetensors


def detect(state: dict) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or ".hada_w" in k or ".lokr_w" in k for k in state)


def to_internal(state: dict, where: str = "", meta: Optional[dict] = None) -> tuple[dict, dict]:
    """(PEFT state, alphas): the alphas come from the header (``meta``)."""
    if kinds.adapter_of(state) != "lora":
        ranks = kinds.ranks(state, header_ranks(meta or {}, state), where)
        return kinds.peft_state(kinds.modules(state, where)), _alphas_from_header(meta or {}, ranks, where)
    mods = _peft_modules(state, where)
    ranks = {m: int(t["A"].shape[0]) for m, t in mods.items()}
    return _peft_state(mods), _alphas_from_header(meta or {}, ranks, where)


def header_ranks(meta: dict, state: dict) -> dict:
    """module -> rank as the header gives it (a LoKr with whole factors has none in its tensors)."""
    try:
        rank, pattern = json.loads(meta.get("rank", "null")), json.loads(meta.get("rank_pattern", "{}"))
    except ValueError:
        return {}
    return {m: int(_pattern_value(pattern, m, rank)) for m in kinds.modules(state)} if rank else {}


def from_internal(state: dict, alphas: Optional[dict] = None) -> dict:
    """The tensors as they are (checked); the alphas go in the header (``save``)."""
    return _peft_state(_peft_modules(state))


def _pattern_value(patterns: dict, module: str, default):
    """peft's pattern rule (``get_pattern_key``): an exact name first, then a regex on the name's tail."""
    if module in patterns:
        return patterns[module]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _alphas_from_header(meta: dict, ranks: dict, where: str) -> dict:
    def js(key, default=None):
        try:
            return json.loads(meta[key]) if key in meta else default
        except ValueError:
            raise LoraError(f"{where}header entry {key!r} is not valid JSON ({meta[key][:80]!r}); re-export the file")

    if "lora_alphas" in meta:  # per-module table (files written by earlier versions of this kit)
        table = {k: float(v) for k, v in js("lora_alphas").items()}
        return {m: table.get(m, float(r)) for m, r in ranks.items()}
    if "alpha" in meta and js("alpha") not in (None, ""):
        alpha, pattern = float(js("alpha")), js("alpha_pattern", {}) or {}
        return {m: float(_pattern_value(pattern, m, alpha)) for m in ranks}
    if "lora_adapter_metadata" in meta:  # diffusers / SimpleTuner: a prefixed LoraConfig
        cfg = js("lora_adapter_metadata")
        cfg = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in cfg.items()}
        if "lora_alpha" in cfg:
            alpha, pattern = float(cfg["lora_alpha"]), cfg.get("alpha_pattern") or {}
            return {m: float(_pattern_value(pattern, m, alpha)) for m in ranks}
    logger.warning("%sno alpha in the header: using alpha = rank (scale 1.0, the diffusers convention)", where)
    return {m: float(r) for m, r in ranks.items()}


def save_lora(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None) -> Path:
    """Write the PEFT/diffusers layout atomically. ``alphas`` (module -> alpha) default to the
    metadata's ``alpha`` at its ``rank`` (scale alpha/rank for every module), else alpha = rank.
    DoRA/LoHa/LoKr (lora/kinds.py) keep peft's own keys."""
    kind = kinds.adapter_of(state)
    tensors = _peft_state(_peft_modules(state, f"{path}: ")) if kind == "lora" else \
        kinds.peft_state(kinds.modules(state, f"{path}: "))
    ranks = kinds.ranks(state)
    meta = dict(metadata or {})
    if alphas is None:
        alphas = _alphas_from_meta(ranks, meta)
    alphas = {m: float(alphas[m]) for m in ranks if m in alphas}
    if missing := sorted(set(ranks) - set(alphas)):
        raise LoraError(f"{path}: no alpha given for modules {missing[:3]}")
    r, a, rank_pattern, alpha_pattern = _rank_alpha_patterns(ranks, alphas)
    for key in ("format", "rank_pattern", "alpha_pattern", "lora_ranks", "lora_alphas"):  # ours, from the tensors
        meta.pop(key, None)
    meta.setdefault("targets", sorted({m.split(".", 2)[2] if m.startswith("blocks.") else m for m in ranks}))
    header = _json_header(meta)
    header.update(format="pt", lora_layout="peft", adapter=kind, rank=json.dumps(r), alpha=json.dumps(a))
    if kind in ("lora", "dora"):  # diffusers' load_lora_adapter reads LoRA and DoRA, not LoHa/LoKr
        config = {**_lora_config_kwargs(ranks, alphas), "use_dora": kind == "dora"}
        header["lora_adapter_metadata"] = json.dumps({PEFT_PREFIX + k: v for k, v in config.items()}, sort_keys=True)
    if rank_pattern:
        header["rank_pattern"] = json.dumps(rank_pattern)
    if alpha_pattern:
        header["alpha_pattern"] = json.dumps(alpha_pattern)
    return atomic_save_safetensors(path, tensors, metadata=header)


save = save_lora
