"""Base precisions and block swap on the tiny DiT (CPU): same math, less resident weight."""
import sys

import pytest
import torch

from longcat_nb.memory import BIG_LINEARS, apply_base_precision, apply_block_swap, quantized_bytes

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_dit import inputs, tiny_model  # noqa: E402


def _has(mod):
    try:
        __import__(mod)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("precision,module,tol", [
    ("int8", "optimum.quanto", 0.02), ("int4", "optimum.quanto", 0.15), ("fp8", "torchao", 0.05),
])
def test_quantized_base_close_to_fp32_and_smaller(precision, module, tol):
    if not _has(module):
        pytest.skip(f"{module} not installed")
    x, y, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    ref = tiny_model()
    with torch.no_grad():
        r = ref(x, t, y, mask)
    q = apply_base_precision(tiny_model(), precision, "cpu")
    with torch.no_grad():
        o = q(x, t, y, mask)
    assert float((o - r).norm() / r.norm()) < tol
    # only the block matrices were touched; modulation stays a plain Linear
    assert type(q.blocks[0].adaLN_modulation[1]) is torch.nn.Linear
    assert quantized_bytes(q) < quantized_bytes(ref)


def test_big_linears_pattern():
    names = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
             "ffn.w1", "ffn.w2", "ffn.w3"]
    assert all(BIG_LINEARS.match(n) for n in names)
    assert not any(BIG_LINEARS.match(n) for n in ["adaLN_modulation.1", "attn.q_norm", "proj"])


def test_block_swap_same_outputs_and_gradients():
    x, y, mask = inputs()
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]])
    results = []
    for swap in (0, 2):
        m = tiny_model()
        m.requires_grad_(False)
        extra = torch.nn.Parameter(torch.zeros(16, 1, 1, 1))  # stands for a trainable LoRA input path
        m.enable_gradient_checkpointing()
        m.train()
        sw = apply_block_swap(m, swap, "cpu")
        out = m(x + extra, t, y, mask, num_cond_latents=1)
        out.square().mean().backward()
        results.append((out.detach(), extra.grad.clone()))
        if sw is not None:
            assert sw.ready == {}  # every swapped block released after its backward
            sw.remove()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1])


def test_activation_offload_same_gradients_as_checkpointing():
    from longcat_nb.memory import apply_activation_offload

    x, y, mask = inputs()
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]])
    grads = []
    for offload in (False, True):
        m = tiny_model().train()
        m.x_embedder.requires_grad_(False)  # like LoRA training: the first block's input needs no grad
        if offload:
            apply_activation_offload(m)
        else:
            m.enable_gradient_checkpointing()
        out = m(x, t, y, mask, num_cond_latents=1)
        out[:, :, 1:].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k
