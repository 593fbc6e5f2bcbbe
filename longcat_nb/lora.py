"""LoRA: inject (peft), save/load, and convert between the PEFT/diffusers, official and ComfyUI layouts.

Layouts of one target Linear at module path P (e.g. ``blocks.0.attn.qkv``):

* **peft** (ours, default): ``transformer.P.lora_A.weight`` [r, in], ``transformer.P.lora_B.weight``
  [out, r]; rank/alpha per module in the safetensors header (``lora_ranks``/``lora_alphas`` JSON).
* **official** (spec §9): ``lora___lorahyphen___<P with . -> ___lorahyphen___>`` +
  ``.lora_down.weight`` [n·r, in], ``.lora_up.weight`` [out, r] or ``.lora_up.blocks.{j}.weight``
  [out/n, r] (n-way split of the output), ``.alpha_scale`` (0-d). ΔW = alpha_scale · blockdiag(up) · down.
* **comfy**: kohya-style ``diffusion_model.P.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (ΔW = alpha/r · up · down), the layout ComfyUI's LoRA loader reads for its ``diffusion_model.*``
  weights. Fused ``attn.qkv``/``cross_attn.kv_linear`` stay fused (ComfyUI applies a LoRA to the
  weight of the same name); a loader that splits q/k/v (e.g. a wrapper with unfused layers) needs the
  rows of ``lora_up`` split in 3 (or 2) with ``lora_down`` shared — ``split_fused`` does that.

Every conversion is exact: ΔW of each module is preserved (tests check it).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .io import atomic_save_safetensors

DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"]
PRESETS = {
    "attention": DEFAULT_TARGETS,
    "attn": DEFAULT_TARGETS,
    "ffn": ["ffn.w1", "ffn.w2", "ffn.w3"],
    "modulation": ["adaLN_modulation.1"],
    "final": ["final_layer.linear", "final_layer.adaLN_modulation.1"],
}
TOP_LEVEL = ("final_layer.", "y_embedder.", "t_embedder.")
OFFICIAL_SEP = "___lorahyphen___"
OFFICIAL_PREFIX = "lora" + OFFICIAL_SEP
PEFT_PREFIX = "transformer."
COMFY_PREFIX = "diffusion_model."
FUSED_SPLITS = {"attn.qkv": 3, "cross_attn.kv_linear": 2}


class LoraError(ValueError):
    """A LoRA file or setting that cannot be used as it is."""


# ---------------------------------------------------------------------------------------------
# targets and injection
# ---------------------------------------------------------------------------------------------
def expand_targets(targets: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out += PRESETS.get(t, [t])
    return list(dict.fromkeys(out))


def resolve_target_modules(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Full names ``blocks.<i>.<target>`` of the Linear layers to adapt. Matching is exact, so the
    Conv3d ``x_embedder.proj`` is never hit by a bare 'proj' (peft's suffix matching would)."""
    targets = expand_targets(targets)
    names = []
    for t in targets:
        # block-relative names (attn.qkv) match in every block; top-level names (final_layer.linear) once
        pat = re.compile(rf"^{re.escape(t)}$" if t.startswith(TOP_LEVEL) else rf"^blocks\.\d+\.{re.escape(t)}$")
        hits = [n for n, m in model.named_modules() if pat.match(n)]
        bad = [n for n in hits if not isinstance(m := model.get_submodule(n), nn.Linear)]
        if bad:
            raise LoraError(f"LoRA target {t!r} matches non-Linear modules {bad[:3]}: pick Linear layers")
        if not hits:
            raise LoraError(
                f"LoRA target {t!r} matches no layer. Valid targets: {sorted(_block_linear_suffixes(model))} "
                f"or presets {sorted(PRESETS)}"
            )
        names += hits
    return names


