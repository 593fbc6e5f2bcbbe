"""Sampling LoRAs stacked on a model that is being trained (lora.adapters.temporary_loras)."""
import torch

from longcat_nb import lora as L
from longcat_nb.model_files import load_components
from longcat_nb.lora.adapters import temporary_loras


def _scalings(dit, name):
    from peft.tuners.lora import LoraLayer

    return [m.scaling[name] for m in dit.modules() if isinstance(m, LoraLayer) and name in m.scaling]


def test_sampling_loras_stay_frozen_beside_a_trained_adapter(tiny_ckpt, tmp_path):
    """Inside the block the sampling adapter is active beside the trained one but frozen (as apply_loras
    leaves it: block swap streams frozen tensors only), and the trained one keeps its scale."""
    other = load_components(tiny_ckpt, parts=["dit"], device="cpu").dit
    L.add_lora(other, rank=2, alpha=2, adapter_name="other")
    path = L.save_lora(tmp_path / "o.safetensors", L.lora_state_dict(other, "other"), {"rank": 2, "alpha": 2})
    dit = load_components(tiny_ckpt, parts=["dit"], device="cpu").dit
    trainable = L.add_lora(dit, rank=4, alpha=2)
    L.set_lora_scales(dit, {"default": 0.5})
    before = _scalings(dit, "default")
    with temporary_loras(dit, [(path, 1.0)]) as names:
        assert L.adapter_names(dit) == ["default", *names]
        active = next(m for m in dit.modules() if hasattr(m, "active_adapters")).active_adapters
        assert sorted(active) == sorted(["default", *names])
        grad = {n for n, p in dit.named_parameters() if p.requires_grad}
        assert grad == set(trainable)  # the sampling adapter is frozen, the trained one trainable
        assert _scalings(dit, "default") == before
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == set(trainable)
    assert _scalings(dit, "default") == before and torch.is_grad_enabled()
