"""Adapter types beside LoRA (train.adapter = dora | lokr | loha, peft's configs): each trains on the tiny
model, resumes exactly, validates, and its peft and ComfyUI files load back into a fresh DiT with the
trained model's output; the official layout refuses them, offering the exact merge where one exists."""
import pytest
import torch
from safetensors.torch import load_file

import longcat_nb.train as T
from longcat_nb import lora as L
from longcat_nb.cache import CachedDataset
from longcat_nb.model_files import load_components
from longcat_nb.config import update_section
from helpers import fresh_copy, one_clip_run
from test_lora import run as run_tiny
from test_lora import tiny

KINDS = ["dora", "lokr", "loha"]
# kv_linear (qkv): ComfyUI names it as two (three) projections, so the fused module is split on export and
# fused on load. Training leaves qkv out: on the tiny checkpoint (hidden 128) LoKr's w1 of qkv has 16 rows,
# not divisible by 3 (the full-size 12288 rows give 96; tests below split qkv at hidden 64)
TARGETS = ["attn", "cross_attn.kv_linear", "final_layer.linear"]
TRAIN_TARGETS = ["attn.proj", "cross_attn.kv_linear", "final_layer.linear"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    src = tmp_path_factory.mktemp("adapters") / "src"
    one_clip_run(src, tiny_ckpt)
    return src


def _output(model, run) -> torch.Tensor:
    """The DiT's prediction on the training clip at a fixed σ and noise."""
    x0, text, mask, _ = T.collate([CachedDataset(run)[0]], "cpu", torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(0.5 * x0 + 0.5 * noise, torch.full((1, x0.shape[2]), 500.0), text, mask).float()


def _fresh_with(path) -> torch.nn.Module:
    dit = load_components("", parts=["dit"], device="cpu").dit.float()
    L.apply_loras(dit, [(path, 1.0)])
    return dit.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_each_type_trains_resumes_validates_and_reloads_from_peft_and_comfy(kind, cached, tmp_path):
    a, b = fresh_copy(cached, tmp_path / "a"), fresh_copy(cached, tmp_path / "b")
    for r in (a, b):
        update_section(r, "train", adapter=kind, steps=4, rank=4, alpha=2, lr=2e-2, checkpoint_every=2, seed=1,
                       targets=TRAIN_TARGETS, validation_steps=1, validation_height=64, validation_width=64,
                       validation_frames=9)
    full = T.train(a, log=lambda *x: None)
    T.train(b, max_steps=2, log=lambda *x: None)
    assert L.load_any_lora(b / "checkpoints" / "step-0000002" / "lora.safetensors")[1].adapter == kind
    res = T.train(b, log=lambda *x: None)  # resumes from step 2
    assert res.losses == full.losses and len(res.losses) == 4

    cfg = T.load_config(b)
    files = {"peft": res.lora_path, "comfy": T.export_lora(b, res.model, cfg.train, "", 4, formats=("comfy",))
             .with_name("lora-step000004-comfy.safetensors"),
             "folded": T.export_lora(tmp_path / "fold", res.model, cfg.train, "", 4, fold_alpha=True)}
    trained = _output(res.model, b)
    base = _output(load_components("", parts=["dit"], device="cpu").dit.float(), b)
    assert (trained - base).abs().max() > 1e-3  # the adapter changed the model
    for name, path in files.items():
        got = _output(_fresh_with(path), b)
        torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5, msg=f"{kind} {name} file")

    update_section(b, "train", validation_prompts=["a green square"])  # validation samples the adapted model
    out = T.Validator(b, T.load_config(b))(4, res.model)
    assert len(out) == 1 and (b / "samples" / "validation" / "step000004_0.mp4").is_file()


def _trained(kind, rank=4, kind_of_model="plain"):
    m = tiny(kind_of_model)
    L.add_lora(m, rank=rank, alpha=2.0, init_seed=0, targets=TARGETS + ["ffn.w2"], adapter=kind)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def test_comfy_keys_are_the_ones_comfyui_reads(tmp_path):
    """ComfyUI core: comfy/weight_adapter/{lokr,loha,lora}.py key names; DoRA's dora_scale [out, 1]."""
    for kind, parts in {"dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
                        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}}.items():
        m = _trained(kind)
        state, (_, alphas) = L.lora_state_dict(m), L.module_ranks_alphas(m)
        sd = load_file(str(L.save_comfy(tmp_path / f"{kind}.safetensors", state, {}, alphas=alphas)))
        q = {k.rsplit("blocks.0.self_attn.q.", 1)[1] for k in sd if k.startswith("diffusion_model.blocks.0.self_attn.q.")}
        assert q == parts, kind
        assert "diffusion_model.blocks.1.cross_attn.v.alpha" in sd and any(k.startswith("diffusion_model.head.head.")
                                                                          for k in sd)
        if kind == "dora":
            assert sd["diffusion_model.blocks.0.self_attn.q.dora_scale"].shape == (64, 1)


