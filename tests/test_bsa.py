"""Block-sparse attention (spec §3): the torch reference against brute force, the block selection on
constructed inputs, grids that the blocks do not divide, unequal query/key lengths, and our Triton
kernels (forward and backward) run by Triton's CPU interpreter in a subprocess."""
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from longcat_nb.models.bsa import reference_bsa_attention, select_blocks
from longcat_nb.models.bsa.reference import num_selected, pooled_blocks
from helpers import run_in_triton_interpreter


def _qkv(grid_q, grid_k, B=1, H=2, D=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    sq, sk = math.prod(grid_q), math.prod(grid_k)
    return tuple(torch.randn(B, H, s, D, generator=g) * scale for s in (sq, sk, sk))


def _token_blocks(grid, chunk):
    """Block id of every raster token, computed directly from its coordinates."""
    T, h, w = grid
    ct, ch, cw = chunk
    nh, nw = -(-h // ch), -(-w // cw)
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    return (((t // ct) * nh + y // ch) * nw + x // cw).reshape(-1)


def _brute_force(q, k, v, grid_q, grid_k, chunk_q, chunk_k, sel):
    """Dense attention with a token mask built from the block ids and the selection."""
    bq, bk = _token_blocks(grid_q, chunk_q), _token_blocks(grid_k, chunk_k)
    B, H, mq, _ = sel.shape
    mk = int(bk.max()) + 1
    keep = torch.zeros(B, H, mq, mk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(sel < 0, mk, sel), True)  # -1 -> a dummy column
    mask = keep[:, :, :, :mk][:, :, bq][:, :, :, bk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("grid_q,grid_k", [((5, 6, 7), (5, 6, 7)), ((3, 6, 7), (7, 6, 7))])
def test_sparsity_zero_equals_dense(grid_q, grid_k):
    q, k, v = _qkv(grid_q, grid_k)  # no axis divisible by 4; Sq != Sk in the second case
    out = reference_bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [(4, 4, 4), (2, 3, 2)])
def test_pooling_is_the_mean_over_real_tokens(chunk):
    grid = (5, 6, 7)
    x = torch.randn(2, 3, math.prod(grid), 8)
    blocks = _token_blocks(grid, chunk)
    m = int(blocks.max()) + 1
    sums = torch.zeros(2, 3, m, 8).index_add_(2, blocks, x)
    counts = torch.bincount(blocks, minlength=m).float()
    torch.testing.assert_close(pooled_blocks(x, grid, chunk), sums / counts[:, None], atol=1e-5, rtol=1e-5)
    # strided input (the DiT's [B, S, H, D] -> [B, H, S, D] view) gives the same means
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(pooled_blocks(xt, grid, chunk), sums / counts[:, None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid_q,grid_k,chunk,sparsity", [
    ((5, 6, 7), (5, 6, 7), (4, 4, 4), 0.5),
    ((3, 6, 7), (7, 6, 7), (4, 4, 4), 0.7),  # noisy queries vs conditioning + noisy keys
    ((4, 5, 6), (4, 5, 6), (2, 2, 2), 0.8),
])
def test_reference_matches_brute_force(grid_q, grid_k, chunk, sparsity):
    q, k, v = _qkv(grid_q, grid_k, seed=1)
    sel = select_blocks(q, k, grid_q, grid_k, sparsity, chunk, chunk)
    out = reference_bsa_attention(q, k, v, grid_q, grid_k, sparsity, chunk, chunk, chunk_budget=5000)
    torch.testing.assert_close(out, _brute_force(q, k, v, grid_q, grid_k, chunk, chunk, sel), atol=1e-5, rtol=1e-5)


def test_selection_picks_the_aligned_blocks():
    grid = (4, 8, 8)  # 4 blocks of 64 tokens: (bt, by, bx) = (0, 0..1, 0..1)
    D = 8
    q, k = torch.zeros(1, 1, 256, D), torch.zeros(1, 1, 256, D)
    blocks = _token_blocks(grid, (4, 4, 4))
    for b in range(4):
        q[0, 0, blocks == b, b] = 1.0  # query block b points along axis b ...
        k[0, 0, blocks == 3 - b, b] = 1.0 + b  # ... which only key block 3 - b shares
    sel = select_blocks(q, k, grid, grid, sparsity=0.75)  # 1 of 4
    assert sel[0, 0, :, 0].tolist() == [3, 2, 1, 0]
    k[0, 0, blocks == 0, :] += 0.5  # key block 0 now scores 0.5 with every query block
    sel = select_blocks(q, k, grid, grid, sparsity=0.5)  # 2 of 4, best first
    assert sel[0, 0, :3].tolist() == [[3, 0], [2, 0], [1, 0]]
    assert sel[0, 0, 3, 0] == 0  # its own partner (score 4.5); the runner-up is a tie


def test_partial_block_pools_only_real_tokens():
    # grid (1, 4, 6): blocks of (1, 4, 4) -> block 0 has 16 tokens, block 1 only 8 (x = 4, 5)
    grid, chunk = (1, 4, 6), (1, 4, 4)
    blocks = _token_blocks(grid, chunk)
    q = torch.ones(1, 1, 24, 4)
    k = torch.zeros(1, 1, 24, 4)
    k[0, 0, blocks == 1, 0] = 1.0  # the partial block's mean is 1 only if padding is not counted
    k[0, 0, blocks == 0, 0] = 0.75
    assert pooled_blocks(k, grid, chunk)[0, 0, :, 0].tolist() == [0.75, 1.0]
    assert select_blocks(q, k, grid, grid, 0.5, chunk, chunk)[0, 0, :, 0].tolist() == [1, 1]


def test_topk_keeps_at_least_one_block():
    assert num_selected(10, 0.9375) == 1  # the official int(0.0625 * 10) = 0 would return zeros
    assert num_selected(2640, 0.9375) == 165  # spec §3 example
    gq, gk = (3, 4, 8), (5, 4, 8)
    q, k, v = _qkv(gq, gk)
    assert select_blocks(q, k, gq, gk, 0.9375).shape == (1, 2, 2, 1)
    out = reference_bsa_attention(q, k, v, gq, gk, 0.9375)
    assert out.shape == q.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_cdf_mode_counts_per_row():
    grid = (4, 8, 8)
    D = 8
    blocks = _token_blocks(grid, (4, 4, 4))
    q, k = torch.zeros(1, 1, 256, D), torch.zeros(1, 1, 256, D)
    q[0, 0, blocks == 0, 0] = 10.0  # query block 0: one key block dominates
    k[0, 0, blocks == 2, 0] = 10.0  # (score 100, / sqrt(8) -> weight ~1)
    # query blocks 1..3 are all-zero -> uniform weights 1/4 over the 4 key blocks
    sel = select_blocks(q, k, grid, grid, sparsity=None, cdf_threshold=0.6)
    assert sel.shape == (1, 1, 4, 3)  # rows 1..3 need 3 blocks (0.75 >= 0.6), row 0 needs 1
    assert sel[0, 0, 0].tolist() == [2, -1, -1]
    assert (sel[0, 0, 1:] >= 0).all()
    both = select_blocks(q, k, grid, grid, sparsity=0.5, cdf_threshold=0.6)  # max(top-k 2, cdf)
    assert (both[0, 0] >= 0).sum(-1).tolist() == [2, 3, 3, 3]
    # the reference honours the -1 padding
    v = torch.randn(1, 1, 256, D)
    out = reference_bsa_attention(q, k, v, grid, grid, None, cdf_threshold=0.6)
    torch.testing.assert_close(out, _brute_force(q, k, v, grid, grid, (4, 4, 4), (4, 4, 4), sel), atol=1e-5, rtol=1e-5)


_KERNEL_CHECK = textwrap.dedent("""
    import math, sys, torch
    from longcat_nb.models.bsa import bsa_attention as _bsa
    from longcat_nb.models.bsa.reference import reference_bsa_attention, select_blocks
    LAYOUT = sys.argv[1]
    def bsa_attention(*a, config=None):
        return _bsa(*a, config=config, layout=LAYOUT)
    torch.manual_seed(0)
    if LAYOUT == "raster":
        SMALL = {"fwd": {"BLOCK_N": 64}, "dq": {"BLOCK_N": 64}, "dkdv": {"BLOCK_M": 32}}
        WIDE = {"fwd": {"BLOCK_N": 128}, "dq": {"BLOCK_N": 128}, "dkdv": {"BLOCK_M": 128}}
    else:  # pointer loads instead of tensor descriptors; other pipelining depths
        SMALL = {"tma": False}
        WIDE = {"fwd": {"num_stages": 2}, "dkdv": {"num_stages": 3}}
    cases = [  # grid_q, grid_k, sparsity, chunk, cdf, D, dtype, config, strided q
        ((5, 6, 7), (5, 6, 7), 0.5, (4, 4, 4), None, 32, torch.float32, None, True),   # partial blocks
        ((3, 4, 8), (5, 4, 8), 0.7, (4, 4, 4), None, 16, torch.float32, SMALL, False), # Sq != Sk
        ((4, 8, 8), (8, 8, 8), 0.3, (4, 4, 4), None, 64, torch.float16, WIDE, True),   # even, odd K, tail
        ((3, 5, 6), (4, 5, 6), None, (2, 2, 4), 0.5, 16, torch.float32, WIDE, False),  # cdf, 16-token blocks
        ((3, 5, 6), (3, 5, 6), 0.5, (2, 3, 2), None, 16, torch.float32, None, False),  # 12 tokens -> 16 slots
    ]
    for gq, gk, sp, ch, cdf, D, dt, cfg, strided in cases:
        sq, sk = math.prod(gq), math.prod(gk)
        scale = 3.0 if cdf else 1.0  # peakier block weights -> rows of different lengths
        if strided:  # [B, S, H, D] memory viewed as [B, H, S, D], as the DiT produces it
            q = (torch.randn(1, sq, 2, D) * scale).to(dt).transpose(1, 2).requires_grad_(True)
        else:
            q = (torch.randn(1, 2, sq, D) * scale).to(dt).requires_grad_(True)
        k = (torch.randn(1, 2, sk, D) * scale).to(dt).requires_grad_(True)
        v = torch.randn(1, 2, sk, D).to(dt).requires_grad_(True)
        sel = select_blocks(q.detach(), k.detach(), gq, gk, sp, ch, ch, cdf)
        if cdf:
            lens = (sel >= 0).sum(-1)
            assert lens.min() < lens.max(), lens  # really exercises variable row lengths
        o = bsa_attention(q, k, v, gq, gk, sp, ch, ch, cdf, config=cfg)
        do = torch.randn(o.shape).to(dt)
        g = torch.autograd.grad(o, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        r = reference_bsa_attention(qf, kf, vf, gq, gk, sp, ch, ch, cdf, sel=sel)
        gr = torch.autograd.grad(r, (qf, kf, vf), do.float())
        tol = 1e-5 if dt == torch.float32 else 2e-3
        for name, a, b in zip(("out", "dq", "dk", "dv"), (o, *g), (r, *gr)):
            err = float((a.float() - b).norm() / b.norm())
            assert err < tol, (gq, gk, name, err)
    print("ok")
""")


@pytest.mark.parametrize("layout", ["blocked", "raster"])
def test_triton_kernels_match_reference_in_interpreter(layout):
    run_in_triton_interpreter(_KERNEL_CHECK, layout)


def test_blocked_layout_is_a_permutation_with_real_tokens_first():
    from longcat_nb.models.bsa.blocked import layout

    grid, chunk = (5, 6, 7), (4, 4, 4)
    gather, count, P, partial = layout(grid, chunk, "cpu")
    S = math.prod(grid)
    assert P == 64 and partial and gather.shape == (len(count) * P,) and count.sum() == S
    slots = gather.view(-1, P).long()
    blocks = _token_blocks(grid, chunk)
    real = torch.cat([slots[b, :c] for b, c in enumerate(count.tolist())])
    for b, c in enumerate(count.tolist()):
        assert (blocks[slots[b, :c]] == b).all()  # the first `count` slots are this block's tokens
        assert (slots[b, c:] == slots[b, 0]).all()  # padding repeats the block's first token
    assert torch.equal(real.sort().values, torch.arange(S))  # every token in exactly one real slot


_COMPILE_CHECK = textwrap.dedent("""
    import math, torch
    from longcat_nb.models.bsa import bsa_attention
    torch.manual_seed(0)
    g = (5, 6, 7)
    q, k, v = (torch.randn(1, 2, math.prod(g), 16, requires_grad=True) for _ in range(3))
    f = lambda q, k, v: (bsa_attention(q * 1.5, k, v, g, g, 0.5) * 2).sum()
    out = torch.compile(f, fullgraph=True)(q, k, v)  # selection traced, the kernels one opaque op
    out.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = f(q, k, v)
    ref.backward()
    assert torch.allclose(out, ref) and all(torch.allclose(a, t.grad) for a, t in zip(grads, (q, k, v)))
    print("ok")
""")


def test_blocked_kernels_compile_in_one_graph():
    run_in_triton_interpreter(_COMPILE_CHECK, timeout=400)


@pytest.mark.gpu
@pytest.mark.parametrize("gq,gk", [((8, 30, 52), (8, 30, 52)), ((7, 12, 20), (8, 12, 20)), ((1, 12, 20), (1, 12, 20))])
def test_triton_kernels_bf16_on_gpu(gq, gk):
    pytest.importorskip("triton")
    from longcat_nb.models.bsa import bsa_attention

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, math.prod(gq), 4, 128, device=dev, dtype=dt).transpose(1, 2).requires_grad_(True)
    k, v = (torch.randn(1, 4, math.prod(gk), 128, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    sel = select_blocks(q.detach(), k.detach(), gq, gk, 0.9375)
    for layout in ("blocked", "raster"):
        o = bsa_attention(q, k, v, gq, gk, sel=sel, layout=layout)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        r = reference_bsa_attention(qf, kf, vf, gq, gk, sel=sel)
        gr = torch.autograd.grad(r, (qf, kf, vf), do.float())
        for a, b in zip((o, *g), (r, *gr)):
            assert float((a.float() - b).norm() / b.norm()) < 1e-2, layout
