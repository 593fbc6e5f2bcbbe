"""LoRA: inject (peft), save/load, and convert between the PEFT/diffusers, official and ComfyUI layouts.

Layouts of one target Linear at module path P (e.g. ``blocks.0.attn.qkv``), all safetensors:

* **peft** (ours, the default): ``transformer.P.lora_A.weight`` [r, in], ``transformer.P.lora_B.weight``
  [out, r]; ΔW = alpha/r · B·A. The header holds ``rank``/``alpha`` (the most common values),
  ``rank_pattern``/``alpha_pattern`` (exact module names, only where they differ), ``targets``,
  ``base_model``, ``steps``, ``settings`` (JSON strings), and diffusers' own ``lora_adapter_metadata``
  (a ``transformer.``-prefixed LoraConfig), so ``model.load_lora_adapter(file, prefix="transformer")``
  in diffusers reads the right alphas without us.
* **official** (spec §9): ``lora___lorahyphen___<P with . -> ___lorahyphen___>`` +
  ``.lora_down.weight`` [n·r, in], ``.lora_up.weight`` [out, r] or ``.lora_up.blocks.{j}.weight``
  [out/n, r] (n-way split of the output rows), ``.alpha_scale`` (0-d).
  ΔW = alpha_scale · blockdiag(up_0..up_{n-1}) · down. Loaded by the official
  ``dit.load_lora(path, key, lora_network_dim=r)``, which takes ONE rank r for every module.
* **comfy**: what Kijai's ComfyUI-WanVideoWrapper loads for LongCat-Video. Facts checked in
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

Every conversion is exact: ΔW of each module is preserved (the tests check it).

In the model, adapters are peft LoRA layers. A model with diffusers' ``PeftAdapterMixin`` (diffusers'
own video transformers mix it in; ``ModelMixin`` alone does not have it in diffusers 0.42) goes through
its ``add_adapter`` / ``load_lora_adapter`` / ``set_adapters`` / ``delete_adapters`` / ``fuse_lora``;
any other module through the same peft and diffusers.utils functions those methods call.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .config import DEFAULT_TARGETS
from .io import atomic_save_safetensors

logger = logging.getLogger(__name__)

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
_PEFT_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
_COMFY_KEY = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.|transformer\.)?(.+?)\."
                        r"(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")


class LoraError(ValueError):
    """A LoRA file or setting that cannot be used as it is."""


@dataclass
class LoraInfo:
    layout: str  # the layout the file was in: peft | official | comfy
    ranks: dict = field(default_factory=dict)  # module path -> rank
    alphas: dict = field(default_factory=dict)  # module path -> alpha (PEFT meaning: scale = alpha/rank)
    metadata: dict = field(default_factory=dict)  # the raw safetensors header (JSON strings)
    path: str = ""

    def value(self, key: str, default=None):
        """A header entry decoded from JSON (plain strings come back as they are)."""
        if key not in self.metadata:
            return default
        try:
            return json.loads(self.metadata[key])
        except (TypeError, ValueError):
            return self.metadata[key]


# ---------------------------------------------------------------------------------------------
# targets and injection
# ---------------------------------------------------------------------------------------------
def expand_targets(targets: Iterable[str]) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        out += PRESETS.get(t, [t])
    return list(dict.fromkeys(out))


def _base(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer (the module itself otherwise)."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _block_linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({n.split(".", 2)[2] for n, m in model.named_modules()
                   if re.match(r"^blocks\.\d+\.", n) and ".base_layer" not in n and ".lora_" not in n
                   and isinstance(_base(m), nn.Linear)})


def resolve_target_modules(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Full names of the Linear layers to adapt. A block-relative target (``attn.proj``) matches
    ``blocks.<i>.attn.proj`` exactly in every block; ``blocks.3.attn.qkv`` or a top-level name
    (``final_layer.linear``) matches that one layer. Matching is exact, never by suffix: peft's suffix
    matching would let a bare 'proj' also hit the Conv3d ``x_embedder.proj``."""
    names: list[str] = []
    for t in expand_targets(targets):
        exact = t.startswith(TOP_LEVEL) or re.match(r"^blocks\.\d+\.", t)
        pat = re.compile(rf"^{re.escape(t)}$" if exact else rf"^blocks\.\d+\.{re.escape(t)}$")
        hits = [n for n, _ in model.named_modules() if pat.match(n)]
        bad = [f"{n} ({type(_base(model.get_submodule(n))).__name__})" for n in hits
               if not isinstance(_base(model.get_submodule(n)), nn.Linear)]
        if bad:
            raise LoraError(f"LoRA target {t!r} matches non-Linear layers {bad[:3]}; LoRA here adapts Linear "
                            f"layers only. Valid block targets: {_block_linear_suffixes(model)}")
        if not hits:
            near = [s for s in _block_linear_suffixes(model) if s.endswith("." + t) or t in s]
            hint = f" Did you mean {near}?" if near else ""
            raise LoraError(f"LoRA target {t!r} matches no layer (targets are matched exactly, as "
                            f"blocks.<i>.{t}).{hint} Valid block targets: {_block_linear_suffixes(model)}; "
                            f"presets: {sorted(PRESETS)}; top-level: final_layer.linear, "
                            f"final_layer.adaLN_modulation.1")
        names += hits
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Seed the LoRA init without disturbing the caller's random streams."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():  # a second adapter on one model is what we mean to do
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _uses_diffusers_peft(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("add_adapter", "load_lora_adapter", "set_adapters", "delete_adapters"))


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Iterable[str] = DEFAULT_TARGETS, adapter_name: str = "default",
             init_seed: Optional[int] = None, rank_pattern: Optional[dict] = None,
             alpha_pattern: Optional[dict] = None) -> list[str]:
    """Inject a trainable peft LoRA (diffusers ``add_adapter`` on a ModelMixin, peft's
    ``inject_adapter_in_model`` otherwise), make it the active adapter and freeze everything else.
    Returns the trainable parameter names."""
    from peft import LoraConfig, inject_adapter_in_model

    if int(rank) < 1 or float(alpha) <= 0 or not 0.0 <= float(dropout) < 1.0:
        raise LoraError(f"LoRA rank {rank}, alpha {alpha}, dropout {dropout}: need rank >= 1, alpha > 0, "
                        f"0 <= dropout < 1")
    if adapter_name in getattr(model, "peft_config", {}):
        raise LoraError(f"the model already has a LoRA adapter named {adapter_name!r}: pick another "
                        f"adapter_name or remove_loras(model, [{adapter_name!r}]) first")
    modules = resolve_target_modules(model, targets)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=modules,
                     init_lora_weights=True, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    with _seeded(init_seed), _quiet_peft():
        if _uses_diffusers_peft(model):
            model.add_adapter(cfg, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    names = []
    for n, p in model.named_parameters():
        trainable = f".{adapter_name}." in n and (".lora_A." in n or ".lora_B." in n)
        p.requires_grad_(trainable)
        if trainable:
            names.append(n)
    return names


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """PEFT-layout state dict (``transformer.`` prefix) of one adapter, float32 on CPU."""
    from peft import get_peft_model_state_dict

    if adapter_name not in adapter_names(model):
        raise LoraError(f"the model has no LoRA adapter {adapter_name!r} (adapters: {adapter_names(model)})")
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {PEFT_PREFIX + k: v.detach().float().cpu() for k, v in sd.items()}


def load_lora_state_dict(model: nn.Module, state: dict, adapter_name: str = "default") -> None:
    """Load PEFT-layout weights into an adapter already injected with the same targets and ranks."""
    from peft import set_peft_model_state_dict

    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    try:
        res = set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
    except RuntimeError as e:  # size mismatch
        raise LoraError(f"LoRA weights do not fit adapter {adapter_name!r} (other rank or targets?): {e}") from e
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if ".lora_" in k]
    missing = [k for k in getattr(res, "missing_keys", []) if ".lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        raise LoraError(f"LoRA weights do not match adapter {adapter_name!r}: not in the model {unexpected[:3]}, "
                        f"missing from the weights {missing[:3]} (different targets?)")


