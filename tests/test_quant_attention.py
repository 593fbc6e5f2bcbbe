"""8-bit attention (models/quant_attention.py): the kernels against an fp32 reference through Triton's
CPU interpreter (in a subprocess), where the model uses it and where it falls back to SDPA, and on a
GPU the real kernel against cuDNN/flash SDPA inside a compiled DiT, forward and backward."""
import pytest
import torch

from longcat_nb.models import LongCatVideoTransformer3DModel
from longcat_nb.models.attention import self_attention
from helpers import run_in_triton_interpreter

_INTERPRETED = r"""
import torch, torch.nn.functional as F
from longcat_nb.models.quant_attention import quant8_attention, quantize
torch.manual_seed(0)
B, H, D = 1, 2, 32
def ops(sq, sk, strided=False):
    # DiT-like: unit-RMS q and k (the model's q/k norms), k and v with an offset shared by all tokens
    q = F.rms_norm(torch.randn(B, sq, H, D), (D,))
    k = F.rms_norm(torch.randn(B, sk, H, D), (D,)) + 0.5 * torch.randn(1, 1, H, D)
    v = torch.randn(B, sk, H, D) + torch.randn(1, 1, H, D)
    q, k, v = (t.to(torch.bfloat16).transpose(1, 2) for t in (q, k, v))
    return (q, k, v) if strided else tuple(t.contiguous() for t in (q, k, v))
for sq, sk, strided, cfg in [(200, 200, False, {}), (130, 333, True, {"block_n": 64}),
                             (64, 64, False, {"tma": True, "block_m": 128})]:
    q, k, v = ops(sq, sk, strided)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.no_grad():
        o = quant8_attention(q, k, v, cfg)
    err = float((o.float() - ref).norm() / ref.norm())
    assert o.shape == ref.shape and o.dtype == torch.bfloat16, (o.shape, o.dtype)
    assert err < 0.05, (sq, sk, cfg, err)
    print("case", sq, sk, cfg, round(err, 4))
# the quantized operands: Q per token and K per block (after the mean) round to within 1% in int8
q, k, v = ops(200, 200)
q8, k8, v8t, qs, ks, vmean, vscale = quantize(q, k, v)
assert q8.dtype == k8.dtype == torch.int8 and v8t.dtype == torch.float8_e4m3fn
assert q8.shape == (2, 256, D) and v8t.shape == (2, D, 256) and ks.shape == (2, 2)
assert int(q8[:, 200:].abs().sum()) == 0 and int(k8[:, 200:].abs().sum()) == 0
kc = (k.float() - k.float().mean(2, keepdim=True)).reshape(2, 200, D)
kd = (k8[:, :200].float().view(2, 200, D) * ks.repeat_interleave(128, 1)[:, :200, None])
assert float((kd - kc).norm() / kc.norm()) < 0.01
# training: the backward against fp32 autograd (fp32 operands: the interpreter's bf16 dot is not exact)
for sq, sk, cfg in [(200, 200, {}), (130, 333, {"dq": {"block_n": 128}, "dkdv": {"block_m": 32}}),
                    (64, 100, {"dv": "bf16"})]:
    q, k, v = (t.float() for t in ops(sq, sk))
    do = torch.randn(B, H, sq, D)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr).backward(do)
    q8, k8, v8 = (t.clone().requires_grad_() for t in (q, k, v))
    quant8_attention(q8, k8, v8, cfg).backward(do)
    errs = [float((a.grad - b.grad).norm() / b.grad.norm()) for a, b in ((q8, qr), (k8, kr), (v8, vr))]
    # dQ, dK from int8 Q·Kᵀ; dV in e4m3 (the interpreter truncates to fp8: worse than the GPU's rounding)
    assert errs[0] < 0.03 and errs[1] < 0.03 and errs[2] < (0.02 if cfg.get("dv") == "bf16" else 0.15), (sq, sk, cfg, errs)
    print("grad", sq, sk, cfg, [round(e, 4) for e in errs])
print("ok")
"""


def test_kernels_match_fp32_reference_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, timeout=600)