def test_lokr_with_whole_factors_folds_its_scale_for_comfyui(tmp_path):
    """rank 8 on the tiny model keeps LoKr's w2 whole: ComfyUI then applies no alpha, so the scale is in w1."""
    m = _trained("lokr", rank=8)
    ref = run_tiny(m)
    state, (ranks, alphas) = L.lora_state_dict(m), L.module_ranks_alphas(m)
    assert not any(k.endswith("lokr_w2_a") for k in state)
    comfy = L.save_comfy(tmp_path / "c.safetensors", state, {}, alphas=alphas)
    assert not any(k.endswith(".alpha") for k in load_file(str(comfy)))
    peft = L.save_trained(tmp_path / "p.safetensors", m)
    for path in (comfy, peft):
        fresh = tiny("plain")
        L.apply_loras(fresh, [(path, 1.0)])
        torch.testing.assert_close(run_tiny(fresh), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_official_refuses_loha_lokr_and_their_exact_merge_is_taken(kind, tmp_path):
    m = _trained(kind)
    state, (ranks, alphas) = L.lora_state_dict(m), L.module_ranks_alphas(m)
    with pytest.raises(L.LoraError, match=rf"plain LoRAs only .* is a {kind}: lora.merge_to_lora"):
        L.save_official(tmp_path / "o.safetensors", state, alphas=alphas)
    merged, merged_alphas = L.merge_to_lora(state, alphas)
    want = L.kinds.deltas(state, alphas, ranks)
    got = L.delta_weights(merged, merged_alphas)
    assert set(got) == set(want)
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod], rtol=1e-5, atol=1e-6)
    path = L.save_official(tmp_path / "o.safetensors", merged, alphas=merged_alphas,  # zero-padded to one rank
                           network_rank=max(x.shape[0] for k, x in merged.items() if k.endswith("lora_A.weight")))
    fresh = tiny("plain")
    L.apply_loras(fresh, [(path, 1.0)])
    torch.testing.assert_close(run_tiny(fresh), run_tiny(m), rtol=1e-4, atol=1e-5)


def test_official_refuses_dora_and_says_why_no_merge(tmp_path):
    m = _trained("dora")
    state, (_, alphas) = L.lora_state_dict(m), L.module_ranks_alphas(m)
    with pytest.raises(L.LoraError, match=r"is a dora: no merge is offered: .*base weight"):
        L.save_official(tmp_path / "o.safetensors", state, alphas=alphas)
    with pytest.raises(L.LoraError, match="cannot be merged into a plain LoRA exactly"):
        L.merge_to_lora(state, alphas)


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_mixin_model_loads_each_type_at_a_scale(kind, tmp_path):
    m = _trained(kind, kind_of_model="diffusers")
    path = L.save_trained(tmp_path / "p.safetensors", m)
    fresh = tiny("diffusers")
    names = L.apply_loras(fresh, [(path, 1.0)])
    torch.testing.assert_close(run_tiny(fresh), run_tiny(m), rtol=1e-5, atol=1e-5)
    L.remove_loras(fresh, names)
    torch.testing.assert_close(run_tiny(fresh), run_tiny(tiny("diffusers")))


def test_unknown_adapter_type_is_refused_by_the_config(tmp_path):
    from longcat_nb.config import ConfigError

    with pytest.raises(ConfigError, match="adapter"):
        update_section(tmp_path, "train", adapter="boft")


