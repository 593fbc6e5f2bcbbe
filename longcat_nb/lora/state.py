"""The kit's internal LoRA layout (PEFT keys, ``transformer.<module>.lora_A/B.weight``) that every file
layout converts to and from, with each module's alpha beside it (scale = alpha / rank)."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

PEFT_PREFIX = "transformer."
_PEFT_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """A LoRA file or setting that cannot be used as it is."""


@dataclass
class LoraInfo:
    layout: str  # the layout the file was in: peft | official | comfy
    ranks: dict = field(default_factory=dict)  # module path -> rank
    alphas: dict = field(default_factory=dict)  # module path -> alpha (PEFT meaning: scale = alpha/rank)
    metadata: dict = field(default_factory=dict)  # the raw safetensors header (JSON strings)
    path: str = ""
    adapter: str = "lora"  # lora | dora | loha | lokr (lora/kinds.py)

    def value(self, key: str, default=None):
        """A header entry decoded from JSON (plain strings come back as they are)."""
        if key not in self.metadata:
            return default
        try:
            return json.loads(self.metadata[key])
        except (TypeError, ValueError):
            return self.metadata[key]


def _group_keys(state: dict, pattern: re.Pattern, where: str, layout: str, expected: str, part=None) -> dict:
    """module -> {part: tensor} from the keys ``pattern`` splits into (module, part); other keys are errors."""
    groups: dict = {}
    for k, v in state.items():
        m = pattern.match(k)
        if not m:
            raise LoraError(f"{where}unexpected key {k!r} in a {layout}-layout LoRA (expected {expected})")
        groups.setdefault(m.group(1), {})[part(m.group(2)) if part else m.group(2)] = v
    return groups


def _peft_modules(state: dict, where: str = "") -> dict:
    """module path -> {"A": [r, in], "B": [out, r]}; checks that the pairs fit together."""
    mods = _group_keys(state, _PEFT_KEY, where, "PEFT", "transformer.<module>.lora_A.weight / .lora_B.weight")
    for mod, t in mods.items():
        if set(t) != {"A", "B"}:
            raise LoraError(f"{where}module {mod!r} has only lora_{''.join(t)}; a LoRA needs both lora_A and lora_B")
        if t["A"].dim() != 2 or t["B"].dim() != 2 or t["A"].shape[0] != t["B"].shape[1]:
            raise LoraError(f"{where}module {mod!r}: lora_A {tuple(t['A'].shape)} and lora_B "
                            f"{tuple(t['B'].shape)} do not make a LoRA (need A [r, in], B [out, r])")
    return mods


def _peft_state(mods: dict) -> dict:
    out = {}
    for mod, t in mods.items():
        out[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = t["A"]
        out[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = t["B"]
    return out


def _ranks(state: dict) -> dict:
    return {m: int(t["A"].shape[0]) for m, t in _peft_modules(state).items()}


def _most_common(values) -> float:
    return Counter(values).most_common(1)[0][0]


def _rank_alpha_patterns(ranks: dict, alphas: dict) -> tuple[int, float, dict, dict]:
    """peft's (r, lora_alpha, rank_pattern, alpha_pattern) with exact module names as pattern keys."""
    r = int(_most_common(ranks.values()))
    a = float(_most_common(alphas[m] for m in ranks if ranks[m] == r))
    return (r, a, {m: v for m, v in ranks.items() if v != r},
            {m: float(alphas[m]) for m in ranks if float(alphas[m]) != a})


def _lora_config_kwargs(ranks: dict, alphas: dict) -> dict:
    """LoraConfig kwargs for exactly these modules: patterns anchored, so 'blocks.1.x' never matches 'blocks.11.x'."""
    r, a, rp, ap = _rank_alpha_patterns(ranks, alphas)
    exact = lambda d: {f"^{re.escape(m)}": v for m, v in d.items()}  # noqa: E731
    return {"r": r, "lora_alpha": a, "rank_pattern": exact(rp), "alpha_pattern": exact(ap),
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
            "lora_bias": False, "use_rslora": False, "init_lora_weights": True}


def _json_header(metadata: Optional[dict]) -> dict:
    return {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}


def _alphas_from_meta(ranks: dict, metadata: dict) -> dict:
    def num(key):
        v = metadata.get(key)
        try:
            return float(json.loads(v) if isinstance(v, str) else v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    rank, alpha = num("rank"), num("alpha")
    if alpha and rank:
        return {m: alpha * r / rank for m, r in ranks.items()}
    return {m: float(r) for m, r in ranks.items()}


def delta_weights(state: dict, alphas: dict) -> dict:
    """module -> ΔW = alpha/r · B·A (in float32 at least): what the LoRA adds to each weight (scale 1)."""
    def up(x):
        return x.to(torch.promote_types(x.dtype, torch.float32))

    return {m: float(alphas[m]) / t["A"].shape[0] * (up(t["B"]) @ up(t["A"])) for m, t in _peft_modules(state).items()}
