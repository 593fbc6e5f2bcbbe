"""LoRA: exact target names, the three file layouts and their exact conversions, applying LoRAs to the DiT."""
import json

import pytest
import torch
import torch.nn as nn
from diffusers.loaders import PeftAdapterMixin
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_nb import lora as L
from longcat_nb.models import LongCatVideoTransformer3DModel
from test_dit import TINY, inputs

torch.set_default_dtype(torch.float32)


class PeftDiT(LongCatVideoTransformer3DModel, PeftAdapterMixin):
    """The DiT with diffusers' adapter API, as diffusers' own video transformers have it."""


def tiny(kind="plain", seed=0):
    torch.manual_seed(seed)
    m = (PeftDiT if kind == "diffusers" else LongCatVideoTransformer3DModel)(**TINY).eval()
    with torch.no_grad():  # make modulation matter, as test_dit.tiny_model does
        for b in m.blocks:
            b.adaLN_modulation[1].weight.mul_(5)
    return m


def run(m):
    x, y, mask = inputs()
    with torch.no_grad():
        return m(x, torch.tensor([300.0, 700.0]), y, mask)


# tiny shapes of the official split modules (spec §9.2 at hidden 64, adaLN embed 32): module -> (n, out, in)
SPLITS = {
    "blocks.0.attn.qkv": (3, 192, 64),
    "blocks.0.cross_attn.kv_linear": (2, 128, 64),
    "blocks.1.adaLN_modulation.1": (6, 384, 32),
    "final_layer.adaLN_modulation.1": (2, 128, 32),
    "blocks.1.ffn.w2": (1, 64, 256),
    "final_layer.linear": (1, 64, 64),
}