def module_ranks_alphas(model: nn.Module, adapter_name: str = "default") -> tuple[dict, dict]:
    """Per-module rank and alpha (scale = alpha / rank) of an injected adapter."""
    from peft.tuners.lora import LoraLayer

    ranks, alphas = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.r:
            ranks[n] = int(m.r[adapter_name])
            alphas[n] = float(m.lora_alpha[adapter_name])
    return ranks, alphas


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters present in the model."""
    from peft.tuners.lora import LoraLayer

    names: dict = {}
    for m in model.modules():
        if isinstance(m, LoraLayer):
            names.update(dict.fromkeys(m.r.keys()))
    return list(names)


# ---------------------------------------------------------------------------------------------
# PEFT-layout state dicts and headers
# ---------------------------------------------------------------------------------------------
def _peft_modules(state: dict, where: str = "") -> dict:
    """module path -> {"A": [r, in], "B": [out, r]}; checks that the pairs fit together."""
    mods: dict = {}
    for k, v in state.items():
        m = _PEFT_KEY.match(k)
        if not m:
            raise LoraError(f"{where}unexpected key {k!r} in a PEFT-layout LoRA (expected "
                            f"transformer.<module>.lora_A.weight / .lora_B.weight)")
        mods.setdefault(m.group(1), {})[m.group(2)] = v
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


def _json_header(metadata: Optional[dict]) -> dict:
    return {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}


def save_lora(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None) -> Path:
    """Write the PEFT/diffusers layout atomically. ``alphas`` (module -> alpha) default to the
    metadata's ``alpha`` at its ``rank`` (scale alpha/rank for every module), else alpha = rank."""
    mods = _peft_modules(state, f"{path}: ")
    ranks = {m: int(t["A"].shape[0]) for m, t in mods.items()}
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
    header.update(format="pt", lora_layout="peft", rank=json.dumps(r), alpha=json.dumps(a),
                  lora_adapter_metadata=json.dumps(
                      {PEFT_PREFIX + k: v for k, v in _lora_config_kwargs(ranks, alphas).items()}, sort_keys=True))
    if rank_pattern:
        header["rank_pattern"] = json.dumps(rank_pattern)
    if alpha_pattern:
        header["alpha_pattern"] = json.dumps(alpha_pattern)
    return atomic_save_safetensors(path, _peft_state(mods), metadata=header)


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