def _block_linear_suffixes(model: nn.Module) -> set:
    return {n.split(".", 2)[2] for n, m in model.named_modules()
            if n.startswith("blocks.") and n.count(".") >= 2 and isinstance(m, nn.Linear)}


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Iterable[str] = DEFAULT_TARGETS, adapter_name: str = "default",
             rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None) -> list[str]:
    """Inject a trainable peft LoRA; freezes everything else. Returns the trainable parameter names."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = resolve_target_modules(model, targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                     init_lora_weights=True, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    names = []
    for n, p in model.named_parameters():
        trainable = f".{adapter_name}." in n and ("lora_A" in n or "lora_B" in n)
        p.requires_grad_(trainable)
        if trainable:
            names.append(n)
    return names


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """PEFT-layout state dict (with the ``transformer.`` prefix) of one adapter, float32 on CPU."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {PEFT_PREFIX + k: v.detach().float().cpu() for k, v in sd.items()}


def load_lora_state_dict(model: nn.Module, state: dict, adapter_name: str = "default") -> None:
    from peft import set_peft_model_state_dict

    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    res = set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
    unexpected = getattr(res, "unexpected_keys", [])
    if unexpected:
        raise LoraError(f"LoRA keys not in the model: {unexpected[:5]} (different targets or rank?)")


def module_ranks_alphas(model: nn.Module, adapter_name: str = "default") -> tuple[dict, dict]:
    """Per-module rank and alpha (alpha = scaling · r) of an injected adapter."""
    from peft.tuners.lora import LoraLayer

    ranks, alphas = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.r:
            ranks[n] = int(m.r[adapter_name])
            alphas[n] = float(m.lora_alpha[adapter_name])
    return ranks, alphas


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
@dataclass
class LoraInfo:
    layout: str
    ranks: dict = field(default_factory=dict)  # module path -> rank
    alphas: dict = field(default_factory=dict)  # module path -> alpha (PEFT meaning: scale = alpha/rank)
    metadata: dict = field(default_factory=dict)