def test_falls_back_to_sdpa_without_a_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = self_attention(q, k, v, (2, 3, 4), (2, 3, 4), "quant8", None)
    assert torch.equal(out, ref)  # CPU: plain SDPA
    model = LongCatVideoTransformer3DModel(hidden_size=64, depth=1, num_heads=2, caption_channels=16,
                                           adaln_tembed_dim=32, frequency_embedding_size=32)
    assert model.set_attention_backend("quant8") == "quant8"
    assert model.blocks[0].attn.backend == "quant8" and model.blocks[0].cross_attn.backend == "sdpa"
    with pytest.raises(ValueError, match="attention_implementation='int4'"):
        model.set_attention_backend("int4")
    # training through quant8 on the CPU: SDPA, gradients flow
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    self_attention(qg, kg, vg, (2, 3, 4), (2, 3, 4), "quant8", None).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    from longcat_nb.models.attention import quant8_training, set_quant8_training
    with pytest.raises(ValueError, match="'fast'.*'auto', 'off', 'cudnn', 'triton'"):
        set_quant8_training("fast")
    before = set_quant8_training("auto")
    with pytest.raises(RuntimeError):  # restored when the block fails, too
        with quant8_training("triton"):
            assert set_quant8_training("triton") == "triton"
            raise RuntimeError
    assert set_quant8_training(before) == "auto"


@pytest.mark.gpu
def test_gpu_kernel_against_sdpa_and_in_a_compiled_dit():
    pytest.importorskip("triton")
    from longcat_nb.models.quant_attention import available, quant8_attention
    from longcat_nb.speed import apply_compile

    if not available("cuda"):
        pytest.skip("8-bit attention needs compute capability 8.9+")
    torch.manual_seed(0)
    F = torch.nn.functional
    q = F.rms_norm(torch.randn(2, 4, 3000, 128, device="cuda"), (128,)).bfloat16()
    k = (F.rms_norm(torch.randn(2, 4, 3100, 128, device="cuda"), (128,)) + 0.3).bfloat16()
    v = torch.randn(2, 4, 3100, 128, device="cuda").bfloat16()
    with torch.no_grad():
        # unstructured V (no shared offset): e4m3's rounding shows; bf16 P·V keeps it near 1%
        for offset, bounds in ((0.0, (0.08, 0.02)), (1.0, (0.01, 0.01))):
            vv = (v.float() + offset * torch.randn(1, 4, 1, 128, device="cuda")).bfloat16()
            ref = F.scaled_dot_product_attention(q.float(), k.float(), vv.float())
            for cfg in ({}, {"tma": True}, {"pv": "bf16"}, {"block_m": 128, "num_warps": 8}):
                o = quant8_attention(q, k, vv, cfg)
                err = float((o.float() - ref).norm() / ref.norm())
                assert err < bounds[cfg.get("pv") == "bf16"], (offset, cfg, err)
    # a whole model: sampling output close to SDPA's, the same compiled and eager; training uses SDPA
    cfg = dict(hidden_size=256, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64,
               frequency_embedding_size=64)
    model = LongCatVideoTransformer3DModel(**cfg).cuda().bfloat16().eval()
    x = torch.randn(2, 16, 5, 16, 24, device="cuda")
    t = torch.full((2,), 500.0, device="cuda")
    y = torch.randn(2, 1, 32, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 32, dtype=torch.long, device="cuda")
    with torch.no_grad():
        dense = model(x, t, y, mask).float()
        model.set_attention_backend("quant8")
        eager = model(x, t, y, mask).float()
        apply_compile(model, scope="blocks")
        compiled = model(x, t, y, mask).float()
    assert float((eager - dense).norm() / dense.norm()) < 0.02
    assert float((compiled - eager).norm() / eager.norm()) < 0.01
    model.requires_grad_(True)
    from longcat_nb.models.attention import quant8_training
    # an SDPA training step first: the same q, k, v shapes as the cudnn step below, which once
    # picked up SDPA's cached cuDNN graph (run 16)
    with quant8_training("off"):
        loss = model(x, t, y, mask).float().square().mean()
        loss.backward()
    assert all(p.grad is not None for p in model.blocks[0].attn.qkv.parameters())
    sdpa_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if ".attn.qkv." in n}
    # the kernel's backwards against fp32 gradients: Triton's within bounds from run 13 (0.021 / 0.012 /
    # 0.038 at 37440 tokens); cuDNN's (bf16, fed our statistics) within reach of cuDNN's own bf16 errors
    qg, kg, vg = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(qg)
    ref = [t.float().detach().requires_grad_() for t in (qg, kg, vg)]
    torch.autograd.backward(F.scaled_dot_product_attention(*ref), do.float())

    def errors(fn, q_layout=lambda t: t):
        a, b, c = (t.detach().clone().requires_grad_() for t in (q_layout(qg), kg, vg))
        fn(a, b, c).backward(do)
        return [float((got.grad.float() - want.grad).norm() / want.grad.norm()) for got, want in zip((a, b, c), ref)]

    bf16 = errors(F.scaled_dot_product_attention)
    triton_errs = errors(lambda a, b, c: quant8_attention(a, b, c, {"backward": "triton"}))
    cudnn_errs = errors(lambda a, b, c: quant8_attention(a, b, c, {"backward": "cudnn"}))
    assert all(e < bound for e, bound in zip(triton_errs, (0.05, 0.03, 0.08))), (triton_errs, bf16)
    assert all(e < 1.5 * b + 0.03 for e, b in zip(cudnn_errs, bf16)), (cudnn_errs, bf16)
    # Q laid out [B, S, H, D] under contiguous K, V (cuDNN's backward once returned garbage for it)
    cudnn_errs = errors(lambda a, b, c: quant8_attention(a, b, c, {"backward": "cudnn"}),
                        q_layout=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))
    assert all(e < 1.5 * b + 0.03 for e, b in zip(cudnn_errs, bf16)), ("mixed layouts", cudnn_errs, bf16)
    # and a whole model trains through the 8-bit forward when asked to
    model.zero_grad()
    sdpa_loss = float(loss.detach())
    with quant8_training("cudnn"):
        loss8 = model(x, t, y, mask).float().square().mean()
        loss8.backward()
    assert abs(float(loss8) - sdpa_loss) < 0.02 * abs(sdpa_loss)
    # the gradients themselves, as the DiT lays out q, k, v (bf16 SDPA is ~0.5% from fp32 here)
    for n, p in model.named_parameters():
        if n in sdpa_grads:
            rel = float((p.grad.float() - sdpa_grads[n]).norm() / sdpa_grads[n].norm())
            assert rel < 0.05, (n, rel)


