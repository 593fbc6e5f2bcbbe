"""Block-sparse attention: the reference, block selection, odd shapes, and our Triton kernel (run by
Triton's CPU interpreter in a subprocess)."""
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

from longcat_nb.models.bsa import reference_bsa_attention, select_blocks


def _qkv(grid_q, grid_k, B=1, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sq, sk = grid_q[0] * grid_q[1] * grid_q[2], grid_k[0] * grid_k[1] * grid_k[2]
    return (torch.randn(B, H, sq, D, generator=g), torch.randn(B, H, sk, D, generator=g), torch.randn(B, H, sk, D, generator=g))


def test_sparsity_zero_equals_dense_on_odd_grid():
    grid = (5, 6, 7)  # no dimension divisible by the 4x4x4 blocks
    q, k, v = _qkv(grid, grid)
    out = reference_bsa_attention(q, k, v, grid, grid, sparsity=0.0)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_selection_picks_the_aligned_blocks():
    grid = (4, 8, 8)  # 4 blocks of 64 tokens: (bt, by, bx) = (0, 0..1, 0..1)
    B, H, D = 1, 1, 8
    q = torch.zeros(B, H, 256, D)
    k = torch.zeros(B, H, 256, D)
    t, y, x = torch.meshgrid(torch.arange(4), torch.arange(8), torch.arange(8), indexing="ij")
    block = ((y // 4) * 2 + (x // 4)).reshape(-1)  # raster token -> block id
    for b in range(4):
        q[0, 0, block == b, b] = 1.0  # query block b points along axis b
        k[0, 0, block == (3 - b), b] = 1.0  # key block 3-b answers it
    sel = select_blocks(q, k, grid, grid, sparsity=0.75)  # keep 1 of 4 key blocks
    assert sel.shape == (1, 1, 4, 1)
    assert sel[0, 0, :, 0].tolist() == [3, 2, 1, 0]


def test_keeps_at_least_one_block_and_unequal_lengths():
    gq, gk = (3, 4, 8), (5, 4, 8)  # noisy queries vs conditioning + noisy keys
    q, k, v = _qkv(gq, gk)
    sel = select_blocks(q, k, gq, gk, sparsity=0.9375)  # 10 key blocks: official would keep 0
    assert sel.shape[-1] == 1
    out = reference_bsa_attention(q, k, v, gq, gk, sparsity=0.9375)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_triton_kernel_matches_reference_in_interpreter():
    import pytest

    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import os, torch
        from longcat_nb.models.bsa.triton_bsa import bsa_attention
        from longcat_nb.models.bsa.reference import reference_bsa_attention, select_blocks
        torch.manual_seed(0)
        for gq, gk, sp in [((5, 6, 7), (5, 6, 7), 0.5), ((3, 4, 8), (5, 4, 8), 0.7)]:
            sq, sk = gq[0] * gq[1] * gq[2], gk[0] * gk[1] * gk[2]
            q = torch.randn(1, 2, sq, 16, requires_grad=True)
            k = torch.randn(1, 2, sk, 16, requires_grad=True)
            v = torch.randn(1, 2, sk, 16, requires_grad=True)
            sel = select_blocks(q.detach(), k.detach(), gq, gk, sp)
            o = bsa_attention(q, k, v, gq, gk, sp, sel=sel)
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            r = reference_bsa_attention(q, k, v, gq, gk, sp, sel=sel)
            gr = torch.autograd.grad(r, (q, k, v), do)
            for a, b in [(o, r), *zip(g, gr)]:
                err = float((a - b).norm() / b.norm())
                assert err < 1e-5, err
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
