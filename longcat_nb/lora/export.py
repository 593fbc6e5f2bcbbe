"""LoRA files that load at the trained scale in every consumer.

A PEFT-layout file has no tensor for alpha: header-aware readers (this kit, diffusers'
``load_lora_adapter``, peft with the header's LoraConfig) take alpha from the header; readers that
ignore headers (older diffusers, plain state-dict code, ComfyUI) use alpha = rank, i.e. scale 1. So:

* every PEFT file the kit writes (checkpoints included) has the per-module alphas in its header;
* ``fold_alpha`` multiplies lora_B by alpha/r and sets alpha = r, so a header-blind reader is exact too
  (an option for exports only: checkpoints keep the trained B so a resume is bit-identical);
* the ComfyUI layout carries ``.alpha`` tensors and the official one ``alpha_scale`` (formats/), padded
  to the official loader's one rank (formats/official.py ``official_tensors``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .formats import LAYOUTS, save_as
from .formats.official import OFFICIAL_RANK
from .formats.peft import save_lora
from .inject import lora_state_dict, module_ranks_alphas
from .kinds import adapter_of
from .kinds import fold as fold_kinds
from .state import _peft_modules, _peft_state


def fold_alpha(state: dict, alphas: dict) -> tuple[dict, dict]:
    """(state with lora_B · alpha/r, alphas = r): the same ΔW at scale alpha/r = 1, which is what a
    reader that ignores the header assumes."""
    mods, new_alphas = {}, {}
    for module, t in _peft_modules(state).items():
        r = t["A"].shape[0]
        mods[module] = {"A": t["A"], "B": t["B"] * (float(alphas[module]) / r)}
        new_alphas[module] = float(r)
    return _peft_state(mods), new_alphas


def save_trained(path, model, metadata: Optional[dict] = None, fold: bool = False,
                 adapter_name: str = "default") -> Path:
    """The adapter being trained in ``model`` as a PEFT-layout file whose header holds each module's
    alpha as trained (``fold``: alpha folded into lora_B, header alpha = rank)."""
    state = lora_state_dict(model, adapter_name)
    ranks, alphas = module_ranks_alphas(model, adapter_name)
    meta = dict(metadata or {})
    for key in ("rank", "alpha"):  # the header's rank/alpha are recomputed from the tensors and alphas
        meta.pop(key, None)
    if fold:
        meta["alpha_folded"] = True
        meta["trained_alphas"] = sorted(set(alphas.values()))
        state, alphas = fold_alpha(state, alphas) if adapter_of(state) == "lora" else fold_kinds(state, alphas, ranks)
    return save_lora(path, state, meta, alphas=alphas)


def save_layouts(peft_path, state: dict, alphas: dict, formats, metadata: Optional[dict] = None,
                 official_rank: Optional[int] = OFFICIAL_RANK) -> dict:
    """The extra layouts of ``formats`` (official, comfy; 'peft' is ``peft_path`` itself) of a PEFT-layout
    ``state`` beside ``peft_path``, named by the layout table's suffixes: the one place a run's export
    writes them. 'official' is padded to ``official_rank`` (None = the trained rank). Returns
    {layout: path} of the files written."""
    peft_path, written = Path(peft_path), {}
    for layout in formats:
        if layout == "peft":
            continue
        options = {"network_rank": official_rank} if layout == "official" else {}
        path = peft_path.with_name(peft_path.stem + LAYOUTS[layout].FILE_SUFFIX + ".safetensors")
        written[layout] = save_as(layout, path, state, metadata, alphas=alphas, **options)
    return written


def run_metadata(run_dir, step: int) -> dict:
    """Header entries of a run's LoRA file: the step, and the text encoder its cache was built with (a
    LoRA trained on Qwen2.5-VL embeddings must be sampled with them: text.required_encoder reads it)."""
    from ..cache import CacheError
    from ..cache_manifest import cache_text_encoder

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