@pytest.mark.gpu
def test_gpu_dit_gradients_match_an_fp32_model():
    """The parameter gradients of a 2-block DiT (heads of 128) in bf16 against an fp32 copy, for
    each way a training step can run self-attention, one after another in one process as a
    notebook would: SDPA eager and compiled, and the 8-bit forward with either backward. Run 16
    found cuDNN's backward at 86% error on attn.qkv here, where SDPA was at 0.5%."""
    pytest.importorskip("triton")
    from longcat_nb.models.attention import quant8_training
    from longcat_nb.models.quant_attention import available
    from longcat_nb.speed import apply_compile, disable_compile

    if not available("cuda"):
        pytest.skip("8-bit attention needs compute capability 8.9+")
    torch.manual_seed(0)
    cfg = dict(hidden_size=256, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64,
               frequency_embedding_size=64)
    ref_model = LongCatVideoTransformer3DModel(**cfg).cuda()
    model = LongCatVideoTransformer3DModel(**cfg).cuda().bfloat16()
    model.load_state_dict({k: v.bfloat16() for k, v in ref_model.state_dict().items()})
    x = torch.randn(1, 16, 9, 32, 48, device="cuda")  # 3456 tokens
    t = torch.full((1,), 500.0, device="cuda")
    y = torch.randn(1, 1, 32, 64, device="cuda")
    mask = torch.ones(1, 32, dtype=torch.long, device="cuda")

    def grads(m, dtype):
        m.zero_grad()
        m(x.to(dtype), t, y.to(dtype), mask).float().square().mean().backward()
        return {n: p.grad.float().clone() for n, p in m.named_parameters() if ".attn." in n}

    want = grads(ref_model, torch.float32)
    cases = [("sdpa", "off", None), ("sdpa", "off", "blocks"), ("quant8", "triton", None),
             ("quant8", "cudnn", None), ("quant8", "cudnn", "blocks")]
    errors = {}
    for backend, mode, scope in cases:
        model.set_attention_backend(backend)
        if scope:
            apply_compile(model, scope=scope)
        try:
            with quant8_training(mode):
                got = grads(model, torch.bfloat16)
        finally:
            disable_compile(model)
        errors[(backend, mode, scope)] = max(float((got[n] - w).norm() / w.norm()) for n, w in want.items())
    assert all(e < 0.05 for e in errors.values()), errors
