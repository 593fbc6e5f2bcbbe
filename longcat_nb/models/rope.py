"""3D rotary position embedding of the LongCat-Video DiT (spec §2.11).

The 128 head dims split into [t (44) | h (42) | w (42)]; each axis part rotates adjacent pairs
(2j, 2j+1) by position · θ^(−2j/d_axis), θ = 10000, on integer positions of the patched grid.
Everything is float32 (never float64, so the tables also build on MPS).
"""
from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 8:
        raise ValueError(f"3D RoPE needs head_dim divisible by 8, got {head_dim}")
    third = 2 * (head_dim // 6)
    return head_dim - 2 * third, third, third


def _axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    # Frequencies as the checkpoint was trained with: 1 / θ^(2j/d) in float32.
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    return positions[:, None] * inv_freq[None, :]  # [n, dim/2]


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [T·h·w, head_dim/2] for tokens in (t, h, w) raster order."""
    T, H, W = grid
    dt, dh, dw = axis_dims(head_dim)
    at = _axis_angles(torch.arange(T, dtype=torch.float32), dt)
    ah = _axis_angles(torch.arange(H, dtype=torch.float32), dh)
    aw = _axis_angles(torch.arange(W, dtype=torch.float32), dw)
    angles = torch.cat(
        [
            at[:, None, None, :].expand(T, H, W, -1),
            ah[None, :, None, :].expand(T, H, W, -1),
            aw[None, None, :, :].expand(T, H, W, -1),
        ],
        dim=-1,
    ).reshape(T * H * W, head_dim // 2)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, heads, N, D] in float32; result in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


_TABLES: dict = {}  # shared by every block (one set of tables, not 48)


class RopeCache:
    """Tables per (grid, head_dim, device), kept outside the state dict like the official model.
    The DiT's forward looks its grid up before the blocks run, so inside a compiled block ``get`` is
    a plain lookup (a cache fill there would be a side effect torch.compile refuses to checkpoint)."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def get(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(int(g) for g in grid), self.head_dim, str(device))
        if key not in _TABLES:
            if len(_TABLES) > 16:  # many resolutions in one session: keep memory bounded
                _TABLES.clear()
            _TABLES[key] = rope_tables(key[0], self.head_dim, device)
        return _TABLES[key]