def load_lora_file(path) -> tuple[dict, LoraInfo]:
    """Read a PEFT-layout file: (state, LoraInfo with per-module ranks and alphas)."""
    state, meta = _read(path)
    layout = detect_layout(state, where=f"{path}: ")
    if layout != "peft":
        raise LoraError(f"{path} is in the {layout} layout, not the PEFT one: use load_any_lora({str(path)!r})")
    mods = _peft_modules(state, f"{path}: ")
    ranks = {m: int(t["A"].shape[0]) for m, t in mods.items()}
    alphas = _alphas_from_header(meta, ranks, f"{path}: ")
    return _peft_state(mods), LoraInfo("peft", ranks, alphas, meta, str(path))


def detect_layout(state: dict, where: str = "") -> str:
    """'peft' | 'official' | 'comfy' from the key names."""
    keys = list(state)
    if not keys:
        raise LoraError(f"{where}the LoRA file holds no tensors")
    if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
        return "official"
    comfy_names = {n for names in (*COMFY_BLOCK_NAMES.values(), *COMFY_TOP_NAMES.values()) for n in names
                   if n not in {"ffn.w1", "ffn.w2", "ffn.w3"}}

    def wrapper_named(k):
        m = _COMFY_KEY.match(k)
        mod = m.group(1) if m else ""
        return any(mod.endswith("." + n) or mod == n for n in comfy_names)

    if any(k.startswith((COMFY_PREFIX, "model.diffusion_model.")) or ".lora_down." in k or ".lora_up." in k
           or k.endswith(".alpha") or wrapper_named(k) for k in keys):
        return "comfy"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise LoraError(f"{where}unknown LoRA layout (first keys {keys[:3]}); expected the PEFT "
                    f"(transformer.<module>.lora_A.weight), official (lora___lorahyphen___...) or ComfyUI "
                    f"(diffusion_model.<module>.lora_down.weight) layout")


def load_any_lora(path) -> tuple[dict, LoraInfo]:
    """Read a LoRA file of any layout; return it in the PEFT layout with per-module rank and alpha."""
    state, meta = _read(path)
    where = f"{path}: "
    layout = detect_layout(state, where)
    if layout == "peft":
        return load_lora_file(path)
    state, alphas = official_to_peft(state, where) if layout == "official" else comfy_to_peft(state, where)
    return state, LoraInfo(layout, _ranks(state), alphas, meta, str(path))


