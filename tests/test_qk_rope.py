"""The fused q/k norm + RoPE kernel (models/qk_rope.py): against the DiT's own ops through Triton's
CPU interpreter (in a subprocess), when the DiT uses it, and on a GPU inside a compiled DiT."""
import pytest
import torch

from longcat_nb.models import LongCatVideoTransformer3DModel, qk_rope
from helpers import run_in_triton_interpreter

_INTERPRETED = r"""
import torch
from longcat_nb.models.dit import RMSNormFP32
from longcat_nb.models.qk_rope import qk_norm_rope
from longcat_nb.models.rope import apply_rope, rope_tables
torch.manual_seed(0)
for B, grid, H, D, dtype in [(2, (2, 3, 7), 2, 32, torch.float16), (1, (3, 5, 9), 3, 16, torch.float16),
                             (2, (2, 3, 7), 2, 32, torch.bfloat16)]:
    N = grid[0] * grid[1] * grid[2]  # 42 and 135 tokens: not multiples of the kernel's 64-token tile
    # the qkv output as the DiT has it: [B, N, 3*H*D] with an offset, viewed [B, N, 3, H, D]
    y = (torch.randn(B, N, 3 * H * D) * 3 + 1).to(dtype).view(B, N, 3, H, D)
    qn, kn = RMSNormFP32(D).to(dtype), RMSNormFP32(D).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(torch.rand(D) + 0.5)
        kn.weight.copy_(torch.rand(D) + 0.5)
    cos, sin = rope_tables(grid, D)
    with torch.no_grad():
        q_ref = apply_rope(qn(y[:, :, 0].transpose(1, 2)), cos, sin)
        k_ref = apply_rope(kn(y[:, :, 1].transpose(1, 2)), cos, sin)
        q, k = qk_norm_rope(y, qn.weight, kn.weight, cos, sin, qn.eps)
    assert q.shape == q_ref.shape == (B, H, N, D) and q.dtype == dtype and q.is_contiguous()
    for a, b in ((q, q_ref), (k, k_ref)):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        # fp16: the same roundings in the same order, so float32 contraction differences at most.
        # bf16: the interpreter truncates float32 -> bf16 where the GPU and torch round to nearest
        # (three roundings: about 1% apart); the GPU test checks bf16 against the eager DiT
        assert err < (1e-3 if dtype == torch.float16 else 2e-2), (dtype, err)
    print("case", B, grid, H, D, dtype)
print("ok")
"""


def test_kernel_matches_the_dit_ops_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED)


def test_used_only_without_gradients_on_cuda():
    m = LongCatVideoTransformer3DModel(hidden_size=64, depth=1, num_heads=2, caption_channels=16,
                                       adaln_tembed_dim=32, frequency_embedding_size=32).to(torch.bfloat16)
    attn = m.blocks[0].attn
    y = torch.zeros(1, 4, 192, dtype=torch.bfloat16)
    assert not qk_rope.usable(y, attn.q_norm, attn.k_norm, attn.head_dim)  # CPU
    if torch.cuda.is_available() and qk_rope.triton is not None:
        yc = y.cuda()
        assert qk_rope.usable(yc, attn.q_norm, attn.k_norm, attn.head_dim)
        assert not qk_rope.usable(yc.float(), attn.q_norm, attn.k_norm, attn.head_dim)  # weights bf16
        yg = yc.clone().requires_grad_()
        assert not qk_rope.usable(yg, attn.q_norm, attn.k_norm, attn.head_dim)  # training
        with torch.no_grad():
            assert qk_rope.usable(yg, attn.q_norm, attn.k_norm, attn.head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "bsa"])
def test_gpu_dit_output_with_and_without_the_kernel(backend):
    """The full-width (32 x 128 heads) 2-block DiT, eager and compiled: the fused step agrees with
    the step through the unfused ops to bf16 rounding."""
    from longcat_nb.speed import apply_compile, disable_compile

    torch.manual_seed(0)
    m = LongCatVideoTransformer3DModel(depth=2).to("cuda", torch.bfloat16).eval()
    m.set_attention_backend(backend)
    x = torch.randn(2, 16, 5, 32, 48, device="cuda")  # grid 5x16x24: BSA-divisible
    t = torch.full((2,), 500.0, device="cuda")
    y = torch.randn(2, 1, 64, 4096, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 64, dtype=torch.long, device="cuda")
    outs = {}
    try:
        for compiled in (False, True):
            if compiled:
                apply_compile(m, scope="blocks")
            for on in (False, True):
                qk_rope.set_enabled(on)
                torch._dynamo.reset()
                with torch.no_grad():
                    outs[compiled, on] = m(x, t, y, mask).float()
    finally:
        qk_rope.set_enabled(True)
        disable_compile(m)
    for compiled in (False, True):
        ref, out = outs[compiled, False], outs[compiled, True]
        assert torch.isfinite(out).all()
        assert float((out - ref).norm() / ref.norm()) < 2e-2, (backend, compiled)