def official_sd(modules, r=2, scale=0.5, seed=0, dtype=torch.float32):
    """An official-layout state dict (spec §9.1) for module -> (n, out, in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (n, out, inp) in modules.items():
        name = L._official_name(path)
        sd[f"{name}.lora_down.weight"] = (torch.randn(n * r, inp, generator=g) * 0.2).to(dtype)
        if n == 1:
            sd[f"{name}.lora_up.weight"] = (torch.randn(out, r, generator=g) * 0.2).to(dtype)
        for j in range(n if n > 1 else 0):
            sd[f"{name}.lora_up.blocks.{j}.weight"] = (torch.randn(out // n, r, generator=g) * 0.2).to(dtype)
        sd[f"{name}.alpha_scale"] = torch.tensor(scale)
    return sd


def official_delta(sd):
    """ΔW per module straight from spec §9.2: chunk j of lora_down feeds up_j; outputs concatenated."""
    out = {}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down = sd[key].double()
        n = sum(f"{name}.lora_up.blocks." in k for k in sd)
        ups = [sd[f"{name}.lora_up.blocks.{j}.weight"] for j in range(n)] if n else [sd[f"{name}.lora_up.weight"]]
        r = down.shape[0] // len(ups)
        dw = torch.cat([u.double() @ down[j * r:(j + 1) * r] for j, u in enumerate(ups)], 0)
        out[name[len(L.OFFICIAL_PREFIX):].replace(L.OFFICIAL_SEP, ".")] = float(sd[f"{name}.alpha_scale"]) * dw
    return out


def comfy_delta(sd):
    """ΔW per ComfyUI module as ComfyUI computes it: alpha / rows(lora_down) · up · down."""
    out = {}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        base = key[: -len(".lora_down.weight")]
        down, up = sd[key].double(), sd[f"{base}.lora_up.weight"].double()
        out[base[len("diffusion_model."):]] = float(sd[f"{base}.alpha"]) / down.shape[0] * (up @ down)
    return out


def peft_delta(state, alphas):
    return {m: d.double() for m, d in L.delta_weights({k: v.double() for k, v in state.items()}, alphas).items()}


def assert_deltas_equal(a, b, tol=1e-12):
    assert set(a) == set(b)
    for m in a:
        assert torch.allclose(a[m].double(), b[m].double(), atol=tol, rtol=0), m


def random_peft(modules, r=4, alpha=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out, inp) in modules.items():
        sd[f"transformer.{path}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.2
        sd[f"transformer.{path}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2
    return sd, {m: alpha for m in modules}


# every module kind the ComfyUI-WanVideoWrapper map knows, at tiny sizes: module -> (out, in)
COMFY_MODULES = {"blocks.0.attn.qkv": (192, 64), "blocks.0.attn.proj": (64, 64),
                 "blocks.1.cross_attn.q_linear": (64, 64), "blocks.1.cross_attn.kv_linear": (128, 64),
                 "blocks.1.cross_attn.proj": (64, 64), "blocks.0.ffn.w1": (256, 64), "blocks.0.ffn.w2": (64, 256),
                 "blocks.0.ffn.w3": (256, 64), "blocks.1.adaLN_modulation.1": (384, 32),
                 "final_layer.linear": (64, 64), "final_layer.adaLN_modulation.1": (128, 32)}


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
def test_targets_are_exact_and_never_hit_the_conv3d():
    m = tiny()
    names = L.resolve_target_modules(m)
    assert len(names) == 5 * 2 and "x_embedder.proj" not in names
    assert all(isinstance(m.get_submodule(n), nn.Linear) for n in names)
    assert sorted(L.resolve_target_modules(m, ["attn.proj", "cross_attn.proj"])) == [
        "blocks.0.attn.proj", "blocks.0.cross_attn.proj", "blocks.1.attn.proj", "blocks.1.cross_attn.proj"]
    with pytest.raises(L.LoraError, match=r"'proj' matches no layer.*Did you mean \['attn.proj', 'cross_attn.proj'\]"):
        L.resolve_target_modules(m, ["proj"])  # peft's suffix matching would have hit x_embedder.proj
    with pytest.raises(L.LoraError, match="matches no layer"):
        L.resolve_target_modules(m, ["x_embedder.proj"])
    with pytest.raises(L.LoraError, match="non-Linear"):
        L.resolve_target_modules(m, ["attn.q_norm"])
    assert len(L.resolve_target_modules(m, ["ffn"])) == 6
    assert len(L.resolve_target_modules(m, ["modulation"])) == 2
    assert L.resolve_target_modules(m, ["final"]) == ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    assert L.resolve_target_modules(m, ["blocks.1.attn.qkv"]) == ["blocks.1.attn.qkv"]

    trainable = L.add_lora(m, rank=2, alpha=2, targets=["attn", "ffn", "modulation", "final"])
    assert type(m.x_embedder.proj) is nn.Conv3d and not any("x_embedder" in n for n in trainable)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(trainable)
    assert len(trainable) == 2 * (2 * 9 + 2)
    # resolving again on the adapted model still sees the Linear layers under the peft wrappers
    assert len(L.resolve_target_modules(m)) == 10


# ---------------------------------------------------------------------------------------------
# official layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_official_to_peft_to_official_keeps_delta(n):
    module = {1: "blocks.1.ffn.w2", 2: "blocks.0.cross_attn.kv_linear", 3: "blocks.0.attn.qkv",
              6: "blocks.1.adaLN_modulation.1"}[n]
    sd = official_sd({module: SPLITS[module]}, r=4, scale=0.5, dtype=torch.float64)
    ref = official_delta(sd)
    state, alphas = L.official_to_peft(sd)
    A, B = state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]
    assert A.shape[0] == B.shape[1] == 4 * n and alphas[module] == 0.5 * 4 * n  # r' = n·r, alpha = a·r'
    assert_deltas_equal(peft_delta(state, alphas), ref)
    back = L.peft_to_official(state, alphas)  # n = 1, block-diagonal up
    scale = back[f"{L._official_name(module)}.alpha_scale"]
    assert scale.dim() == 0 and scale.dtype == torch.float32 and float(scale) == 0.5
    assert not any(".lora_up.blocks." in k for k in back)
    assert_deltas_equal(official_delta(back), ref)
    # with the network rank, the n-split comes back tensor for tensor
    again = L.peft_to_official(state, alphas, network_rank=4)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k].to(again[k].dtype)) for k in sd)


def test_official_files_round_trip_and_bad_files_are_named(tmp_path):
    sd = official_sd(SPLITS, r=2)
    save_file(sd, str(tmp_path / "off.safetensors"))
    state, info = L.load_any_lora(tmp_path / "off.safetensors")
    assert info.layout == "official" and info.ranks["blocks.0.attn.qkv"] == 6
    assert_deltas_equal(peft_delta(state, info.alphas), official_delta(sd), tol=1e-9)
    # save_official restores the n-splits so every module has the one rank the official loader takes
    out = L.save_official(tmp_path / "back.safetensors", state, alphas=info.alphas)
    with safe_open(str(out), "pt") as f:
        back = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["rank"] == "2"
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # a LoRA whose ranks differ and do not split cannot be saved for the official loader
    mixed, alphas = random_peft({"blocks.0.attn.proj": (64, 64)}, r=4)
    mixed.update(random_peft({"blocks.0.attn.qkv": (192, 64)}, r=6)[0])
    alphas["blocks.0.attn.qkv"] = 6.0
    with pytest.raises(L.LoraError, match=r"x.safetensors.*attn.qkv.*one rank"):
        L.save_official(tmp_path / "x.safetensors", mixed, alphas=alphas)
    assert not (tmp_path / "x.safetensors").exists()
    broken = {k: v for k, v in sd.items() if not k.endswith("alpha_scale")}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(L.LoraError, match=r"broken.safetensors.*alpha_scale is missing"):
        L.load_any_lora(tmp_path / "broken.safetensors")


# ---------------------------------------------------------------------------------------------
# ComfyUI (WanVideoWrapper) layout
# ---------------------------------------------------------------------------------------------
def test_peft_to_comfy_to_peft_is_exact_with_wrapper_names():
    state, alphas = random_peft(COMFY_MODULES, r=4, alpha=8.0)
    comfy = L.peft_to_comfy(state, alphas)
    mods = {k[len("diffusion_model."):].rsplit(".", 2 if k.endswith("weight") else 1)[0] for k in comfy}
    assert mods == {
        "blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.self_attn.o",
        "blocks.1.cross_attn.q", "blocks.1.cross_attn.k", "blocks.1.cross_attn.v", "blocks.1.cross_attn.o",
        "blocks.0.ffn.w1", "blocks.0.ffn.w2", "blocks.0.ffn.w3", "blocks.1.modulation.1",
        "head.head", "head.modulation.1"}
    assert all(comfy[k].dim() == 0 for k in comfy if k.endswith(".alpha"))
    # what ComfyUI adds to each unfused weight stacks up to the fused ΔW
    d, want = comfy_delta(comfy), peft_delta(state, alphas)
    qkv = torch.cat([d[f"blocks.0.self_attn.{p}"] for p in "qkv"], 0)
    kv = torch.cat([d[f"blocks.1.cross_attn.{p}"] for p in "kv"], 0)
    assert torch.allclose(qkv, want["blocks.0.attn.qkv"], atol=1e-12)
    assert torch.allclose(kv, want["blocks.1.cross_attn.kv_linear"], atol=1e-12)
    assert torch.allclose(d["blocks.1.modulation.1"], want["blocks.1.adaLN_modulation.1"], atol=1e-12)
    assert torch.allclose(d["head.head"], want["final_layer.linear"], atol=1e-12)
    # ... and re-fusing gives back the very same tensors
    back, back_alphas = L.comfy_to_peft(comfy)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert back_alphas == alphas


def test_comfy_from_official_splits_compactly_and_refuses_exactly():
    sd = official_sd(SPLITS, r=2)
    state, alphas = L.official_to_peft(sd)
    comfy = L.peft_to_comfy(state, alphas)
    # the zero columns of each split of the block-diagonal up are dropped: rank 2 per projection, alpha/rank kept
    assert comfy["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (2, 64)
    assert float(comfy["diffusion_model.blocks.0.self_attn.q.alpha"]) == 1.0
    assert comfy["diffusion_model.blocks.1.modulation.1.lora_down.weight"].shape == (12, 32)  # one weight: kept
    d = comfy_delta(comfy)
    ref = official_delta(sd)
    assert torch.allclose(torch.cat([d[f"blocks.0.self_attn.{p}"] for p in "qkv"]), ref["blocks.0.attn.qkv"], atol=1e-9)
    back, back_alphas = L.comfy_to_peft(comfy)
    assert_deltas_equal(peft_delta(back, back_alphas), ref, tol=1e-9)
    # typical Wan LoRAs adapt q and v only: k's rows of the fused ΔW are zero
    qv = {k: v for k, v in comfy.items() if ".self_attn.k." not in k and "self_attn" in k}
    part, part_alphas = L.comfy_to_peft(qv)
    dq = peft_delta(part, part_alphas)["blocks.0.attn.qkv"]
    assert dq.shape == (192, 64) and not dq[64:128].any()
    assert torch.allclose(dq[128:], ref["blocks.0.attn.qkv"][128:], atol=1e-9)


def test_comfy_errors_name_the_key():
    with pytest.raises(L.LoraError, match="t_embedder.mlp.0.*no known ComfyUI-WanVideoWrapper name"):
        L.peft_to_comfy(*random_peft({"t_embedder.mlp.0": (32, 32)}))
    bad = {"diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight": torch.zeros(2, 8),
           "diffusion_model.blocks.0.self_attn.norm_q.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(L.LoraError, match="self_attn.norm_q"):
        L.comfy_to_peft(bad)
    with pytest.raises(L.LoraError, match="dora_scale"):
        L.comfy_to_peft({"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# files, headers, layouts
# ---------------------------------------------------------------------------------------------
def test_metadata_survives_save_and_load(tmp_path):
    from peft import LoraConfig

    state, alphas = random_peft(COMFY_MODULES, r=4, alpha=8.0)
    state.update(random_peft({"blocks.1.attn.qkv": (192, 64)}, r=8)[0])
    alphas["blocks.1.attn.qkv"] = 4.0  # another rank and alpha for one module
    meta = {"rank": 4, "alpha": 8.0, "targets": ["attn", "ffn"], "base_model": "tiny", "steps": 7,
            "settings": {"lr": 1e-4, "rank": 4}, "format": "peft"}
    path = L.save_lora(tmp_path / "lora" / "a.safetensors", state, meta, alphas=alphas)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["a.safetensors"]  # no temp files left
    loaded, info = L.load_lora_file(path)
    assert info.layout == "peft" and info.alphas == alphas and info.ranks["blocks.1.attn.qkv"] == 8
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert info.value("steps") == 7 and info.value("settings") == {"lr": 1e-4, "rank": 4}
    assert info.value("base_model") == "tiny" and info.value("targets") == ["attn", "ffn"]
    assert info.value("rank") == 4 and info.value("alpha") == 8.0 and info.metadata["format"] == "pt"
    assert info.value("rank_pattern") == {"blocks.1.attn.qkv": 8}
    assert info.value("alpha_pattern") == {"blocks.1.attn.qkv": 4.0}
    # diffusers' own header entry is a valid LoraConfig for the same modules
    cfg = {k[len("transformer."):]: v for k, v in info.value("lora_adapter_metadata").items()}
    assert LoraConfig(**cfg).r == 4 and sorted(cfg["target_modules"]) == sorted(info.ranks)
    # headers written by other tools: diffusers' adapter metadata only, or none at all (alpha = rank)
    save_file(state, str(tmp_path / "d.safetensors"), metadata={
        "format": "pt", "lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 2.0, "transformer.r": 4,
                                                             "transformer.alpha_pattern": {"qkv": 16.0}})})
    _, dinfo = L.load_lora_file(tmp_path / "d.safetensors")
    assert dinfo.alphas["blocks.0.attn.proj"] == 2.0 and dinfo.alphas["blocks.1.attn.qkv"] == 16.0
    save_file(state, str(tmp_path / "n.safetensors"))
    assert L.load_lora_file(tmp_path / "n.safetensors")[1].alphas["blocks.1.attn.qkv"] == 8.0


def test_detect_layout_and_load_any(tmp_path):
    off = official_sd(SPLITS, r=2)
    peft_state, alphas = L.official_to_peft(off)
    comfy = L.peft_to_comfy(peft_state, alphas)
    assert L.detect_layout(off) == "official"
    assert L.detect_layout(peft_state) == "peft"
    assert L.detect_layout(comfy) == "comfy"
    assert L.detect_layout({k.replace("diffusion_model.", ""): v for k, v in comfy.items()}) == "comfy"
    with pytest.raises(L.LoraError, match="unknown LoRA layout"):
        L.detect_layout({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    save_file(off, str(tmp_path / "o.safetensors"))
    L.save_comfy(tmp_path / "c.safetensors", peft_state, alphas=alphas)
    L.save_lora(tmp_path / "p.safetensors", peft_state, alphas=alphas)
    ref = official_delta(off)
    for name, layout in (("o", "official"), ("c", "comfy"), ("p", "peft")):
        state, info = L.load_any_lora(tmp_path / f"{name}.safetensors")
        assert info.layout == layout and info.path.endswith(f"{name}.safetensors")
        assert_deltas_equal(peft_delta(state, info.alphas), ref, tol=1e-9)
    with pytest.raises(L.LoraError, match=r"o.safetensors is in the official layout.*load_any_lora"):
        L.load_lora_file(tmp_path / "o.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(L.LoraError, match="junk.safetensors is not a readable safetensors file"):
        L.load_any_lora(tmp_path / "junk.safetensors")
    with pytest.raises(L.LoraError, match="does not exist"):
        L.load_any_lora(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# on the DiT (both the plain class and one with diffusers' PeftAdapterMixin)
# ---------------------------------------------------------------------------------------------
KINDS = ["plain", "diffusers"]


@pytest.mark.parametrize("kind", KINDS)
def test_add_lora_save_apply_scale_zero_and_remove(kind, tmp_path):
    base = tiny(kind)
    ref = run(base)
    m = tiny(kind)
    trainable = L.add_lora(m, rank=4, alpha=8, init_seed=3)
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(trainable)
    twin = tiny(kind)
    before = torch.get_rng_state()
    L.add_lora(twin, rank=4, alpha=8, init_seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the seeded init leaves the caller's RNG alone
    assert all(torch.equal(a, b) for a, b in zip(L.lora_state_dict(m).values(), L.lora_state_dict(twin).values()))
    assert torch.equal(run(m), ref)  # B = 0 at init
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    trained = run(m)
    assert not torch.allclose(trained, ref)
    assert L.module_ranks_alphas(m)[1]["blocks.0.attn.qkv"] == 8.0
    with pytest.raises(L.LoraError, match="already has a LoRA adapter named 'default'"):
        L.add_lora(m, rank=4, alpha=8)
    path = L.save_lora(tmp_path / "a.safetensors", L.lora_state_dict(m), {"rank": 4, "alpha": 8})

    names = L.apply_loras(base, [(path, 0.0)])
    assert torch.equal(run(base), ref)  # scale 0: exactly the base
    L.set_lora_scales(base, {names[0]: 1.0})
    assert torch.allclose(run(base), trained, atol=1e-6)
    assert not any(p.requires_grad for n, p in base.named_parameters() if ".lora_" in n)
    L.remove_loras(base)
    assert type(base.blocks[0].attn.qkv) is nn.Linear and not L.adapter_names(base)
    assert torch.equal(run(base), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_official_file_equals_merged_weights_and_two_loras_at_once(kind, tmp_path):
    off = official_sd(SPLITS, r=2, scale=0.5, seed=1)
    save_file(off, str(tmp_path / "off.safetensors"))
    other, other_alphas = random_peft({k: v for k, v in COMFY_MODULES.items() if "final" not in k}, r=3, seed=2)
    L.save_comfy(tmp_path / "other-comfy.safetensors", other, alphas=other_alphas)

    # the reference: W + s·ΔW computed by hand from the official tensors (spec §9.2) and the other LoRA
    merged = tiny(kind)
    with torch.no_grad():
        for mod, dw in official_delta(off).items():
            merged.get_submodule(mod).weight += (0.7 * dw).float()
    want_one = run(merged)
    with torch.no_grad():
        for mod, dw in peft_delta(other, other_alphas).items():
            merged.get_submodule(mod).weight += (0.5 * dw).float()
    want_two = run(merged)

    m = tiny(kind)
    L.apply_loras(m, [(tmp_path / "off.safetensors", 0.7)])
    assert torch.allclose(run(m), want_one, atol=1e-5)
    L.remove_loras(m)
    names = L.apply_loras(m, [(tmp_path / "off.safetensors", 0.7), (tmp_path / "other-comfy.safetensors", 0.5)])
    assert len(names) == 2 and len(set(names)) == 2
    assert torch.allclose(run(m), want_two, atol=1e-5)
    L.merge_lora_into_base(m)  # fold both in at their scales
    assert not L.adapter_names(m) and type(m.blocks[0].attn.qkv) is nn.Linear
    assert torch.allclose(run(m), want_two, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_for_another_model_is_refused_and_nothing_stays(kind, tmp_path):
    m = tiny(kind)
    ref = run(m)
    L.save_lora(tmp_path / "ok.safetensors", *random_peft({"blocks.0.attn.proj": (64, 64)}))
    L.save_lora(tmp_path / "big.safetensors", *random_peft({"blocks.0.attn.proj": (4096, 4096)}, r=1))
    L.save_lora(tmp_path / "deep.safetensors", *random_peft({"blocks.47.attn.proj": (64, 64)}))
    with pytest.raises(L.LoraError, match=r"big.safetensors: module 'blocks.0.attn.proj' is 64->64 in this model"):
        L.apply_loras(m, [(tmp_path / "ok.safetensors", 1.0), (tmp_path / "big.safetensors", 1.0)])
    assert not L.adapter_names(m) and torch.equal(run(m), ref)  # the first file was taken out again
    with pytest.raises(L.LoraError, match=r"deep.safetensors: module 'blocks.47.attn.proj' is not in this model"):
        L.apply_loras(m, [(tmp_path / "deep.safetensors", 1.0)])


@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_adapter_survives_sampling_loras(kind, tmp_path):
    m = tiny(kind)
    trainable = L.add_lora(m, rank=2, alpha=2, init_seed=0)
    L.save_lora(tmp_path / "s.safetensors", *random_peft({"blocks.1.attn.qkv": (192, 64)}, r=2))
    names = L.apply_loras(m, [(tmp_path / "s.safetensors", 1.0), (tmp_path / "s.safetensors", 1.0)])
    assert names == ["lora0_s", "lora1_s"] and set(L.adapter_names(m)) == {"default", *names}
    L.remove_loras(m, names)
    assert L.adapter_names(m) == ["default"]
    assert set(L.lora_state_dict(m)) == {f"transformer.{n.replace('.default.', '.')}" for n in trainable}


def test_diffusers_reads_our_file_natively(tmp_path):
    """The PEFT layout is diffusers' own: load_lora_adapter finds the alphas in lora_adapter_metadata."""
    state, alphas = random_peft(COMFY_MODULES, r=4, alpha=2.0)
    path = L.save_lora(tmp_path / "n.safetensors", state, alphas=alphas)
    ours, theirs = tiny("diffusers"), tiny("diffusers")
    L.apply_loras(ours, [(path, 1.0)])
    theirs.load_lora_adapter(str(tmp_path), weight_name="n.safetensors", prefix="transformer", adapter_name="x")
    assert theirs.peft_config["x"].lora_alpha == 2.0
    assert torch.allclose(run(theirs), run(ours), atol=1e-6)