# ---------------------------------------------------------------------------------------------
# official layout (spec §9)
# ---------------------------------------------------------------------------------------------
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


def save_official(path, state: dict, metadata: Optional[dict] = None, alphas: Optional[dict] = None,
                  network_rank: Optional[int] = None) -> Path:
    """Official layout, loadable with ``dit.load_lora(path, key, lora_network_dim=<rank>)`` (the rank
    is in the header; alpha_scale is in the file and overrides the loader's alpha). ``network_rank``
    (e.g. lora_export.OFFICIAL_RANK, the demos' default 128): every module padded to that one rank."""
    ranks = _ranks(state)
    alphas = alphas or _alphas_from_meta(ranks, dict(metadata or {}))
    if network_rank is not None:
        from .lora_export import save_official_padded

        return save_official_padded(path, state, alphas, network_rank)
    rank = min(ranks.values())
    try:
        tensors = peft_to_official(state, alphas, network_rank=rank if len(set(ranks.values())) > 1 else None)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from e
    header = {"format": "pt", "lora_layout": "official", "rank": str(rank),
              "usage": f"dit.load_lora(path, key, lora_network_dim={rank}); alpha_scale is in the file"}
    return atomic_save_safetensors(path, tensors, metadata=header)


# ---------------------------------------------------------------------------------------------
# ComfyUI (Kijai's WanVideoWrapper) layout
# ---------------------------------------------------------------------------------------------
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
    groups: dict = {}
    for k, v in state.items():
        m = _COMFY_KEY.match(k)
        if not m:
            raise LoraError(f"{where}unexpected key {k!r} in a ComfyUI-layout LoRA (expected "
                            f"diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha)")
        kind = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B"}.get(
            m.group(2), "alpha")
        groups.setdefault(m.group(1), {})[kind] = v
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
    """ComfyUI-WanVideoWrapper layout (see the module docstring)."""
    ranks = _ranks(state)
    alphas = alphas or _alphas_from_meta(ranks, dict(metadata or {}))
    try:
        tensors = peft_to_comfy(state, alphas)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from e
    header = {k: v for k, v in _json_header(metadata).items() if k not in ("format", "rank", "alpha")}
    header.update(format="pt", lora_layout="comfy", target="ComfyUI-WanVideoWrapper (LongCat-Video)")
    return atomic_save_safetensors(path, tensors, metadata=header)


def delta_weights(state: dict, alphas: dict) -> dict:
    """module -> ΔW = alpha/r · B·A (in float32 at least): what the LoRA adds to each weight (scale 1)."""
    def up(x):
        return x.to(torch.promote_types(x.dtype, torch.float32))

    return {m: float(alphas[m]) / t["A"].shape[0] * (up(t["B"]) @ up(t["A"])) for m, t in _peft_modules(state).items()}


# ---------------------------------------------------------------------------------------------
# applying saved LoRAs for sampling
# ---------------------------------------------------------------------------------------------
def _check_fits(model: nn.Module, state: dict, path) -> None:
    for module, t in _peft_modules(state, f"{path}: ").items():
        try:
            layer = _base(model.get_submodule(module))
        except AttributeError:
            raise LoraError(f"{path}: module {module!r} is not in this model (a LoRA for another model? "
                            f"this DiT has blocks 0..{len(getattr(model, 'blocks', [])) - 1})") from None
        if not isinstance(layer, nn.Linear):
            raise LoraError(f"{path}: module {module!r} is a {type(layer).__name__}, not a Linear layer")
        want = (layer.out_features, layer.in_features)
        got = (t["B"].shape[0], t["A"].shape[1])
        if got != want:
            raise LoraError(f"{path}: module {module!r} is {want[1]}->{want[0]} in this model, the LoRA is "
                            f"{got[1]}->{got[0]} (a LoRA for another model size?)")


def _unique_name(model: nn.Module, wanted: str) -> str:
    taken = set(getattr(model, "peft_config", {})) | set(adapter_names(model))
    name, i = wanted, 1
    while name in taken:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _load_adapter(model: nn.Module, state: dict, info: LoraInfo, name: str) -> None:
    kwargs = _lora_config_kwargs(info.ranks, info.alphas)
    if _uses_diffusers_peft(model):
        model.load_lora_adapter(state, prefix="transformer", adapter_name=name,
                                metadata={PEFT_PREFIX + k: v for k, v in kwargs.items()})
    else:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(**kwargs), model, adapter_name=name)
        load_lora_state_dict(model, state, adapter_name=name)


