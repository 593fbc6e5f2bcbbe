"""Every LoRA file the kit writes loads at the trained scale, through the kit's loader and through readers
that ignore the header; the official export padded to the official loader's rank (128)."""
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from longcat_nb import lora as L
from longcat_nb import lora as X
from longcat_nb import train as T
from longcat_nb.config import TrainSettings
from test_lora import COMFY_MODULES, assert_deltas_equal, official_delta, peft_delta, random_peft, run, tiny

RANK, ALPHA = 4, 2.0  # scale alpha/rank = 0.5: a file read at alpha = rank would be twice too strong


def trained_model():
    m = tiny("plain")
    L.add_lora(m, rank=RANK, alpha=ALPHA, init_seed=0, targets=["attn", "final_layer.linear"])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def merged(deltas: dict):
    """The base with W += ΔW: what any reader ends up computing."""
    m = tiny("plain")
    with torch.no_grad():
        for mod, dw in deltas.items():
            m.get_submodule(mod).weight += dw.float()
    return run(m)


def header_blind_peft(path):
    """peft with a LoraConfig at lora_alpha = r (what a reader without the header assumes)."""
    sd = {k[len("transformer."):]: v for k, v in load_file(str(path)).items()}
    ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    m = tiny("plain")
    r = max(ranks.values())
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks)), m)
    set_peft_model_state_dict(m, sd)
    return run(m)


@pytest.fixture()
def files(tmp_path):
    m = trained_model()
    s = TrainSettings(rank=RANK, alpha=ALPHA, targets=["attn", "final_layer.linear"])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    ckpt = T.save_checkpoint(tmp_path / "checkpoints", 3, m, opt, {"epoch": 0, "batch": 1}, [0.5], s, keep=2)
    peft = T.export_lora(tmp_path, m, s, "tiny", 3, formats=("official", "comfy"))
    folded = T.export_lora(tmp_path / "folded", m, s, "tiny", 3, fold_alpha=True)
    out = {"checkpoint": ckpt / "lora.safetensors", "peft": peft, "folded": folded,
           "official": peft.with_name(peft.stem + "-official.safetensors"),
           "comfy": peft.with_name(peft.stem + "-comfy.safetensors")}
    return m, out


def test_every_file_loads_at_the_trained_scale_in_the_kit(files):
    m, paths = files
    want = run(m)
    for name, path in paths.items():
        base = tiny("plain")
        L.apply_loras(base, [(path, 1.0)])
        assert torch.allclose(run(base), want, atol=1e-6), name
    header = safe_open(str(paths["checkpoint"]), "pt").metadata()
    assert header["alpha"] == "2.0" and header["rank"] == "4" and header["steps"] == "3"


def test_header_blind_readers_get_the_trained_scale(files):
    m, paths = files
    want = run(m)
    assert torch.allclose(header_blind_peft(paths["folded"]), want, atol=1e-6)
    comfy = load_file(str(paths["comfy"]))  # ComfyUI's rule: alpha tensor / rows(lora_down), no header
    assert all(torch.equal(comfy[k], torch.tensor(ALPHA)) for k in comfy if k.endswith(".alpha"))
    assert torch.allclose(merged(peft_delta(*L.comfy_to_peft(comfy))), want, atol=1e-6)
    assert torch.allclose(merged(official_delta(load_file(str(paths["official"])))), want, atol=1e-6)
    # unfolded files need their header: diffusers' load_lora_adapter reads it (lora_adapter_metadata)
    for name in ("checkpoint", "peft"):
        d = tiny("diffusers")
        d.load_lora_adapter(str(paths[name].parent), weight_name=paths[name].name, prefix="transformer",
                            adapter_name="x")
        assert d.peft_config["x"].lora_alpha == ALPHA and torch.allclose(run(d), want, atol=1e-6), name
        assert not torch.allclose(header_blind_peft(paths[name]), want, atol=1e-4)  # why folding exists


def test_checkpoint_with_header_still_resumes_exactly(files):
    m, paths = files
    twin = tiny("plain")
    L.add_lora(twin, rank=RANK, alpha=ALPHA, targets=["attn", "final_layer.linear"])
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad])
    T.load_checkpoint(paths["checkpoint"].parent, twin, opt)
    a, b = L.lora_state_dict(m), L.lora_state_dict(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def official_loader_deltas(path, dim=X.OFFICIAL_RANK):
    """The official dit.load_lora(path, key, lora_network_dim=dim): every module is built at rank ``dim``
    (n-split from the lora_up.blocks count) and the file loaded with strict=True, so shapes must match."""
    sd = load_file(str(path))
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        n = sum(k.startswith(name + ".lora_up.blocks.") for k in sd) or 1
        assert sd[key].shape[0] == n * dim, (key, sd[key].shape)
        ups = [sd[f"{name}.lora_up.blocks.{j}.weight"] for j in range(n)] if n > 1 else [sd[f"{name}.lora_up.weight"]]
        assert all(u.shape[1] == dim for u in ups) and sd[f"{name}.alpha_scale"].dim() == 0
    return official_delta(sd)


def test_official_export_padded_to_128_keeps_the_update(tmp_path, files):
    m, paths = files
    state, (_, alphas) = L.lora_state_dict(m), L.module_ranks_alphas(m)
    assert_deltas_equal(official_loader_deltas(paths["official"]), peft_delta(state, alphas), tol=1e-6)
    header = safe_open(str(paths["official"]), "pt").metadata()
    assert header["rank"] == "128" and header["usage"].startswith("pipe.dit.load_lora(path, 'my_lora')")
    # a module of rank 2·128 whose lora_B is block-diagonal (an official kv split) is written n-split
    state, alphas = random_peft({k: v for k, v in COMFY_MODULES.items() if "kv" not in k}, r=3, alpha=6.0)
    kv = torch.zeros(128, 256)
    kv[:64, :128], kv[64:, 128:] = torch.randn(64, 128), torch.randn(64, 128)
    state.update({"transformer.blocks.1.cross_attn.kv_linear.lora_A.weight": torch.randn(256, 64),
                  "transformer.blocks.1.cross_attn.kv_linear.lora_B.weight": kv})
    alphas["blocks.1.cross_attn.kv_linear"] = 128.0
    out = L.save_official(tmp_path / "p.safetensors", state, alphas=alphas, network_rank=128)
    assert_deltas_equal(official_loader_deltas(out), peft_delta(state, alphas), tol=1e-9)
    back, info = L.load_any_lora(out)  # and back through the kit: the same ΔW
    assert_deltas_equal(peft_delta(back, info.alphas), peft_delta(state, alphas), tol=1e-9)
    # smaller network ranks: the same file for lora_network_dim=8; a rank-3 LoRA cannot go to rank 2
    small_state, small_alphas = random_peft(COMFY_MODULES, r=3)
    small = L.save_official(tmp_path / "s.safetensors", small_state, alphas=small_alphas, network_rank=8)
    assert "lora_network_dim=8" in safe_open(str(small), "pt").metadata()["usage"]
    official_loader_deltas(small, dim=8)
    with pytest.raises(L.LoraError, match=r"x.safetensors.*rank 3.*network_rank >= the largest rank \(3\)"):
        L.save_official(tmp_path / "x.safetensors", small_state, alphas=small_alphas, network_rank=2)
    assert not (tmp_path / "x.safetensors").exists()
