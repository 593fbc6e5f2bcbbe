"""Injecting a trainable peft LoRA into the DiT: target names (presets, exact matching) and the
state dict of an injected adapter.

A model with diffusers' ``PeftAdapterMixin`` (diffusers' own video transformers mix it in; ``ModelMixin``
alone does not have it in diffusers 0.42) goes through its ``add_adapter``; any other module through
peft's ``inject_adapter_in_model``, the function that method calls."""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..config import DEFAULT_TARGETS
from .kinds import implied_rank, is_adapter_param, peft_config
from .state import PEFT_PREFIX, LoraError
from .traceable import make_traceable

PRESETS = {
    "attention": DEFAULT_TARGETS,
    "attn": DEFAULT_TARGETS,
    "ffn": ["ffn.w1", "ffn.w2", "ffn.w3"],
    "modulation": ["adaLN_modulation.1"],
    "final": ["final_layer.linear", "final_layer.adaLN_modulation.1"],
}
TOP_LEVEL = ("final_layer.", "y_embedder.", "t_embedder.")


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
             alpha_pattern: Optional[dict] = None, adapter: str = "lora") -> list[str]:
    """Inject a trainable peft adapter of type ``adapter`` (lora | dora | lokr | loha, lora/kinds.py;
    diffusers ``add_adapter`` on a ModelMixin, peft's ``inject_adapter_in_model`` otherwise), make it the
    active adapter and freeze everything else. Returns the trainable parameter names."""
    from peft import inject_adapter_in_model

    if int(rank) < 1 or float(alpha) <= 0 or not 0.0 <= float(dropout) < 1.0:
        raise LoraError(f"LoRA rank {rank}, alpha {alpha}, dropout {dropout}: need rank >= 1, alpha > 0, "
                        f"0 <= dropout < 1")
    if adapter_name in getattr(model, "peft_config", {}):
        raise LoraError(f"the model already has a LoRA adapter named {adapter_name!r}: pick another "
                        f"adapter_name or remove_loras(model, [{adapter_name!r}]) first")
    modules = resolve_target_modules(model, targets)
    cfg = peft_config(adapter, modules, rank, alpha, dropout, rank_pattern, alpha_pattern)
    with _seeded(init_seed), _quiet_peft():
        if _uses_diffusers_peft(model):
            model.add_adapter(cfg, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    make_traceable(model)
    names = []
    for n, p in model.named_parameters():
        trainable = is_adapter_param(n, adapter_name)
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
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if ".lora_" in k or ".hada_" in k or ".lokr_" in k]
    missing = [k for k in getattr(res, "missing_keys", []) if is_adapter_param(k, adapter_name)]
    if unexpected or missing:
        raise LoraError(f"LoRA weights do not match adapter {adapter_name!r}: not in the model {unexpected[:3]}, "
                        f"missing from the weights {missing[:3]} (different targets?)")


def module_ranks_alphas(model: nn.Module, adapter_name: str = "default") -> tuple[dict, dict]:
    """Per-module rank and alpha (scale = alpha / rank) of an injected adapter (any type). A LoKr module
    whose factors are all whole has no rank in its tensors: it is given as the rank its tensors imply
    (kinds.ranks) with alpha rescaled to keep alpha / rank, so files never need the rank to load."""
    ranks, alphas = {}, {}
    for n, m in _adapter_layers(model):
        if adapter_name in m.r:
            ranks[n] = int(m.r[adapter_name])
            alphas[n] = float(getattr(m, "lora_alpha", getattr(m, "alpha", None))[adapter_name])
            if getattr(m, "lokr_w2", {}).get(adapter_name) is not None and adapter_name not in m.lokr_w1_b:
                implied = implied_rank(m.lokr_w2[adapter_name])
                ranks[n], alphas[n] = implied, alphas[n] * implied / ranks[n]
    return ranks, alphas


def _adapter_layers(model: nn.Module):
    """(name, layer) of peft's LoRA/DoRA and LyCORIS (LoHa, LoKr) layers."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, LycorisLayer))]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA (DoRA, LoHa, LoKr) adapters present in the model."""
    names: dict = {}
    for _, m in _adapter_layers(model):
        names.update(dict.fromkeys(m.r.keys()))
    return list(names)
