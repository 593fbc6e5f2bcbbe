"""The DiT: official layout at full size, and the behaviour the sampler and trainer rely on."""
import json

import pytest
import torch

from longcat_nb.models import LongCatVideoTransformer3DModel
from longcat_nb.models.dit import RMSNormFP32, TimestepEmbedder
from longcat_nb.models.rope import axis_dims, rope_tables

# dit/config.json of the official checkpoint (spec §1.2)
OFFICIAL_CONFIG = {
    "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.1",
    "adaln_tembed_dim": 512, "bsa_params": {"chunk_3d_shape_k": [4, 4, 4], "chunk_3d_shape_q": [4, 4, 4], "sparsity": 0.9375},
    "caption_channels": 4096, "cp_split_hw": None, "depth": 48, "enable_bsa": False, "enable_flashattn2": True,
    "enable_flashattn3": False, "enable_xformers": False, "frequency_embedding_size": 256, "hidden_size": 4096,
    "in_channels": 16, "mlp_ratio": 4, "num_heads": 32, "out_channels": 16, "patch_size": [1, 2, 2],
    "text_tokens_zero_pad": True,
}

TINY = dict(hidden_size=64, depth=2, num_heads=2, caption_channels=24, adaln_tembed_dim=32,
            frequency_embedding_size=32, text_tokens_zero_pad=True)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = LongCatVideoTransformer3DModel(**{**TINY, **kw}).eval()
    # Default init leaves gates moderate; scale the adaLN so modulation matters in the tests.
    with torch.no_grad():
        for b in m.blocks:
            b.adaLN_modulation[1].weight.mul_(5)
    return m


def inputs(B=2, T=4, H=4, W=6, L=10, C=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    y = torch.randn(B, 1, L, C, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    return x, y, mask


def test_full_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        m = LongCatVideoTransformer3DModel()
    sd = m.state_dict()
    assert len(sd) == 1022
    assert sum(v.numel() for v in sd.values()) == 13_581_071_424
    expect = {
        "x_embedder.proj.weight": (4096, 16, 1, 2, 2), "t_embedder.mlp.0.weight": (512, 256),
        "t_embedder.mlp.2.weight": (512, 512), "y_embedder.y_proj.0.weight": (4096, 4096),
        "final_layer.adaLN_modulation.1.weight": (8192, 512), "final_layer.linear.weight": (64, 4096),
        "blocks.47.adaLN_modulation.1.weight": (24576, 512), "blocks.0.attn.qkv.weight": (12288, 4096),
        "blocks.0.attn.q_norm.weight": (128,), "blocks.0.cross_attn.kv_linear.weight": (8192, 4096),
        "blocks.0.cross_attn.k_norm.weight": (128,), "blocks.0.pre_crs_attn_norm.bias": (4096,),
        "blocks.0.ffn.w1.weight": (11008, 4096), "blocks.0.ffn.w2.weight": (4096, 11008),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    assert len(per_block) == 21 and not any("bias" in k for k in per_block if k.startswith("ffn"))


def test_from_pretrained_with_official_config(tmp_path):
    """The Hub dit/config.json loads unchanged (tiny sizes substituted so it fits a test)."""
    cfg = {**OFFICIAL_CONFIG, **{k: v for k, v in TINY.items()}}
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text(json.dumps(cfg))
    ref = tiny_model()
    ref.save_pretrained(tmp_path / "saved", max_shard_size="50KB")
    # weights from a sharded save, config from the official file
    for f in (tmp_path / "saved").glob("*.safetensors*"):
        (tmp_path / "dit" / f.name).write_bytes(f.read_bytes())
    m = LongCatVideoTransformer3DModel.from_pretrained(tmp_path, subfolder="dit", torch_dtype=torch.float32)
    assert m.config.text_tokens_zero_pad is True and m.config.enable_flashattn2 is True
    assert m.attention_backend == "sdpa"
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    # every official key is accepted by __init__, and our own runtime option is never saved
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(OFFICIAL_CONFIG) - {"_class_name", "_diffusers_version"} <= set(saved)
    assert "attention_implementation" not in saved


def test_forward_shapes_dtype_and_determinism():
    m = tiny_model()
    x, y, mask = inputs()
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        a = m(x, t, y, mask)
        b = m(x, t, y, mask)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="4-D"):
        m(x, t, y[:, 0], mask)


def test_scalar_timestep_equals_per_frame_broadcast_and_per_frame_matters():
    m = tiny_model()
    x, y, mask = inputs()
    with torch.no_grad():
        a = m(x, torch.tensor([600.0, 600.0]), y, mask)
        b = m(x, torch.full((2, 4), 600.0), y, mask)
        tf = torch.full((2, 4), 600.0)
        tf[:, 2] = 100.0
        c = m(x, tf, y, mask)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_conditioning_tokens_ignore_noisy_latents_and_text():
    m = tiny_model()
    x, y, mask = inputs()
    t = torch.tensor([[0.0, 700, 700, 700], [0.0, 300, 300, 300]])
    x2 = x.clone()
    x2[:, :, 1:] = torch.randn_like(x2[:, :, 1:])
    y2 = torch.randn_like(y)
    with torch.no_grad():
        a = m(x, t, y, mask, num_cond_latents=1)
        b = m(x2, t, y, mask, num_cond_latents=1)
        c = m(x, t, y2, mask, num_cond_latents=1)
    assert torch.allclose(a[:, :, :1], b[:, :, :1], atol=1e-6)
    assert torch.allclose(a[:, :, :1], c[:, :, :1], atol=1e-6)
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])
    assert not torch.allclose(a[:, :, 1:], c[:, :, 1:])


