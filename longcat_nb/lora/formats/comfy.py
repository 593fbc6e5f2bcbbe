"""The ComfyUI layout: what Kijai's ComfyUI-WanVideoWrapper loads for LongCat-Video. Facts checked in
github.com/kijai/ComfyUI-WanVideoWrapper:
  - ``nodes_model_loading.py`` (@3317577): the loader builds its ``WanModel(is_longcat=dim == 4096)``
    from a checkpoint with Wan-style keys (it reads ``patch_embedding.weight``,
    ``blocks.0.self_attn.k.weight``, ``blocks.0.ffn.w1.weight``); LoRA files go through
    ``standardize_lora_key_format`` (``transformer.`` -> ``diffusion_model.``) and ComfyUI's
    ``load_lora_for_models``, i.e. keys ``diffusion_model.<module>.lora_down.weight`` /
    ``.lora_up.weight`` (or ``.lora_A/.lora_B``) and ``.alpha``, with ΔW = alpha/rank · up·down and
    rank = rows of lora_down (ComfyUI ``comfy/weight_adapter/lora.py``).
  - ``wanvideo/modules/model.py`` (@0cf30c6): a LongCat block has UNFUSED ``self_attn.{q,k,v,o}`` and
    ``cross_attn.{q,k,v,o}`` (``head_norm=is_longcat``), ``ffn`` = LongCat's SwiGLU (``ffn.w1`` read by
    the loader; ``w2``/``w3`` as in the official FFN), ``modulation`` = Sequential(SiLU, Linear) so
    ``modulation.1``; the final layer is ``head.head`` + ``head.modulation.1`` (``Head_adaLN``); the
    caption MLP is ``text_embedding.0/.2``.

So ``attn.qkv`` becomes three LoRAs ``self_attn.q/k/v`` and ``cross_attn.kv_linear`` two LoRAs
``cross_attn.k/v``: lora_up is split by output rows, lora_down is shared (duplicated). Columns of a
split lora_up that are exactly zero (an official n-split file) are dropped with their lora_down rows,
and alpha is rescaled so alpha/rank stays the same: exact, and 3x smaller for official qkv LoRAs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ...io import atomic_save_safetensors
from ..kinds import adapter_of
from ..kinds import ranks as adapter_ranks
from ..state import LoraError, _alphas_from_meta, _group_keys, _json_header, _peft_modules, _peft_state
from .comfy_kinds import comfy_kinds_to_peft, is_comfy_kind, peft_kinds_to_comfy

COMFY_PREFIX = "diffusion_model."
FILE_SUFFIX = "-comfy"

# our module (block-relative or top-level) -> ComfyUI-WanVideoWrapper module(s); several = fused rows split
COMFY_BLOCK_NAMES = {
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
    "adaLN_modulation.1": ("modulation.1",),
}
COMFY_TOP_NAMES = {
    "final_layer.linear": ("head.head",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
    "y_embedder.y_proj.0": ("text_embedding.0",),
    "y_embedder.y_proj.2": ("text_embedding.2",),
}
_COMFY_KEY = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.|transformer\.)?(.+?)\."
                        r"(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")


def detect(state: dict) -> bool:
    comfy_names = {n for names in (*COMFY_BLOCK_NAMES.values(), *COMFY_TOP_NAMES.values()) for n in names
                   if n not in {"ffn.w1", "ffn.w2", "ffn.w3"}}

    def wrapper_named(k):
        m = _COMFY_KEY.match(k)
        mod = m.group(1) if m else ""
        return any(mod.endswith("." + n) or mod == n for n in comfy_names)

    return any(k.startswith((COMFY_PREFIX, "model.diffusion_model.")) or ".lora_down." in k or ".lora_up." in k
               or k.endswith(".alpha") or wrapper_named(k) for k in state)


def to_internal(state: dict, where: str = "", meta: Optional[dict] = None) -> tuple[dict, dict]:
    """(PEFT state, alphas); the header plays no part (``.alpha`` is a tensor)."""
    if is_comfy_kind(state):
        return comfy_kinds_to_peft(state, where)
    return comfy_to_peft(state, where)


def _comfy_names(module: str) -> tuple:
    m = re.match(r"^(blocks\.\d+)\.(.+)$", module)
    if m and m.group(2) in COMFY_BLOCK_NAMES:
        return tuple(f"{m.group(1)}.{n}" for n in COMFY_BLOCK_NAMES[m.group(2)])
    if module in COMFY_TOP_NAMES:
        return COMFY_TOP_NAMES[module]
    raise LoraError(f"module {module!r} has no known ComfyUI-WanVideoWrapper name (known: "
                    f"blocks.<i>.{{{', '.join(COMFY_BLOCK_NAMES)}}}, {', '.join(COMFY_TOP_NAMES)}); "
                    f"export this LoRA in the PEFT or official layout instead")


_FROM_COMFY = {c: (ours, j, len(cs)) for ours, cs in {**COMFY_BLOCK_NAMES, **COMFY_TOP_NAMES}.items()
               for j, c in enumerate(cs)}


def _from_comfy_name(name: str) -> tuple[str, int, int]:
    """ComfyUI module name -> (our module, part index, number of parts). Our own names pass through."""
    m = re.match(r"^(blocks\.\d+)\.(.+)$", name)
    if m and m.group(2) in _FROM_COMFY:
        ours, j, n = _FROM_COMFY[m.group(2)]
        return f"{m.group(1)}.{ours}", j, n
    if name in _FROM_COMFY:
        return _FROM_COMFY[name]
    if (m and m.group(2) in COMFY_BLOCK_NAMES) or name in COMFY_TOP_NAMES:
        return name, 0, 1
    raise LoraError(f"ComfyUI LoRA module {name!r} is not a LongCat-Video layer this kit knows "
                    f"(WanVideoWrapper names: blocks.<i>.{{self_attn.q|k|v|o, cross_attn.q|k|v|o, ffn.w1|w2|w3, "
                    f"modulation.1}}, head.head, head.modulation.1, text_embedding.0|2; kohya 'lora_unet_...' "
                    f"names with underscores are not read: rename them to dotted module paths)")


def _compact(A: torch.Tensor, B: torch.Tensor, alpha: float) -> tuple:
    """Drop the rank components whose lora_up column is exactly zero; keep alpha/rank."""
    keep = B.count_nonzero(dim=0) > 0
    if bool(keep.all()) or not bool(keep.any()):
        return A, B, alpha
    r_new = int(keep.sum())
    return A[keep].clone(), B[:, keep].clone(), alpha * r_new / A.shape[0]


def peft_to_comfy(state: dict, alphas: dict, compact: bool = True) -> dict:
    """PEFT layout -> ComfyUI-WanVideoWrapper layout: ``diffusion_model.<wrapper module>.lora_down.weight``
    / ``.lora_up.weight`` / ``.alpha`` (0-d). Fused attn.qkv / cross_attn.kv_linear LoRAs become one
    LoRA per projection: lora_up split by output rows, lora_down shared (duplicated)."""
    out = {}
    for module, t in _peft_modules(state).items():
        if module not in alphas:
            raise LoraError(f"no alpha for module {module!r}")
        names = _comfy_names(module)
        if t["B"].shape[0] % len(names):
            raise LoraError(f"module {module!r}: lora_B has {t['B'].shape[0]} rows, not divisible into "
                            f"{len(names)} projections")
        for name, b in zip(names, t["B"].chunk(len(names), dim=0)):
            A, B, alpha = t["A"].clone(), b.clone(), float(alphas[module])
            if compact:
                A, B, alpha = _compact(A, B, alpha)
            base = COMFY_PREFIX + name
            out[f"{base}.lora_down.weight"] = A
            out[f"{base}.lora_up.weight"] = B
            out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def comfy_to_peft(state: dict, where: str = "") -> tuple[dict, dict]:
    """ComfyUI layout -> (PEFT state, alphas). Per-projection q/k/v (k/v) LoRAs are fused back into
    attn.qkv (cross_attn.kv_linear): A = the shared lora_down when all parts share it and their scale,
    else the stacked lora_downs with a block-structured B. Missing parts get zero rows. Exact."""
    kinds = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B"}
    groups = _group_keys(state, _COMFY_KEY, where, "ComfyUI",
                         "diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha",
                         part=lambda p: kinds.get(p, "alpha"))
    fused: dict = {}
    for name, t in groups.items():
        if "A" not in t or "B" not in t:
            raise LoraError(f"{where}ComfyUI LoRA module {name!r} lacks lora_down or lora_up")
        r = t["A"].shape[0]
        if t["A"].dim() != 2 or t["B"].dim() != 2 or t["B"].shape[1] != r:
            raise LoraError(f"{where}module {name!r}: lora_down {tuple(t['A'].shape)} and lora_up "
                            f"{tuple(t['B'].shape)} do not make a LoRA")
        scale = float(t["alpha"]) / r if "alpha" in t else 1.0  # ComfyUI: no alpha means scale 1
        ours, j, n = _from_comfy_name(name)
        parts = fused.setdefault(ours, {"n": n, "parts": {}})["parts"]
        if j in parts:
            raise LoraError(f"{where}module {ours!r} appears twice (as {name!r})")
        parts[j] = (t["A"], t["B"], scale)
    mods, alphas = {}, {}
    for ours, g in fused.items():
        n, parts = g["n"], g["parts"]
        first = parts[min(parts)]
        if n == 1:
            mods[ours] = {"A": first[0], "B": first[1]}
            alphas[ours] = first[2] * first[0].shape[0]
            continue
        outs = {p[1].shape[0] for p in parts.values()}
        if len(outs) != 1:
            raise LoraError(f"{where}the projections of {ours!r} have different output sizes {sorted(outs)}")
        o = outs.pop()
        same_A = len(parts) == n and all(torch.equal(p[0], first[0]) and p[2] == first[2] for p in parts.values())
        if same_A:  # what peft_to_comfy writes without compaction: the original fused LoRA
            mods[ours] = {"A": first[0], "B": torch.cat([parts[j][1] for j in range(n)], 0)}
            alphas[ours] = first[2] * first[0].shape[0]
            continue
        s = first[2]
        A = torch.cat([parts[j][0] for j in sorted(parts)], 0)
        B = torch.zeros(n * o, A.shape[0], dtype=first[1].dtype)
        col = 0
        for j in sorted(parts):
            a_j, b_j, s_j = parts[j]
            B[j * o:(j + 1) * o, col:col + a_j.shape[0]] = b_j if s_j == s else b_j * (s_j / s)
            col += a_j.shape[0]
        mods[ours] = {"A": A, "B": B}
        alphas[ours] = s * A.shape[0]
    return _peft_state(mods), alphas


def save_comfy(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None) -> Path:
    """ComfyUI-WanVideoWrapper layout (see the module docstring; DoRA/LoHa/LoKr: comfy_kinds.py)."""
    ranks = adapter_ranks(state)
    alphas = alphas or _alphas_from_meta(ranks, dict(metadata or {}))
    try:
        tensors = (peft_to_comfy if adapter_of(state) == "lora" else peft_kinds_to_comfy)(state, alphas)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from e
    header = {k: v for k, v in _json_header(metadata).items() if k not in ("format", "rank", "alpha")}
    header.update(format="pt", lora_layout="comfy", target="ComfyUI-WanVideoWrapper (LongCat-Video)")
    return atomic_save_safetensors(path, tensors, metadata=header)


from_internal = peft_to_comfy
save = save_comfy
