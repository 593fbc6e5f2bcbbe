"""LoRA injection, files and layout conversions on the tiny DiT."""
import json

import pytest
import torch

from longcat_nb import lora as L
from test_dit import inputs, tiny_model


def _rand_official(n_split, r=4, d_in=16, d_out=24, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    name = L._official_name("blocks.0.attn.qkv")
    sd = {f"{name}.lora_down.weight": torch.randn(n_split * r, d_in, generator=g),
          f"{name}.alpha_scale": torch.tensor(scale)}
    if n_split == 1:
        sd[f"{name}.lora_up.weight"] = torch.randn(d_out, r, generator=g)
    else:
        for j in range(n_split):
            sd[f"{name}.lora_up.blocks.{j}.weight"] = torch.randn(d_out // n_split, r, generator=g)
    return sd


def _official_delta(sd):
    name = next(iter(sd)).split(".")[0]
    down = sd[f"{name}.lora_down.weight"]
    ups = [sd[k] for k in sorted(k for k in sd if ".lora_up." in k)]
    n = len(ups)
    r = down.shape[0] // n
    return float(sd[f"{name}.alpha_scale"]) * torch.cat([ups[j] @ down[j * r:(j + 1) * r] for j in range(n)], 0)


@pytest.mark.parametrize("n_split", [1, 2, 3, 6])
def test_official_to_peft_to_official_keeps_delta(n_split):
    sd = _rand_official(n_split)
    ref = _official_delta(sd)
    peft_sd, alphas = L.official_to_peft(sd)
    assert torch.allclose(L.delta_weights(peft_sd, alphas)["blocks.0.attn.qkv"], ref, atol=1e-5)
    back = L.peft_to_official(peft_sd, alphas)
    assert torch.allclose(_official_delta(back), ref, atol=1e-5)
    assert back[next(k for k in back if k.endswith("alpha_scale"))].dim() == 0


def test_comfy_round_trip_and_split_fused():
    peft_sd, alphas = L.official_to_peft(_rand_official(3))
    comfy = L.peft_to_comfy(peft_sd, alphas)
    assert all(k.startswith("diffusion_model.blocks.0.attn.qkv.") for k in comfy)
    back, a2 = L.comfy_to_peft(comfy)
    assert torch.allclose(L.delta_weights(back, a2)["blocks.0.attn.qkv"], L.delta_weights(peft_sd, alphas)["blocks.0.attn.qkv"])
    split, sa = L.split_fused(peft_sd, alphas)
    d = L.delta_weights(split, sa)
    fused = torch.cat([d["blocks.0.attn.qkv.q"], d["blocks.0.attn.qkv.k"], d["blocks.0.attn.qkv.v"]], 0)
    assert torch.allclose(fused, L.delta_weights(peft_sd, alphas)["blocks.0.attn.qkv"], atol=1e-6)
    assert L.detect_layout(comfy) == "comfy" and L.detect_layout(peft_sd) == "peft"


def test_targets_never_hit_conv3d_and_unknown_target_errors():
    m = tiny_model()
    names = L.resolve_target_modules(m, ["attn.proj", "cross_attn.proj"])
    assert "x_embedder.proj" not in names and len(names) == 4
    with pytest.raises(L.LoraError, match="matches no layer"):
        L.resolve_target_modules(m, ["proj"])
    assert len(L.resolve_target_modules(m, ["ffn"])) == 6


def test_add_lora_save_load_metadata_and_scale_zero(tmp_path):
    x, y, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    base = tiny_model()
    with torch.no_grad():
        ref = base(x, t, y, mask)
    m = tiny_model()
    trainable = L.add_lora(m, rank=4, alpha=8)
    assert trainable and all("lora_" in n for n in trainable)
    assert not m.x_embedder.proj.weight.requires_grad
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = L.lora_state_dict(m)
    path = L.save_lora(tmp_path / "a.safetensors", state, {"rank": 4, "alpha": 8, "steps": 7, "base_model": "tiny"})
    loaded, info = L.load_any_lora(path)
    assert info.layout == "peft" and set(info.ranks.values()) == {4} and set(info.alphas.values()) == {8.0}
    assert json.loads(info.metadata["steps"]) == 7
    with torch.no_grad():
        trained = m(x, t, y, mask)
    # apply the file to a fresh model: scale 1 equals the trained model, scale 0 equals the base
    fresh = tiny_model()
    names = L.apply_loras(fresh, [(path, 1.0)])
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, y, mask), trained, atol=1e-5)
    L.remove_loras(fresh)
    fresh = tiny_model()
    L.apply_loras(fresh, [(path, 0.0)])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y, mask), ref)
    assert names


def test_official_file_equals_merged_weights_and_two_loras(tmp_path):
    from safetensors.torch import save_file

    x, y, mask = inputs()
    t = torch.tensor([300.0, 700.0])
    m = tiny_model()
    g = torch.Generator().manual_seed(3)
    # an official-layout file on qkv (n = 3) and ffn.w1 (n = 1), rank 2, alpha_scale 0.5
    sd = {}
    for path, n, (o, i) in (("blocks.0.attn.qkv", 3, (192, 64)), ("blocks.1.ffn.w1", 1, tuple(m.blocks[1].ffn.w1.weight.shape))):
        name = L._official_name(path)
        sd[f"{name}.lora_down.weight"] = torch.randn(n * 2, i, generator=g) * 0.1
        sd[f"{name}.alpha_scale"] = torch.tensor(0.5)
        if n == 1:
            sd[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g) * 0.1
        else:
            for j in range(n):
                sd[f"{name}.lora_up.blocks.{j}.weight"] = torch.randn(o // n, 2, generator=g) * 0.1
    save_file(sd, tmp_path / "off.safetensors")
    merged = tiny_model()
    peft_sd, alphas = L.official_to_peft(sd)
    with torch.no_grad():
        for mod, dw in L.delta_weights(peft_sd, alphas).items():
            merged.get_submodule(mod).weight += dw
        want = merged(x, t, y, mask)
    L.apply_loras(m, [(tmp_path / "off.safetensors", 1.0)])
    with torch.no_grad():
        assert torch.allclose(m(x, t, y, mask), want, atol=1e-5)
    # a second LoRA at the same time adds its own delta
    m2 = tiny_model()
    L.apply_loras(m2, [(tmp_path / "off.safetensors", 0.5), (tmp_path / "off.safetensors", 0.5)])
    with torch.no_grad():
        assert torch.allclose(m2(x, t, y, mask), want, atol=1e-5)
