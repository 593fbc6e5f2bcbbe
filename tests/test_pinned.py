"""pinned.py: exact-size host buffers for block swap and activation offload (the 24 GiB card's host RAM)."""
import gc

import pytest
import torch

from longcat_nb.pinned import ALIGN, HostPool, Slab, pack


def test_pack_copies_every_tensor_into_one_exact_slab():
    ts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int8), torch.randn(2, 2).to(torch.bfloat16),
          torch.randn(4, 6)[:, ::2]]  # a non-contiguous one too
    slab, hosts = pack(ts, pin=False)
    assert slab.nbytes == sum((t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN for t in ts)
    for t, h in zip(ts, hosts):
        assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous() and torch.equal(h, t)
        assert slab.data.data_ptr() <= h.data_ptr() < slab.data.data_ptr() + slab.nbytes
    assert pack([], pin=False) == (None, [])


def test_slab_refuses_a_view_that_does_not_fit():
    s = Slab(1024, pin=False)
    with pytest.raises(ValueError, match="no room"):
        s.view(512, (600,), torch.uint8)
    with pytest.raises(ValueError, match="no room"):
        s.view(100, (4,), torch.uint8)  # not on the alignment boundary


def test_host_pool_reuses_buffers_across_steps_and_follows_the_largest_shape():
    pool = HostPool(pin=False)
    step = [pool.take((48, 64), torch.bfloat16) for _ in range(4)]  # one training step's block inputs
    small = pool.take((8,), torch.float32)
    first = {t.data_ptr() for t in step}
    del step
    gc.collect()
    assert pool.in_use == small.numel() * 4 and len(pool.free) == 4
    again = [pool.take((48, 64), torch.bfloat16) for _ in range(4)]
    assert {t.data_ptr() for t in again} == first  # the same buffers, nothing new allocated
    assert pool.total_bytes == 4 * 48 * 64 * 2 + 8 * 4  # exact sizes (torch's pinned allocator rounds to 2^n)
    smaller = pool.take((40, 64), torch.bfloat16)  # a smaller shape fits a free larger buffer ...
    del again, smaller
    gc.collect()
    bigger = [pool.take((50, 64), torch.bfloat16) for _ in range(4)]  # ... a larger one retires them
    assert pool.total_bytes == 4 * 50 * 64 * 2 + 8 * 4, "the superseded buffers were kept"
    del bigger, small
    gc.collect()
    assert pool.in_use == 0
    pool.clear()
    assert pool.total_bytes == 0


def test_activation_offload_uses_one_pool_per_model():
    from longcat_nb.memory import OffloadedCheckpoint, apply_activation_offload, apply_gradient_checkpointing
    from test_memory import tiny_model

    m = apply_activation_offload(tiny_model())
    func = m._gradient_checkpointing_func
    assert isinstance(func, OffloadedCheckpoint) and isinstance(func.pool, HostPool)
    apply_gradient_checkpointing(m, "full")
    assert not isinstance(m._gradient_checkpointing_func, OffloadedCheckpoint)


@pytest.mark.gpu
def test_host_buffers_are_page_locked_at_their_own_size():
    slab, (h,) = pack([torch.randn(300, 1000, device="cuda")])
    assert slab.pinned and h.is_pinned() and slab.nbytes == (300 * 1000 * 4 + ALIGN - 1) // ALIGN * ALIGN
    pool = HostPool()
    t = pool.take((3 * 2**20 + 5,), torch.bfloat16)  # torch's allocator would take 8 MiB; this 6 MiB and change
    assert t.is_pinned() and pool.total_bytes < 6.01 * 2**20
    x = torch.randn(3 * 2**20 + 5, device="cuda", dtype=torch.bfloat16)
    t.copy_(x, non_blocking=True)
    assert torch.equal(t.to("cuda", non_blocking=True), x)


@pytest.mark.gpu
def test_activation_offload_on_cuda_keeps_the_gradients_and_reuses_its_buffers():
    from longcat_nb.memory import apply_activation_offload
    from test_memory import inputs, tiny_model

    x, y, mask = (v.cuda() for v in inputs())
    t = torch.tensor([[0.0, 900, 900, 900], [0.0, 100, 100, 100]], device="cuda")
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        m = tiny_model().cuda().train()
        m.x_embedder.requires_grad_(False)
        if offload:
            apply_activation_offload(m)
            m._gradient_checkpointing_func.min_numel = 0  # the tiny model's inputs are small: offload them all
        else:
            m.enable_gradient_checkpointing()
        for _ in range(2):  # the second step reuses the first one's host buffers
            m.zero_grad()
            m(x, t, y, mask, num_cond_latents=1)[:, :, 1:].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        if offload:
            pool = m._gradient_checkpointing_func.pool
            assert pool.in_use == 0 and pool.free and all(s.pinned for s, _ in pool.free)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4), k
