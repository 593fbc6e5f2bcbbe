"""Block-sparse attention (spec §3): block geometry, block selection and a plain-torch reference.

Tokens of a (T, h, w) grid, in (t, y, x) raster order, are grouped into 3-D blocks of ``chunk``
tokens (4x4x4 = 64 by default); blocks are numbered in (bt, by, bx) raster order and the tokens of
a block in (t, y, x) raster order. Each query block keeps the key blocks whose mean-pooled key has
the largest dot product with its mean-pooled query, and every query token then attends (exact
softmax, scale 1/sqrt(D)) to all tokens of its kept key blocks and to nothing else.

Deliberate differences from the official kernel (facts from its code, not its code):

* Any grid works. The official asserts T, h, w divisible by the chunk; here the blocks at the far
  edges are partial: they are mean-pooled over their real tokens only and contribute only their
  real tokens as keys (480x832 has h = 30, which 4 does not divide).
* Top-k keeps ``max(1, int((1 - s) * Mk))`` blocks. The official floors without the max, so with
  fewer than 16 key blocks at s = 0.9375 it keeps none and returns zeros; we keep at least one.
* CDF mode keeps the smallest prefix of blocks (by descending softmax weight) whose cumulative weight
  reaches the threshold. The official counts the blocks whose cumulative weight is <= the threshold,
  which is one block fewer (and can be zero) unless a cumulative sum hits the threshold exactly.
* Pooling and block scores are computed in fp32 (the official uses the working dtype, bf16), so
  near-ties may be broken differently.

Selections are returned as ``[B, H, Mq, K]`` int64 key-block indices, best first; rows that keep
fewer than K blocks (CDF mode) are padded with -1, which every consumer treats as "no block".
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_blocks(grid, chunk) -> int:
    return math.prod(_cdiv(g, c) for g, c in zip(grid, chunk))


def num_selected(mk: int, sparsity: float) -> int:
    """Top-k count: the official ``int((1 - s) * Mk)``, but never below one block."""
    return max(1, min(mk, int((1.0 - float(sparsity)) * mk)))


@lru_cache(maxsize=64)
def block_tables(grid: tuple, chunk: tuple, device_str: str):
    """``rows [M, P]`` raster token index of every slot of every block (0 where the slot lies outside
    the grid), ``valid [M, P]`` bool, with P = prod(chunk). Cached per (grid, chunk, device)."""
    T, h, w = grid
    ct, ch, cw = chunk
    nt, nh, nw = _cdiv(T, ct), _cdiv(h, ch), _cdiv(w, cw)
    bt, bh, bw, it, ih, iw = torch.meshgrid(
        *(torch.arange(n) for n in (nt, nh, nw, ct, ch, cw)), indexing="ij")
    t, y, x = bt * ct + it, bh * ch + ih, bw * cw + iw
    valid = (t < T) & (y < h) & (x < w)
    rows = torch.where(valid, (t * h + y) * w + x, torch.zeros_like(t))
    M, P = nt * nh * nw, ct * ch * cw
    dev = torch.device(device_str)
    return rows.reshape(M, P).to(dev), valid.reshape(M, P).to(dev)


def _segment_sum(x: torch.Tensor, dim: int, c: int) -> torch.Tensor:
    """Sum consecutive groups of ``c`` along ``dim`` (the last group may be shorter), in fp32.
    The full groups are a view and the remainder is summed separately, so nothing is padded or
    copied at full size (q and k are 0.7 GB each at 704x1280x93)."""
    n = x.shape[dim]
    full = n // c
    parts = []
    if full:
        head = x.narrow(dim, 0, full * c).unflatten(dim, (full, c))
        parts.append(head.sum(dim + 1, dtype=torch.float32))
    if n % c:
        parts.append(x.narrow(dim, full * c, n % c).sum(dim, keepdim=True, dtype=torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def pooled_blocks(x: torch.Tensor, grid, chunk) -> torch.Tensor:
    """Mean of each block over its real tokens: [B, H, S, D] (any strides) -> [B, H, M, D] fp32."""
    T, h, w = grid
    ct, ch, cw = chunk
    s = x.unflatten(2, (T, h, w))  # [B, H, T, h, w, D]
    # reduce the innermost axis first: it is the one read at full size, and w divides 4 more often
    s = _segment_sum(s, 4, cw)
    s = _segment_sum(s, 3, ch)
    s = _segment_sum(s, 2, ct)
    cnt = [torch.full((_cdiv(n, c),), float(c), device=x.device) for n, c in zip(grid, chunk)]
    for a, (n, c) in zip(cnt, zip(grid, chunk)):
        if n % c:
            a[-1] = n % c
    count = cnt[0][:, None, None] * cnt[1][None, :, None] * cnt[2][None, None, :]
    return (s / count[..., None]).flatten(2, 4)


def block_scores(q, k, grid_q, grid_k, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4)) -> torch.Tensor:
    """Pooled-query · pooled-key scores [B, H, Mq, Mk] in fp32 (no softmax scale, as the official)."""
    return pooled_blocks(q, grid_q, chunk_q) @ pooled_blocks(k, grid_k, chunk_k).transpose(-1, -2)


def select_blocks(q, k, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                  cdf_threshold=None) -> torch.Tensor:
    """Key blocks kept by each query block: int64 [B, H, Mq, K], best first, -1 = no block.

    Top-k mode (``cdf_threshold`` None): K = max(1, int((1 - sparsity) * Mk)) for every row.
    CDF mode: per row, the smallest number of blocks whose softmax(score / sqrt(D)) weights, taken in
    descending order, sum to at least ``cdf_threshold``; with ``sparsity`` also given (not None) the
    row keeps the larger of that and the top-k count. K is then the largest row count.
    """
    _check_grid(q, grid_q, "q")
    _check_grid(k, grid_k, "k")
    with torch.no_grad():
        score = block_scores(q, k, grid_q, grid_k, chunk_q, chunk_k)
        mk = score.shape[-1]
        if cdf_threshold is None:
            if sparsity is None:
                raise ValueError("give sparsity, cdf_threshold or both")
            return score.topk(num_selected(mk, sparsity), dim=-1).indices
        weights, order = torch.softmax(score / math.sqrt(q.shape[-1]), dim=-1).sort(dim=-1, descending=True)
        need = (weights.cumsum(-1) < cdf_threshold).sum(-1) + 1  # smallest prefix reaching the threshold
        if sparsity is not None:
            need = need.clamp(min=num_selected(mk, sparsity))
        need = need.clamp(max=mk)
        kmax = int(need.max())
        order = order[..., :kmax]
        keep = torch.arange(kmax, device=order.device) < need[..., None]
        return torch.where(keep, order, torch.full_like(order, -1))


def _check_grid(x, grid, name):
    if len(grid) != 3 or math.prod(grid) != x.shape[2]:
        raise ValueError(f"{name}: sequence length {x.shape[2]} is not T*h*w of grid {tuple(grid)}")


def reference_bsa_attention(q, k, v, grid_q, grid_k, sparsity=0.9375, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4),
                            cdf_threshold=None, sel=None, chunk_budget: int = 1 << 26) -> torch.Tensor:
    """Block-sparse attention in plain torch (fp32 math, result in q's dtype); differentiable.

    For each query block the tokens of its kept key blocks are gathered and exact softmax attention
    is computed over them; padding slots of partial blocks are masked. Query blocks are processed in
    groups of about ``chunk_budget`` gathered key elements, so memory is O(Sq · K · P · D / groups),
    never O(Sq · Sk): it runs on the full 704x1280x93 grid on one GPU for a few heads.
    ``sel`` (from :func:`select_blocks`) fixes the selection, e.g. to compare two implementations.
    """
    _check_grid(q, grid_q, "q")
    _check_grid(k, grid_k, "k")
    if sel is None:
        sel = select_blocks(q, k, grid_q, grid_k, sparsity, chunk_q, chunk_k, cdf_threshold)
    B, H, Sq, D = q.shape
    dev = q.device
    ct = torch.promote_types(q.dtype, torch.float32)
    rows_q, valid_q = block_tables(tuple(grid_q), tuple(chunk_q), str(dev))
    rows_k, valid_k = block_tables(tuple(grid_k), tuple(chunk_k), str(dev))
    mq, pq = rows_q.shape
    pk = rows_k.shape[1]
    K = sel.shape[-1]
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    step = max(1, chunk_budget // max(1, B * H * K * pk * D))
    outs = []
    for a in range(0, mq, step):
        b = min(mq, a + step)
        s = sel[:, :, a:b]  # [B, H, m, K]
        kb = s.clamp(min=0)
        krows = rows_k[kb].flatten(-2)  # [B, H, m, K·pk]
        kok = (valid_k[kb] & (s >= 0)[..., None]).flatten(-2)
        idx = krows.flatten(2)[..., None].expand(-1, -1, -1, D)
        kg = kf.gather(2, idx).view(B, H, b - a, K * pk, D)
        vg = vf.gather(2, idx).view(B, H, b - a, K * pk, D)
        qg = qf[:, :, rows_q[a:b].reshape(-1)].view(B, H, b - a, pq, D)
        scores = (qg @ kg.transpose(-1, -2)) / math.sqrt(D)  # [B, H, m, pq, K·pk]
        scores = scores.masked_fill(~kok[:, :, :, None, :], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vg)
    blocked = torch.cat(outs, dim=2).flatten(2, 3)  # [B, H, Mq·pq, D], block-major
    # back to raster order: position of each raster token in the block-major list
    where = torch.empty(Sq, dtype=torch.long, device=dev)
    where[rows_q[valid_q]] = torch.arange(mq * pq, device=dev).view(mq, pq)[valid_q]
    return blocked[:, :, where].to(q.dtype)
