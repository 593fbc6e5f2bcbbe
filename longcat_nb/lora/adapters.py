"""Stacking saved LoRAs on a model at sampling time: each file a named peft adapter with its own scale.

A model with diffusers' ``PeftAdapterMixin`` goes through its ``load_lora_adapter`` / ``set_adapters`` /
``delete_adapters`` / ``fuse_lora``; any other module through the same peft and diffusers.utils functions
those methods call."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch.nn as nn

from .formats import exported_suffixes, load_any_lora
from .inject import _base, _quiet_peft, _uses_diffusers_peft, adapter_names, load_lora_state_dict
from .kinds import config_for, shapes
from .state import PEFT_PREFIX, LoraError, LoraInfo, _lora_config_kwargs
from .traceable import make_traceable


def _check_fits(model: nn.Module, state: dict, path) -> None:
    for module, got in shapes(state, f"{path}: ").items():
        try:
            layer = _base(model.get_submodule(module))
        except AttributeError:
            raise LoraError(f"{path}: module {module!r} is not in this model (a LoRA for another model? "
                            f"this DiT has blocks 0..{len(getattr(model, 'blocks', [])) - 1})") from None
        if not isinstance(layer, nn.Linear):
            raise LoraError(f"{path}: module {module!r} is a {type(layer).__name__}, not a Linear layer")
        want = (layer.out_features, layer.in_features)
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
    if info.adapter != "lora":  # DoRA, LoHa, LoKr: peft's own config for them (kinds.py)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config_for(state, info.ranks, info.alphas, f"{info.path}: "), model, adapter_name=name)
        make_traceable(model)
        load_lora_state_dict(model, state, adapter_name=name)
    elif _uses_diffusers_peft(model):
        model.load_lora_adapter(state, prefix="transformer", adapter_name=name,
                                metadata={PEFT_PREFIX + k: v for k, v in kwargs.items()})
    else:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(**kwargs), model, adapter_name=name)
        load_lora_state_dict(model, state, adapter_name=name)


def activate_adapters(model: nn.Module, names: list, scales: Optional[list] = None) -> None:
    """Make exactly ``names`` active, with ``scales`` (None: each keeps the scale it has); requires_grad
    flags stay as they were (peft's set_adapter would make the active adapters trainable)."""
    grad = {p: p.requires_grad for p in model.parameters()}
    if scales is None:
        for layer in _lora_layers(model):
            layer.set_adapter(names)
    elif _uses_diffusers_peft(model):
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
            activate_adapters(model, names, scales)
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
    activate_adapters(model, list(scales), [float(s) for s in scales.values()])


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
    files = [f for f in files if not f.stem.endswith(exported_suffixes())]
    return files[-1] if files else None


@contextlib.contextmanager
def temporary_loras(model: nn.Module, loras: Sequence[tuple]):
    """Apply LoRA files [(path, scale)] for the block (apply_loras: any layout, scale 0 == base), then
    remove them; adapters that were active before (a LoRA being trained) stay active alongside and
    keep their requires_grad flags. A block-swapped model's swapped copies follow both changes."""
    loras = [(str(p), float(s)) for p, s in loras]
    if not loras:
        yield []
        return
    from ..memory import block_swap_of

    grad = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _active_adapters(model)
    swap = block_swap_of(model)
    with warnings.catch_warnings():  # a second adapter on the same model is what we mean to do
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        names = apply_loras(model, loras)
    if before:
        activate_adapters(model, before + names)  # each adapter keeps its scale
    try:
        if swap is not None:  # the new LoRA weights of swapped blocks stream in with their block
            swap.sync()
        yield names
    finally:
        remove_loras(model, names)
        if swap is not None:
            swap.sync()
        if before:
            activate_adapters(model, before)
        for n, p in model.named_parameters():
            if n in grad:
                p.requires_grad_(grad[n])


def _active_adapters(model: nn.Module) -> list:
    for m in _lora_layers(model):
        return list(m.active_adapters)
    return []