def _peft_modules(state: dict) -> dict:
    mods: dict = {}
    for k, v in state.items():
        m = re.match(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$", k)
        if not m:
            raise LoraError(f"unexpected key {k!r} in a PEFT-layout LoRA")
        mods.setdefault(m.group(1), {})[m.group(2)] = v
    return mods


def save_lora(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None) -> Path:
    """PEFT/diffusers layout with rank/alpha/targets/base model/steps/settings in the header."""
    meta = dict(metadata or {})
    mods = _peft_modules(state)
    ranks = {m: int(t["A"].shape[0]) for m, t in mods.items()}
    if alphas is None:
        alpha = float(meta.get("alpha", meta.get("rank", 1)))
        alphas = {m: alpha * ranks[m] / float(meta.get("rank", ranks[m])) for m in mods}
    header = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
    header.update(format="peft", lora_ranks=json.dumps(ranks), lora_alphas=json.dumps(alphas))
    return atomic_save_safetensors(path, state, metadata=header)


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:
        raise LoraError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from e


def detect_layout(state: dict) -> str:
    keys = list(state)
    if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
        return "official"
    if any(k.startswith(COMFY_PREFIX) or k.endswith(".lora_down.weight") for k in keys):
        return "comfy"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise LoraError(f"unknown LoRA layout (first keys {keys[:3]})")


def load_any_lora(path) -> tuple[dict, LoraInfo]:
    """Read a LoRA of any layout; return it in the PEFT layout with per-module rank and alpha."""
    state, meta = _read(path)
    layout = detect_layout(state)
    if layout == "official":
        state, alphas = official_to_peft(state)
    elif layout == "comfy":
        state, alphas = comfy_to_peft(state)
    else:
        mods = _peft_modules(state)
        if "lora_alphas" in meta:
            alphas = {k: float(v) for k, v in json.loads(meta["lora_alphas"]).items()}
        else:
            alpha = float(json.loads(meta["alpha"])) if "alpha" in meta else None
            alphas = {m: alpha if alpha is not None else float(t["A"].shape[0]) for m, t in mods.items()}
    mods = _peft_modules(state)
    ranks = {m: int(t["A"].shape[0]) for m, t in mods.items()}
    missing = set(ranks) - set(alphas)
    if missing:
        raise LoraError(f"{path}: no alpha for modules {sorted(missing)[:3]}")
    return state, LoraInfo(layout=layout, ranks=ranks, alphas=alphas, metadata=meta)


# ---------------------------------------------------------------------------------------------
# converters (pure state-dict functions)
# ---------------------------------------------------------------------------------------------
def _official_name(module: str) -> str:
    return OFFICIAL_PREFIX + module.replace(".", OFFICIAL_SEP)


def official_to_peft(state: dict) -> tuple[dict, dict]:
    """Official layout -> (PEFT state, alphas). n-split ups become one block-diagonal B of rank n·r."""
    groups: dict = {}
    for k, v in state.items():
        if not k.startswith(OFFICIAL_PREFIX):
            raise LoraError(f"unexpected key {k!r} in an official-layout LoRA")
        name, _, rest = k.partition(".")
        groups.setdefault(name, {})[rest] = v
    out, alphas = {}, {}
    for name, parts in groups.items():
        module = name[len(OFFICIAL_PREFIX):].replace(OFFICIAL_SEP, ".")
        down = parts["lora_down.weight"].float()
        if "lora_up.weight" in parts:
            up = parts["lora_up.weight"].float()
        else:
            ups = [parts[f"lora_up.blocks.{j}.weight"].float()
                   for j in range(sum(1 for p in parts if p.startswith("lora_up.blocks.")))]
            up = torch.block_diag(*ups)
        scale = float(parts["alpha_scale"]) if "alpha_scale" in parts else 1.0
        r = down.shape[0]
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = up
        alphas[module] = scale * r
    return out, alphas


def peft_to_official(state: dict, alphas: dict) -> dict:
    out = {}
    for module, t in _peft_modules(state).items():
        name = _official_name(module)
        r = t["A"].shape[0]
        out[f"{name}.lora_down.weight"] = t["A"].float()
        out[f"{name}.lora_up.weight"] = t["B"].float()
        out[f"{name}.alpha_scale"] = torch.tensor(float(alphas[module]) / r, dtype=torch.float32)
    return out


def peft_to_comfy(state: dict, alphas: dict) -> dict:
    out = {}
    for module, t in _peft_modules(state).items():
        base = COMFY_PREFIX + module
        out[f"{base}.lora_down.weight"] = t["A"].float()
        out[f"{base}.lora_up.weight"] = t["B"].float()
        out[f"{base}.alpha"] = torch.tensor(float(alphas[module]), dtype=torch.float32)
    return out


def comfy_to_peft(state: dict) -> tuple[dict, dict]:
    groups: dict = {}
    for k, v in state.items():
        m = re.match(r"^(?:diffusion_model\.)?(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$", k)
        if not m:
            raise LoraError(f"unexpected key {k!r} in a ComfyUI-layout LoRA")
        groups.setdefault(m.group(1), {})[m.group(2)] = v
    out, alphas = {}, {}
    for module, parts in groups.items():
        down = parts["lora_down.weight"].float()
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = parts["lora_up.weight"].float()
        alphas[module] = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
    return out, alphas


def split_fused(state: dict, alphas: dict) -> tuple[dict, dict]:
    """PEFT state with fused attn.qkv / cross_attn.kv_linear split into per-projection LoRAs
    (``attn.qkv.{q,k,v}``, ``cross_attn.kv_linear.{k,v}``): B split by output rows, A shared."""
    out, out_alphas = {}, {}
    for module, t in _peft_modules(state).items():
        suffix = module.split(".", 2)[-1]
        n = FUSED_SPLITS.get(suffix)
        if not n:
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"], out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = t["A"], t["B"]
            out_alphas[module] = alphas[module]
            continue
        names = "qkv" if n == 3 else "kv"
        for part, b in zip(names, t["B"].chunk(n, dim=0)):
            sub = f"{module}.{part}"
            out[f"{PEFT_PREFIX}{sub}.lora_A.weight"] = t["A"].clone()
            out[f"{PEFT_PREFIX}{sub}.lora_B.weight"] = b.clone()
            out_alphas[sub] = alphas[module]
    return out, out_alphas


def delta_weights(state: dict, alphas: dict) -> dict:
    """module -> ΔW = alpha/r · B · A (float32): what a LoRA adds to each weight."""
    return {m: float(alphas[m]) / t["A"].shape[0] * (t["B"].float() @ t["A"].float())
            for m, t in _peft_modules(state).items()}


def save_official(path, state: dict, metadata: dict, alphas: Optional[dict] = None) -> Path:
    """For the official loader: ``dit.load_lora(path, key, lora_network_dim=<rank>)``."""
    alphas = alphas or _alphas_from_meta(state, metadata)
    header = {"format": "official", "rank": str(metadata.get("rank", "")),
              "usage": "dit.load_lora(path, key, lora_network_dim=rank); alpha_scale is in the file"}
    return atomic_save_safetensors(path, peft_to_official(state, alphas), metadata=header)


def save_comfy(path, state: dict, metadata: dict, alphas: Optional[dict] = None) -> Path:
    alphas = alphas or _alphas_from_meta(state, metadata)
    return atomic_save_safetensors(path, peft_to_comfy(state, alphas), metadata={"format": "comfy"})


def _alphas_from_meta(state: dict, metadata: dict) -> dict:
    mods = _peft_modules(state)
    rank = float(metadata.get("rank", 0)) or None
    alpha = float(metadata.get("alpha", 0)) or None
    return {m: (alpha * t["A"].shape[0] / rank) if (alpha and rank) else float(t["A"].shape[0])
            for m, t in mods.items()}


# ---------------------------------------------------------------------------------------------
# applying saved LoRAs for sampling
# ---------------------------------------------------------------------------------------------
def apply_loras(model: nn.Module, loras: Iterable[tuple], prefix: str = "lora") -> list[str]:
    """Load LoRA files (any layout) as named peft adapters and activate them with their scales.
    ``loras``: [(path, scale), ...]. Scale 0 leaves the output exactly equal to the base."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    names, scales = [], []
    for i, (path, scale) in enumerate(loras):
        state, info = load_any_lora(path)
        name = f"{prefix}{i}_{Path(path).stem}"[:60].replace(".", "_")
        ranks, alphas = info.ranks, info.alphas
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        a0 = alphas[next(m for m in ranks if ranks[m] == r0)]
        from peft import LoraConfig, inject_adapter_in_model

        unknown = [m for m in ranks if not _has_module(model, m)]
        if unknown:
            raise LoraError(f"{path}: modules {unknown[:3]} are not in this model (LoRA for another model?)")
        cfg = LoraConfig(r=r0, lora_alpha=a0, target_modules=list(ranks),
                         rank_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items() if r != r0},
                         alpha_pattern={f"^{re.escape(m)}$": a for m, a in alphas.items() if a != a0 or ranks[m] != r0})
        inject_adapter_in_model(cfg, model, adapter_name=name)
        load_lora_state_dict(model, state, adapter_name=name)
        names.append(name)
        scales.append(float(scale))
    for p in model.parameters():
        p.requires_grad_(False)
    if names:
        set_weights_and_activate_adapters(model, names, scales)
    return names


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def remove_loras(model: nn.Module, names: Optional[Iterable[str]] = None) -> None:
    """Delete adapters (all when ``names`` is None); the wrapped layers then compute the base."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in list(names if names is not None else m.r.keys()):
                if name in m.r:
                    m.delete_adapter(name)


def newest_lora(run_dir: str | os.PathLike) -> Optional[Path]:
    files = sorted((Path(run_dir) / "lora").glob("lora-step*.safetensors"))
    files = [f for f in files if not f.stem.endswith(("-official", "-comfy"))]
    return files[-1] if files else None
