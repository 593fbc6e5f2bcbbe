"""The LoRA file layouts. ``LAYOUTS`` is the one table that detection, loading and saving read: a new
layout is one module here (``detect``, ``to_internal``, ``from_internal``, ``save``, ``FILE_SUFFIX``)
plus one entry in it. Every conversion is exact: ΔW of each module is preserved (the tests check it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import kinds
from ..state import LoraError, LoraInfo
from . import comfy, official, peft

# layout name -> module; detection asks them in this order (peft last: comfy files may use lora_A/lora_B)
LAYOUTS = {"official": official, "comfy": comfy, "peft": peft}


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:
        raise LoraError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from e


def detect_layout(state: dict, where: str = "") -> str:
    """'peft' | 'official' | 'comfy' from the key names."""
    keys = list(state)
    if not keys:
        raise LoraError(f"{where}the LoRA file holds no tensors")
    for name, layout in LAYOUTS.items():
        if layout.detect(state):
            return name
    raise LoraError(f"{where}unknown LoRA layout (first keys {keys[:3]}); expected the PEFT "
                    f"(transformer.<module>.lora_A.weight), official (lora___lorahyphen___...) or ComfyUI "
                    f"(diffusion_model.<module>.lora_down.weight) layout")


def load_any_lora(path) -> tuple[dict, LoraInfo]:
    """Read a LoRA file of any layout; return it in the PEFT layout with per-module rank and alpha."""
    state, meta = _read(path)
    return _to_internal(path, state, meta, detect_layout(state, f"{path}: "))


def load_lora_file(path) -> tuple[dict, LoraInfo]:
    """Read a PEFT-layout file: (state, LoraInfo with per-module ranks and alphas)."""
    state, meta = _read(path)
    layout = detect_layout(state, f"{path}: ")
    if layout != "peft":
        raise LoraError(f"{path} is in the {layout} layout, not the PEFT one: use load_any_lora({str(path)!r})")
    return _to_internal(path, state, meta, layout)


def _to_internal(path, state: dict, meta: dict, layout: str) -> tuple[dict, LoraInfo]:
    state, alphas = LAYOUTS[layout].to_internal(state, f"{path}: ", meta)
    rank = kinds.ranks(state, peft.header_ranks(meta, state) if layout == "peft" else None)
    return state, LoraInfo(layout, rank, alphas, meta, str(path), kinds.adapter_of(state))


def save_as(layout: str, path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None,
            **options) -> Path:
    """Write a PEFT-layout ``state`` in ``layout`` (``options``: that layout's own, e.g. official's
    ``network_rank``)."""
    if layout not in LAYOUTS:
        raise LoraError(f"unknown LoRA layout {layout!r} for {path}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout].save(path, state, metadata, alphas=alphas, **options)


def exported_suffixes() -> tuple:
    """The stem suffixes of the extra files a run's export writes beside the PEFT file."""
    return tuple(m.FILE_SUFFIX for m in LAYOUTS.values() if m.FILE_SUFFIX)
