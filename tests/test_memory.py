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


@pytest.mark.parametrize("precision,module", [("int8", "optimum.quanto"), ("int4", "optimum.quanto"),
                                              ("fp8", "torchao"), ("fp8_rowwise", "torch")])
def test_block_swap_moves_quantized_weights_and_keeps_the_math(precision, module):
    """A quantized base swaps too: the inner tensors of quanto's subclasses are what moves (assigning .data
    of the subclass itself left its copy in place), and the outputs and gradients do not change."""
    if not _has(module):
        pytest.skip(f"{module} not installed")
    from longcat_nb.memory import BlockSwap, _leaves

    x, y, mask = inputs()
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]])
    results = []
    for swap in (0, 2):
        m = apply_base_precision(tiny_model(), precision, "cpu").requires_grad_(False)  # frozen, as under a LoRA
        extra = torch.nn.Parameter(torch.zeros(16, 1, 1, 1))
        m.enable_gradient_checkpointing()
        m.train()
        sw = apply_block_swap(m, swap, "cpu")
        if sw is not None:
            for i in sw.swapped:
                moved = sw.cpu[i]
                assert moved and all(type(leaf) in (torch.Tensor, torch.nn.Parameter) for leaf, _ in moved)
                # every byte of the block's frozen weights is in the host copies the swap holds
                frozen = [p for p in list(m.blocks[i].parameters()) + list(m.blocks[i].buffers()) if not p.requires_grad]
                assert {id(leaf) for p in frozen for leaf in _leaves(p)} == {id(leaf) for leaf, _ in moved}
                assert all(leaf.data_ptr() == host.data_ptr() for leaf, host in moved)
            assert isinstance(sw, BlockSwap)
        out = m(x + extra, t, y, mask, num_cond_latents=1)
        out.square().mean().backward()
        results.append((out.detach(), extra.grad.clone()))
        if sw is not None:
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


def _grads(m, x, t, y, mask):
    out = m(x, t, y, mask, num_cond_latents=1)
    out[:, :, 1:].square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def test_every_checkpointing_mode_gives_the_same_gradients():
    """none / full / selective (attention outputs kept) / offload: one function, one gradient."""
    from longcat_nb.memory import CHECKPOINTING, apply_gradient_checkpointing

    x, y, mask = inputs()
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]])
    results = {}
    for mode in CHECKPOINTING:
        m = tiny_model().train()
        m.x_embedder.requires_grad_(False)  # like LoRA training: the first block's input needs no grad
        apply_gradient_checkpointing(m, mode)
        assert m.gradient_checkpointing == (mode in ("full", "offload"))
        results[mode] = _grads(m, x, t, y, mask)
    ref_out, ref = results["none"]
    assert len(ref) > 20
    for mode, (out, g) in results.items():
        assert torch.equal(out, ref_out), mode
        assert g.keys() == ref.keys(), mode
        for k in ref:
            assert torch.allclose(g[k], ref[k], atol=1e-6, rtol=1e-5), (mode, k)
    # switching back undoes the selective wrappers
    m = tiny_model()
    apply_gradient_checkpointing(m, "selective")
    apply_gradient_checkpointing(m, "full")
    assert "forward" not in m.blocks[0].__dict__


def test_selective_checkpointing_drops_torchs_in_place_caution(caplog):
    """Compiled selective blocks made torch print a four-line caution about in-place ops at every
    training start; the kit's blocks hold none, so it is dropped, and the logger's other messages pass."""
    import logging

    from longcat_nb.memory import apply_gradient_checkpointing

    log = logging.getLogger("torch._higher_order_ops.wrap")
    apply_gradient_checkpointing(tiny_model(), "selective")
    apply_gradient_checkpointing(tiny_model(), "selective")  # one filter, however often
    assert sum(type(f).__name__ == "_NoInPlaceCaution" for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\n"
                    "Please make sure the checkpointed region does not contain in-place ops (e.g. torch.relu_).\n")
        log.warning("some other warning")
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


