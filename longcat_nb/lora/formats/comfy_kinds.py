"""DoRA, LoHa and LoKr in the ComfyUI layout, with the module names of comfy.py. Key names and scales as
ComfyUI core reads them (``comfy/weight_adapter/{lora,loha,lokr,base}.py``, LyCORIS/kohya names):

* DoRA: ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` + ``dora_scale`` [out, 1] (the magnitude
  per output row, peft's orientation; 2-d so ComfyUI never broadcasts it against the wrong axis);
* LoHa: ``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` / ``alpha``; scale alpha / rows of w1_b;
* LoKr: ``lokr_w1`` (or ``lokr_w1_a``/``_b``) / ``lokr_w2`` (or ``lokr_w2_a``/``_b``) / ``alpha``; ComfyUI
  scales by alpha / rows of w2_b (else of w1_b) and by 1 when neither factor is split, so there the
  scale is folded into lokr_w1.

A fused qkv (kv) module is split by output rows, as for LoRA: the factors that make the rows (lora_up
and the magnitude; hada_w1_a and hada_w2_a; LoKr's w1, whose rows must divide evenly) are split, the
others shared. Reading fuses the parts back when their shared factors and scales agree: exact.
"""
from __future__ import annotations

import re

import torch

from ..kinds import adapter_of, modules, peft_state, ranks
from ..state import LoraError

_KEY = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.|transformer\.)?(.+?)\.(hada_w[12]_[ab]|"
                  r"lokr_w[12](?:_[ab])?|lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|"
                  r"dora_scale|alpha)$")
_TO_COMFY = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
             "lora_magnitude_vector": "dora_scale"}
_FROM_COMFY = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "lora_A.weight": "lora_A.weight",
               "lora_B.weight": "lora_B.weight", "dora_scale": "lora_magnitude_vector"}
_ROWS = {"dora": ("lora_B.weight", "lora_magnitude_vector"), "loha": ("hada_w1_a", "hada_w2_a"),
         "lokr": ("lokr_w1", "lokr_w1_a")}  # the parts split by output rows; the rest is shared


def is_comfy_kind(state: dict) -> bool:
    return any(re.search(r"\.(dora_scale|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$", k) for k in state)


def _comfy_dim(kind: str, t: dict):
    """The rank ComfyUI divides alpha by (None: it uses scale 1)."""
    if kind == "loha":
        return t["hada_w1_b"].shape[0]
    if kind == "lokr":
        part = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        return None if part is None else part.shape[0]
    return t["lora_A.weight"].shape[0]


def peft_kinds_to_comfy(state: dict, alphas: dict) -> dict:
    from .comfy import COMFY_PREFIX, _comfy_names

    kind, rank, out = adapter_of(state), ranks(state), {}
    for module, t in modules(state).items():
        if module not in alphas:
            raise LoraError(f"no alpha for module {module!r}")
        names, scale = _comfy_names(module), float(alphas[module]) / rank[module]
        split = [p for p in _ROWS[kind] if p in t]
        if any(t[p].shape[0] % len(names) for p in split):
            raise LoraError(f"module {module!r}: the {kind}'s {split[0]} has {t[split[0]].shape[0]} rows, not "
                            f"divisible into the {len(names)} projections ComfyUI names ({', '.join(names)}); "
                            f"export it in the peft layout (at full size, 12288 and 8192 rows give LoKr's w1 96 and 64 rows: "
                            f"they split)")
        chunks = {p: t[p].chunk(len(names), dim=0) for p in split}
        for j, name in enumerate(names):
            part = {p: (chunks[p][j] if p in chunks else v).clone() for p, v in t.items()}
            dim = _comfy_dim(kind, part)
            if dim is None:  # ComfyUI applies no alpha to a whole-factor LoKr: fold the scale into w1
                part["lokr_w1"] = part["lokr_w1"] * scale
            else:
                out[f"{COMFY_PREFIX}{name}.alpha"] = torch.tensor(scale * dim, dtype=torch.float32)
            if kind == "dora":
                part["lora_magnitude_vector"] = part["lora_magnitude_vector"].reshape(-1, 1)
            out.update({f"{COMFY_PREFIX}{name}.{_TO_COMFY.get(p, p)}": v for p, v in part.items()})
    return out


def comfy_kinds_to_peft(state: dict, where: str = "") -> tuple[dict, dict]:
    """ComfyUI DoRA/LoHa/LoKr -> (peft state, alphas), q/k/v (k/v) parts fused back into one module."""
    from .comfy import _from_comfy_name

    groups: dict = {}
    for k, v in state.items():
        m = _KEY.match(k)
        if not m:
            raise LoraError(f"{where}unexpected key {k!r} in a ComfyUI DoRA/LoHa/LoKr file")
        groups.setdefault(m.group(1), {})[_FROM_COMFY.get(m.group(2), m.group(2))] = v
    fused: dict = {}
    for name, t in groups.items():
        alpha = t.pop("alpha", None)
        if "lora_magnitude_vector" in t:
            t["lora_magnitude_vector"] = _magnitude(t, name, where)
        kind = adapter_of({f"{name}.{p}": v for p, v in t.items()})
        dim = _comfy_dim(kind, t) if kind in _ROWS else None
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        ours, j, n = _from_comfy_name(name)
        fused.setdefault(ours, {"n": n, "kind": kind, "parts": {}})["parts"][j] = (t, scale)
    mods, scales = {}, {}
    for ours, g in fused.items():
        mods[ours], scales[ours] = _fuse(ours, g, where)
    state = peft_state(mods)
    rank = ranks(state)
    return state, {m: scales[m] * rank[m] for m in mods}


def _magnitude(t: dict, name: str, where: str) -> torch.Tensor:
    m, out = t["lora_magnitude_vector"], t["lora_B.weight"].shape[0]
    if m.numel() != out or (m.dim() == 2 and m.shape[0] != out):
        raise LoraError(f"{where}{name}.dora_scale has shape {tuple(m.shape)}: an input-axis DoRA (LyCORIS's "
                        f"default) normalises columns, which peft's DoRA (rows, [out] = [{out}]) cannot hold")
    return m.reshape(-1)


def _fuse(ours: str, g: dict, where: str) -> tuple[dict, float]:
    n, kind, parts = g["n"], g["kind"], g["parts"]
    if n == 1:
        return parts[min(parts)]
    if sorted(parts) != list(range(n)):
        raise LoraError(f"{where}{ours!r}: the ComfyUI {kind} has only {len(parts)} of its {n} projections; this "
                        f"kit reads a fused layer's {kind} with all of them")
    first, scale = parts[0]
    shared = [p for p in first if p not in _ROWS.get(kind, ())]
    same = all(s == scale and set(t) == set(first) and all(torch.equal(t[p], first[p]) for p in shared)
               for t, s in parts.values())
    if not same:
        raise LoraError(f"{where}{ours!r}: its {n} ComfyUI {kind} projections have different shared factors or "
                        f"scales, so they are not one peft {kind} layer; load it in ComfyUI, or train it here")
    return {p: torch.cat([parts[j][0][p] for j in range(n)]) if p in _ROWS[kind] else v
            for p, v in first.items()}, scale