def test_planner_counts_each_types_parameters():
    from longcat_nb.planner import TARGET_SHAPES, lora_params

    assert TARGET_SHAPES["attn.qkv"] == (4096, 12288)
    r = 16
    lora = lora_params(r, ["attn.qkv"])
    assert lora == 48 * r * (4096 + 12288)
    assert lora_params(r, ["attn.qkv"], "dora") == lora + 48 * 12288
    assert lora_params(r, ["attn.qkv"], "loha") == 2 * lora
    # LoKr: w1 whole [96, 64] (peft's factorization of 12288 and 4096) + w2 = [128, r]·[r, 64]
    assert lora_params(r, ["attn.qkv"], "lokr") == 48 * (96 * 64 + r * (128 + 64))
    assert lora_params(64, ["attn.qkv"], "lokr") == 48 * (96 * 64 + 128 * 64)  # r >= 128/2: w2 whole


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_compile_traces_each_type_as_one_graph_per_block(kind, checkpointing):
    """compile=on/auto compiles each block; one graph break inside a checkpointed block would send the
    whole block back to eager (peft's own LoKr/LoHa/DoRA forwards break it). The kit's layers trace
    whole, train-mode and checkpointed as in training, and compute what peft's own forward does."""
    import torch._dynamo as dynamo
    from longcat_nb.memory import apply_gradient_checkpointing

    m = tiny()
    L.add_lora(m, rank=4, alpha=4, targets=TARGETS[:2], adapter=kind, init_seed=0)
    with torch.no_grad():  # a non-zero delta everywhere (LoKr/LoHa/DoRA start at ΔW = 0)
        for n, p in m.named_parameters():
            if p.requires_grad and "magnitude" not in n:
                p.add_(0.05 * torch.randn_like(p))
    from peft.tuners.lora import dora

    ours, ours_weight = run_tiny(m), dora.dequantize_module_weight
    marked = [mod for mod in m.modules() if getattr(mod, "_longcat_traceable", False)]
    for mod in marked:  # peft's own code, for the reference output
        for attr in ("forward", "_cache_clear", "_longcat_traceable"):
            mod.__dict__.pop(attr, None)
    dora.dequantize_module_weight = ours_weight.__wrapped__
    try:  # LoKr's factored delta sums in another order (test_lokr_delta_factor_by_factor_is_peft_s)
        theirs = run_tiny(m)
        assert torch.equal(ours, theirs) if kind != "lokr" else torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    finally:
        dora.dequantize_module_weight = ours_weight
    assert marked and L.traceable.make_traceable(m) == len(marked)
    apply_gradient_checkpointing(m.train(), checkpointing)
    block, seen = m.blocks[0], {}
    forward = block.forward

    def capture(*a, **k):
        seen.update(a=a, k=k)
        return forward(*a, **k)
    block.forward = capture
    run_tiny(m)
    block.forward = forward
    dynamo.reset()  # the tests before compiled this code object too: a fresh cache, not its recompile limit
    explained = dynamo.explain(forward)(*seen["a"], **seen["k"])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:1]


@pytest.mark.parametrize("decompose", [False, True])
def test_lokr_delta_factor_by_factor_is_peft_s(decompose):
    """LoKr's delta applied factor by factor (w1 · X · w2ᵀ, no [out, in] matrix) gives peft's
    F.linear(x, kron(w1, w2)) and its gradients, with whole or low-rank factors."""
    from peft import LoKrConfig, inject_adapter_in_model

    from longcat_nb.lora.traceable import _factored, _lokr_delta

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(48, 96))
    cfg = LoKrConfig(r=2 if decompose else 8, alpha=4, target_modules=["0"], decompose_both=decompose)
    model = inject_adapter_in_model(cfg, lin)
    layer = model[0]
    params = [p for n, p in layer.named_parameters() if "lokr" in n]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p))
    assert _factored(layer.train(), "default") and (("default" in layer.lokr_w2_a) == decompose)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    layer.double()
    ours, theirs = _lokr_delta(layer, "default", x), layer._get_delta_activations("default", x)
    assert ours.shape == theirs.shape == (3, 5, 96) and torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(ours.square().sum(), params)
    g_theirs = torch.autograd.grad(theirs.square().sum(), params)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(g_ours, g_theirs))