def test_text_zero_pad_ignores_padded_text_content():
    m = tiny_model()
    x, y, mask = inputs()
    y2 = y.clone()
    y2[0, :, 6:] = torch.randn_like(y2[0, :, 6:]) * 10  # only padded positions change
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.allclose(m(x, t, y, mask), m(x, t, y2, mask), atol=1e-6)
    m_nopad = tiny_model(text_tokens_zero_pad=False)
    with torch.no_grad():  # without zero-pad the mask hides padded tokens from attention
        assert torch.allclose(m_nopad(x, t, y, mask), m_nopad(x, t, y2, mask), atol=1e-6)


def test_kv_cache_path_equals_full_conditioning_forward():
    m = tiny_model()
    x, y, mask = inputs(T=5)
    n = 2
    t_noisy = torch.tensor([700.0, 400.0])
    t_full = torch.cat([torch.zeros(2, n), t_noisy[:, None].expand(2, 5 - n)], dim=1)
    with torch.no_grad():
        full = m(x, t_full, y, mask, num_cond_latents=n)
        _, cache = m(x[:, :, :n], torch.zeros(2, n), torch.zeros_like(y), None, return_kv=True, skip_crs_attn=True)
        cached = m(x[:, :, n:], t_noisy, y, mask, num_cond_latents=n, kv_cache_dict=cache)
    assert torch.allclose(full[:, :, n:], cached, atol=1e-5)


def test_backward_and_gradient_checkpointing_give_same_gradients():
    x, y, mask = inputs()
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]])
    grads = []
    for ckpt in (False, True):
        m = tiny_model().train()
        if ckpt:
            m.enable_gradient_checkpointing()
        out = m(x, t, y, mask, num_cond_latents=1)
        out[:, :, 1:].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k


def test_bf16_weights_keep_fp32_modulation_and_output():
    m = tiny_model().to(torch.bfloat16)
    x, y, mask = inputs()
    with torch.no_grad():
        out = m(x, torch.tensor([998.3, 10.0]), y, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the timestep is rounded to the weight dtype, as the official model does: 998.3 -> 1000 in bf16
    with torch.no_grad():
        assert torch.equal(m(x, torch.tensor([998.3, 10.0]), y, mask), m(x, torch.tensor([1000.0, 10.0]), y, mask))


def test_rope_split_and_tables_are_float32():
    assert axis_dims(128) == (44, 42, 42)
    cos, sin = rope_tables((3, 4, 5), 128)
    assert cos.shape == (60, 64) and cos.dtype == torch.float32
    # token (t=0, y=0, x=0) is not rotated; the t-part of token (t=1, 0, 0) rotates by 1 rad at j=0
    assert torch.allclose(cos[0], torch.ones(64))
    assert torch.isclose(cos[20, 0], torch.cos(torch.tensor(1.0)))


def test_timestep_embedding_is_cos_then_sin():
    e = TimestepEmbedder.sinusoid(torch.tensor([0.0]), 8)
    assert torch.equal(e, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))


def test_rmsnorm_multiplies_weight_in_input_dtype():
    n = RMSNormFP32(8).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert n(x).dtype == torch.bfloat16


def test_attention_backend_choice_and_fallbacks():
    m = tiny_model(enable_xformers=True)
    assert m.attention_backend in ("xformers", "sdpa")  # falls back with a warning when not installed
    m.enable_bsa()
    x, y, mask = inputs()
    with torch.no_grad():  # BSA needs CUDA; on CPU the same call runs dense SDPA
        dense = tiny_model()(x, torch.tensor([500.0, 500.0]), y, mask)
        out = m(x, torch.tensor([500.0, 500.0]), y, mask)
    assert torch.allclose(out, dense, atol=1e-6)
    with pytest.raises(ValueError, match="attention_implementation"):
        LongCatVideoTransformer3DModel(**TINY, attention_implementation="magic")


def test_compile_keeps_float32_regions_exact_and_quiet():
    """Compiled blocks leave the float32 regions in full float32 (TF32 stays off), and Inductor's hint to
    turn TF32 on for them, printed once per sampling run before, no longer shows."""
    import warnings

    from longcat_nb.speed import apply_compile, disable_compile

    m = LongCatVideoTransformer3DModel(depth=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        apply_compile(m, scope="blocks")
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not "
                          "enabled. Consider setting `torch.set_float32_matmul_precision('high')`", UserWarning)
            warnings.warn("another UserWarning still shows", UserWarning)
    finally:
        disable_compile(m)
    assert [str(w.message) for w in caught] == ["another UserWarning still shows"]
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
