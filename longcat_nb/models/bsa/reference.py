"""Block-sparse attention (spec §3), the plain-torch reference and the pieces the kernel shares.

Tokens of a (T, h, w) grid are grouped into 3-D blocks of ``chunk`` (4x4x4 = 64 tokens); blocks at the
edges of a grid that does not divide evenly are partial. Each query block attends to the ``k_sel``
key blocks whose mean-pooled key scores highest against its mean-pooled query (no softmax scale in
the score, as the official kernel), with exact softmax attention inside the selected blocks.

Deviation from the official kernel, on purpose: it keeps ``int((1 − s)·Mk)`` blocks, which is 0 (an
all-zero output) when there are fewer than 16 key blocks at s = 0.9375; we keep at least one block.
It also requires T, h, w divisible by the chunk; we pad partial blocks and mask the padding, so any
grid works (480x832 gives h = 30, which 4 does not divide).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _block_layout(grid: tuple, chunk: tuple, device_str: str):
    """perm [M·n] raster index of each block-major slot (0 for padding), valid [M·n] bool, M."""
    T, h, w = grid
    ct, ch, cw = chunk
    nt, nh, nw = math.ceil(T / ct), math.ceil(h / ch), math.ceil(w / cw)
    bt, bh, bw, it, ih, iw = torch.meshgrid(
        torch.arange(nt), torch.arange(nh), torch.arange(nw), torch.arange(ct), torch.arange(ch), torch.arange(cw),
        indexing="ij")
    t, y, x = bt * ct + it, bh * ch + ih, bw * cw + iw
    valid = (t < T) & (y < h) & (x < w)
    perm = torch.where(valid, (t * h + y) * w + x, torch.zeros_like(t))
    dev = torch.device(device_str)
    return perm.reshape(-1).to(dev), valid.reshape(-1).to(dev), nt * nh * nw


def to_blocks(x: torch.Tensor, grid, chunk) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[B, H, S, D] raster tokens -> [B, H, M·n, D] block-major with zero padding rows, valid mask."""
    perm, valid, M = _block_layout(tuple(grid), tuple(chunk), str(x.device))
    xb = x.index_select(2, perm) * valid.view(1, 1, -1, 1).to(x.dtype)
    return xb, valid, M


def from_blocks(xb: torch.Tensor, grid, chunk, seq_len: int) -> torch.Tensor:
    perm, valid, _ = _block_layout(tuple(grid), tuple(chunk), str(xb.device))
    out = xb.new_zeros(xb.shape[0], xb.shape[1], seq_len, xb.shape[3])
    idx = perm[valid]
    out[:, :, idx] = xb[:, :, valid]
    return out


def pooled(xb: torch.Tensor, valid: torch.Tensor, M: int) -> torch.Tensor:
    """Mean of each block over its real tokens: [B, H, M, D]."""
    n = xb.shape[2] // M
    cnt = valid.view(M, n).sum(1).clamp(min=1).to(xb.dtype)
    return xb.view(*xb.shape[:2], M, n, xb.shape[-1]).sum(3) / cnt.view(1, 1, M, 1)


def num_selected(mk: int, sparsity: float) -> int:
    return max(1, min(mk, int((1.0 - sparsity) * mk)))


def select_blocks(q, k, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                  cdf_threshold=None) -> torch.Tensor:
    """Indices [B, H, Mq, k_sel] of the key blocks each query block attends to (top-k of pooled
    scores; with ``cdf_threshold`` the count is the larger of top-k and the smallest prefix of the
    softmax-weighted scores reaching the threshold, padded with the next best blocks)."""
    qb, qv, mq = to_blocks(q, grid_q, chunk_q)
    kb, kv, mk = to_blocks(k, grid_k, chunk_k)
    score = pooled(qb.float(), qv, mq) @ pooled(kb.float(), kv, mk).transpose(-1, -2)  # [B, H, Mq, Mk]
    n = num_selected(mk, sparsity)
    if cdf_threshold is not None:
        w = torch.softmax(score / math.sqrt(q.shape[-1]), dim=-1).sort(dim=-1, descending=True).values
        need = (w.cumsum(-1) < cdf_threshold).sum(-1) + 1
        n = max(n, int(need.max()))
    return score.topk(min(n, mk), dim=-1).indices


def reference_bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                            cdf_threshold=None, sel=None) -> torch.Tensor:
    """Dense attention restricted to the selected blocks (masked), for tests: O(Sq·Sk) memory."""
    if sel is None:
        sel = select_blocks(q, k, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    pq, vq, mq = _block_layout(tuple(grid_q), tuple(chunk_q), str(q.device))
    pk, vk, mk = _block_layout(tuple(grid_k), tuple(chunk_k), str(q.device))
    q_block = torch.empty(Sq, dtype=torch.long, device=q.device)
    q_block[pq[vq]] = torch.arange(pq.numel(), device=q.device)[vq] // (pq.numel() // mq)
    k_block = torch.empty(Sk, dtype=torch.long, device=q.device)
    k_block[pk[vk]] = torch.arange(pk.numel(), device=q.device)[vk] // (pk.numel() // mk)
    block_mask = torch.zeros(B, H, mq, mk, dtype=torch.bool, device=q.device)
    block_mask.scatter_(-1, sel, True)
    mask = block_mask[:, :, q_block][:, :, :, k_block]  # [B, H, Sq, Sk]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