def _activate(model: nn.Module, names: list, scales: list) -> None:
    """Make exactly ``names`` active with ``scales``; requires_grad flags stay as they were (peft's
    set_adapter would make the active adapters trainable)."""
    grad = {p: p.requires_grad for p in model.parameters()}
    if _uses_diffusers_peft(model):
        model.set_adapters(names, weights=scales)
    else:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(model, names, scales)
    for p in model.parameters():
        p.requires_grad_(grad.get(p, False))


def apply_loras(model: nn.Module, loras: Iterable[tuple], prefix: str = "lora") -> list[str]:
    """Load LoRA files of any layout as named peft adapters (diffusers ``load_lora_adapter`` +
    ``set_adapters``) and make exactly them active, each with its scale. ``loras``: [(path, scale)].
    Scale 0 leaves the output exactly equal to the base. The adapters are frozen. Returns their names."""
    loaded, names, scales = [], [], []
    try:
        for i, (path, scale) in enumerate(loras):
            state, info = load_any_lora(path)
            _check_fits(model, state, path)
            stem = re.sub(r"[^0-9A-Za-z_]", "_", Path(path).stem)[:48]
            name = _unique_name(model, f"{prefix}{i}_{stem}")
            with _quiet_peft():
                try:
                    _load_adapter(model, state, info, name)
                except LoraError:
                    raise
                except Exception as e:
                    raise LoraError(f"{path}: peft could not load it as an adapter ({e})") from e
            loaded.append(name)
            names.append(name)
            scales.append(float(scale))
        if names:
            _activate(model, names, scales)
    except BaseException:
        if loaded:  # bad input loses nothing: the model is left as it was
            remove_loras(model, loaded)
        raise
    for n, p in model.named_parameters():
        if any(f".{a}." in n for a in names):
            p.requires_grad_(False)
    return names


def set_lora_scales(model: nn.Module, scales: dict) -> None:
    """Change the scales of loaded adapters {name: scale}; exactly these become active."""
    _activate(model, list(scales), [float(s) for s in scales.values()])


def remove_loras(model: nn.Module, names: Optional[Iterable[str]] = None) -> None:
    """Delete adapters (all when ``names`` is None). With none left, the peft wrappers are removed too,
    so the model is module-for-module the base again."""
    present = adapter_names(model)
    names = present if names is None else [n for n in names if n in present]
    grad = {p: p.requires_grad for p in model.parameters()}  # peft re-activates what is left as trainable
    with warnings.catch_warnings():  # "Adapter ... was active which is now deleted": what we mean to do
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        if _uses_diffusers_peft(model):
            if names:
                model.delete_adapters(list(names))
            if not adapter_names(model) and any(True for _ in _lora_layers(model)):
                model.unload_lora()
        else:
            from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

            for name in names:
                delete_adapter_layers(model, name)
                getattr(model, "peft_config", {}).pop(name, None)
            if not adapter_names(model):
                recurse_remove_peft_layers(model)
                if hasattr(model, "peft_config"):
                    del model.peft_config
    for p in model.parameters():
        if p in grad:
            p.requires_grad_(grad[p])


def _lora_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def merge_lora_into_base(model: nn.Module, names: Optional[list] = None) -> None:
    """Fold the active adapters (or the adapters ``names``) into the base weights, W += scale·alpha/r·B·A,
    at their current scales, then remove every LoRA layer (diffusers ``fuse_lora`` + ``unload_lora``).
    Afterwards the model has no adapters and runs at base speed."""
    if not any(True for _ in _lora_layers(model)):
        raise LoraError("the model has no LoRA adapters to merge")
    if _uses_diffusers_peft(model):
        model.fuse_lora(adapter_names=names)
        model.unload_lora()
        return
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for layer in _lora_layers(model):
        layer.merge(adapter_names=names)
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config


def newest_lora(run_dir: str | os.PathLike) -> Optional[Path]:
    files = sorted((Path(run_dir) / "lora").glob("lora-step*.safetensors"))
    files = [f for f in files if not f.stem.endswith(("-official", "-comfy"))]
    return files[-1] if files else None