def test_selective_checkpointing_keeps_attention_and_recomputes_the_rest():
    """The backward of a selectively checkpointed block runs no attention again, but does rerun the
    matmuls; full checkpointing reruns attention too (counted with a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longcat_nb.memory import _ATTENTION_OPS, LONG_KEYS, apply_gradient_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.attn = self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _ATTENTION_OPS and args[1].shape[-2] > 16:
                self.attn += 1
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
                self.mm += 1
            return func(*args, **(kwargs or {}))

    import longcat_nb.memory as mem
    x, y, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    counts = {}
    old = mem.LONG_KEYS
    mem.LONG_KEYS = 16  # the tiny model's video has 24 tokens, its text 10
    try:
        for mode in ("full", "selective"):
            m = tiny_model().train()
            m.x_embedder.requires_grad_(False)
            apply_gradient_checkpointing(m, mode)
            out = m(x, t, y, mask)
            c = Count()
            with c:
                out.square().mean().backward()
            counts[mode] = (c.attn, c.mm)
    finally:
        mem.LONG_KEYS = old
    assert LONG_KEYS == 4096
    depth = len(tiny_model().blocks)
    assert counts["full"][0] == depth and counts["selective"][0] == 0, counts
    assert counts["selective"][1] > 0  # the rest is recomputed


def test_fp8_rowwise_forward_and_input_gradient_close_to_fp32():
    from longcat_nb.memory import Float8RowwiseLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    ref = lin(x)
    gref = torch.autograd.grad(ref.square().sum(), x)[0]
    q = Float8RowwiseLinear.from_linear(lin)
    out = q(x)
    gout = torch.autograd.grad(out.square().sum(), x)[0]
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.05
    assert float((gout - gref).norm() / gref.norm()) < 0.08
    assert q.weight.dtype == torch.float8_e4m3fn and not q.weight.requires_grad
    # sampling-only layers carry no transposed copy and say so when asked for a gradient
    s = Float8RowwiseLinear.from_linear(lin, backward=False)
    assert s.weight_t.numel() == 0
    with pytest.raises(RuntimeError, match="backward=True"):
        torch.autograd.grad(s(x).sum(), x)


def test_fp8_rowwise_base_trains_a_lora():
    """The tiny DiT with float8 block matmuls: close to fp32 forward, and a peft LoRA on top gets
    fp32 gradients (peft must not cast the LoRA to float8)."""
    from longcat_nb.lora import add_lora
    from longcat_nb.memory import Float8RowwiseLinear

    x, y, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    ref = tiny_model()
    with torch.no_grad():
        r = ref(x, t, y, mask)
    m = apply_base_precision(tiny_model(), "fp8_rowwise", "cpu")
    assert isinstance(m.blocks[0].attn.qkv, Float8RowwiseLinear)
    assert type(m.blocks[0].adaLN_modulation[1]) is torch.nn.Linear
    with torch.no_grad():
        o = m(x, t, y, mask)
    assert float((o - r).norm() / r.norm()) < 0.1
    names = add_lora(m, rank=4, alpha=4, targets=["attn.qkv", "ffn.w1"])
    params = [p for n, p in m.named_parameters() if n in names]
    assert params and all(p.dtype == torch.float32 for p in params)
    torch.manual_seed(0)
    for p in params:
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)  # lora_B starts at zero; give the chain a gradient everywhere
    m(x, t, y, mask).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8_rowwise"])
def test_block_swap_frees_quantized_weights_on_the_gpu(precision):
    """On CUDA the swapped blocks' quantized weights leave the GPU (measured by the allocator), and the
    output stays what it was."""
    if precision == "int8" and not _has("optimum.quanto"):
        pytest.skip("optimum-quanto not installed")
    if precision == "fp8_rowwise" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    import gc

    x, y, mask = (v.cuda() for v in inputs())
    t = torch.tensor([500.0, 500.0], device="cuda")
    m = apply_base_precision(tiny_model(), precision, "cuda").requires_grad_(False)
    with torch.no_grad():
        ref = m(x, t, y, mask)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    sw = apply_block_swap(m, 2, "cuda")
    gc.collect()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    moved = sum(quantized_bytes(m.blocks[i]) for i in sw.swapped)
    assert freed >= 0.9 * moved > 0, (freed, moved)
    with torch.no_grad():
        out = m(x, t, y, mask)
    sw.remove()
    assert torch.equal(out, ref)


def test_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    from longcat_nb import envinfo

    calls = []
    monkeypatch.setattr(envinfo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(envinfo, "_allocator_setter", lambda: calls.append)
    monkeypatch.delattr(envinfo.configure_allocator, "done", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the old and the new name
        monkeypatch.setenv(name, "max_split_size_mb:512")
        assert envinfo.configure_allocator() is False and calls == []  # the user's own setting stays
        monkeypatch.delenv(name)
    assert envinfo.configure_allocator() is True and calls == ["expandable_segments:True"]
    assert envinfo.configure_allocator() is False and len(calls) == 1  # once a process
    monkeypatch.delattr(envinfo.configure_allocator, "done")


@pytest.mark.gpu
def test_allocator_settings_take_effect_on_cuda(monkeypatch):
    from longcat_nb import envinfo

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delattr(envinfo.configure_allocator, "done", raising=False)
    torch.zeros(1, device="cuda")  # CUDA already started, as in a notebook
    assert envinfo.configure_allocator()
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # a new segment, made after the setting
    x.fill_(1)
    assert any(seg.get("is_expandable") for seg in torch.cuda.memory_snapshot())


def test_unquantized_base_casts_without_a_false_warning(monkeypatch):
    """bf16 on a 24/16 GiB card's sampling path: the cast says nothing about 'modules that should be
    kept in float32' (diffusers warns so on any .to(dtype), with an empty list for this model)."""
    import diffusers.models.modeling_utils as mu

    said = []
    monkeypatch.setattr(mu.logger, "warning", lambda msg, *a, **k: said.append(str(msg)))
    from longcat_nb.prepare import prepare_for_sampling

    m = apply_base_precision(tiny_model(), "bf16", "cpu")
    s = tiny_model()
    prepare_for_sampling(s, "bf16", 0, "cpu", compile="off")
    assert said == []
    assert all(p.dtype == torch.bfloat16 for p in [*m.parameters(), *s.parameters()])
    if "kept in float32" in __import__("inspect").getsource(mu.ModelMixin.to):  # a diffusers that warns so:
        tiny_model().to(dtype=torch.bfloat16)  # its own .to does, and the patch above hears it
        assert said and "float32" in said[0]
