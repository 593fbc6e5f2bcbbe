"""LongCat-Video DiT: the 13.6B single-stream video transformer (spec §2).

Class name, config keys, state-dict keys and forward arguments match the official checkpoint's
``dit/`` folder, so ``LongCatVideoTransformer3DModel.from_pretrained(ckpt, subfolder="dit")`` loads
the published weights unchanged. The numerics follow the official model: the timestep embedding,
every adaLN modulation, the gated residual adds and the final layer run in float32 while the
big matrices run in the weight dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch.func import functional_call

from . import attention as attention_backends
from . import qk_rope
from .rope import RopeCache, apply_rope


def run_fp32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` in float32 whatever its weight dtype (the official fp32 autocast regions).

    CUDA has a float32 autocast that upcasts weights inside matmuls. CPU and MPS autocast only go
    down in precision, so there the parameters are upcast for this call instead; a LoRA wrapped
    around the layer still sees its own parameters (they are part of ``named_parameters``).
    """
    x = x.float()
    if x.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float32):
            return module(x)
    params = dict(module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        return module(x)
    return functional_call(module, {k: p.float() for k, p in params.items()}, (x,))


# ---- element-wise glue: plain functions, so speed.apply_compile can fuse them ---------------------
def layer_norm_fp32(x, weight, bias, eps: float):
    """LayerNorm computed in float32, result in the input dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def rms_norm_fp32(x, weight, eps: float):
    """RMS norm in float32, cast back to the input dtype, then scaled in that dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def modulate_fp32(x, shift, scale, eps: float = 1e-6):
    """LayerNorm(x)·(1 + scale) + shift in float32 (non-affine norm), rounded back to x's dtype."""
    xf = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return (xf * (1 + scale) + shift).to(x.dtype)


def gated_residual(x, gate, y):
    """x + gate·y in float32 (gate per frame), rounded back to x's dtype. x, y: [B, T, S, C]."""
    return (x.float() + gate * y.float()).to(x.dtype)


GLUE = ("layer_norm_fp32", "rms_norm_fp32", "modulate_fp32", "gated_residual", "apply_rope")
_GLUE_FUNCS = {"layer_norm_fp32": layer_norm_fp32, "rms_norm_fp32": rms_norm_fp32, "modulate_fp32": modulate_fp32,
               "gated_residual": gated_residual, "apply_rope": apply_rope}


class LayerNormFP32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _glue("layer_norm_fp32")(x, self.weight, self.bias, self.eps)


class RMSNormFP32(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _glue("rms_norm_fp32")(x, self.weight, self.eps)


_compiled_glue: dict = {}


def _glue(name: str):
    """The glue function by name: the compiled version once speed.apply_compile asked for it."""
    return _compiled_glue.get(name) or _GLUE_FUNCS[name]  # a dict, not globals(): torch.compile traces it


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C], tokens in (t, h, w) order


class TimestepEmbedder(nn.Module):
    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, t_embed_dim),
            nn.SiLU(),
            nn.Linear(t_embed_dim, t_embed_dim),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as trained
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return run_fp32(self.mlp, self.sinusoid(t, self.frequency_embedding_size))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class FeedForwardSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256):
        super().__init__()
        hidden = int(2 * hidden_dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)  # 11008 at full size
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNormFP32(self.head_dim)
        self.k_norm = RMSNormFP32(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = RopeCache(self.head_dim)
        self.attention = attention_backends.get("sdpa")  # a registered backend object (set_attention_backend)
        self.bsa_params: Optional[dict] = None

    @property
    def backend(self) -> str:
        return self.attention.name

    def _qkv(self, x: torch.Tensor):
        return self._split(self.qkv(x))

    def _split(self, y: torch.Tensor):
        """q, k (normed) and v [B, heads, N, D] from the qkv projection's output."""
        B, N, _ = y.shape
        q, k, v = y.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # contiguous [B, heads, N, D]: cuDNN's fused attention rejects the strided view and torch
        # would silently fall back to a slower kernel
        return self.q_norm(q), self.k_norm(k), v.contiguous()

    def _fused(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strided_v: bool):
        """q, k after the norms and RoPE, and v, the norms and RoPE in one Triton kernel
        (models/qk_rope.py); for steps without gradients on CUDA. ``strided_v``: leave v a view of
        ``y`` (for backends whose kernels take it, AttentionBackend.strided_v; cuDNN's dense attention
        wants it contiguous, see _split)."""
        B, N, _ = y.shape
        y = y.view(B, N, 3, self.num_heads, self.head_dim)
        q, k = qk_rope.qk_norm_rope(y, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)
        v = y[:, :, 2].transpose(1, 2)
        return q, k, (v if strided_v else v.contiguous())

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))

    def forward(self, x, grid, num_cond_latents: int = 0, return_kv: bool = False):
        T, h, w = grid
        cos, sin = self.rope.get(grid, x.device)
        y = self.qkv(x)
        kv = None
        backend = self.attention.for_grid(grid)
        if not return_kv and qk_rope.usable(y, self.q_norm, self.k_norm, self.head_dim):
            # v stays strided only where the one attention call of this step takes it so
            q, k, v = self._fused(y, cos, sin, not num_cond_latents and backend.strided_v(grid))
        else:
            q, k, v = self._split(y)
            kv = (k, v) if return_kv else None  # cache is post-norm, pre-RoPE (spec §4)
            rope = _glue("apply_rope")
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        attn = lambda q_, k_, v_, tq, tk: backend.self_attention(  # noqa: E731
            q_, k_, v_, (tq, h, w), (tk, h, w), self.bsa_params
        )
        if num_cond_latents:
            # Conditioning tokens attend only to themselves; noisy tokens attend to everything.
            nc = num_cond_latents * h * w
            o = torch.cat(
                [
                    attn(q[:, :, :nc], k[:, :, :nc], v[:, :, :nc], num_cond_latents, num_cond_latents),
                    attn(q[:, :, nc:], k, v, T - num_cond_latents, T),
                ],
                dim=2,
            )
        else:
            o = attn(q, k, v, T, T)
        out = self._out(o)
        return (out, kv) if return_kv else out

    def forward_with_kv_cache(self, x, grid, num_cond_latents: int, kv_cache):
        """Noisy tokens only; the cached conditioning k/v (post-norm, pre-RoPE) go in front."""
        T, h, w = grid
        q, k, v = self._qkv(x)
        k_cache, v_cache = (c.to(x.device, x.dtype) for c in kv_cache)
        if k_cache.shape[0] == 1 and q.shape[0] > 1:  # one cache shared by the CFG batch
            k_cache = k_cache.expand(q.shape[0], -1, -1, -1)
            v_cache = v_cache.expand(q.shape[0], -1, -1, -1)
        k = torch.cat([k_cache, k], dim=2)
        v = torch.cat([v_cache, v], dim=2)
        cos, sin = self.rope.get((T + num_cond_latents, h, w), x.device)
        nc = k_cache.shape[2]
        q = apply_rope(q, cos[nc:], sin[nc:])
        k = apply_rope(k, cos, sin)
        o = self.attention.for_grid(grid).self_attention(q, k, v, (T, h, w), (T + num_cond_latents, h, w),
                                                         self.bsa_params)
        return self._out(o)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNormFP32(self.head_dim)
        self.k_norm = RMSNormFP32(self.head_dim)
        self.attention = attention_backends.get("sdpa")  # the backend whose cross-attention runs

    @property
    def backend(self) -> str:
        return self.attention.name

    def forward(self, x, y, y_mask=None, num_cond_tokens: int = 0):
        """x [B, N, C] video tokens, y [B, L, C] projected text, y_mask [B, L] bool or None."""
        if num_cond_tokens:
            # Conditioning tokens get no text: their output is exactly zero (spec §2.13).
            out = self.forward(x[:, num_cond_tokens:], y, y_mask)
            return torch.cat([out.new_zeros(x.shape[0], num_cond_tokens, x.shape[2]), out], dim=1)
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim)).transpose(1, 2).contiguous()
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        k = self.k_norm(k).transpose(1, 2).contiguous()
        v = v.transpose(1, 2).contiguous()
        mask = None if y_mask is None else y_mask[:, None, None, :]
        o = self.attention.cross_attention(q, k, v, mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class LongCatSingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, adaln_tembed_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size))
        self.mod_norm_attn = LayerNormFP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mod_norm_ffn = LayerNormFP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.pre_crs_attn_norm = LayerNormFP32(hidden_size, eps=1e-6, elementwise_affine=True)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, y, y_mask, t, grid, num_cond_latents=0, return_kv=False, kv_cache=None,
                skip_crs_attn=False):
        """x [B, N, C]; y [B, L, C]; t [B, T, Ct] float32; grid (T, h, w) of x's tokens."""
        B, N, C = x.shape
        T = grid[0]
        mod = run_fp32(self.adaLN_modulation, t).unsqueeze(2)  # [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        x_m = _glue("modulate_fp32")(x.view(B, T, -1, C), shift_msa, scale_msa).view(B, N, C)
        kv = None
        if kv_cache is not None:
            a = self.attn.forward_with_kv_cache(x_m, grid, num_cond_latents, kv_cache)
            num_cond_latents = 0  # every token here is noisy
        elif return_kv:
            a, kv = self.attn(x_m, grid, num_cond_latents, return_kv=True)
        else:
            a = self.attn(x_m, grid, num_cond_latents)
        x = _glue("gated_residual")(x.view(B, T, -1, C), gate_msa, a.view(B, T, -1, C)).view(B, N, C)

        if not skip_crs_attn:
            x = x + self.cross_attn(self.pre_crs_attn_norm(x), y, y_mask, num_cond_latents * (N // T))

        x_m = _glue("modulate_fp32")(x.view(B, T, -1, C), shift_mlp, scale_mlp).view(B, N, C)
        f = self.ffn(x_m)
        x = _glue("gated_residual")(x.view(B, T, -1, C), gate_mlp, f.view(B, T, -1, C)).view(B, N, C)
        return (x, kv) if return_kv else x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.norm_final = LayerNormFP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
        B, N, C = x.shape
        shift, scale = run_fp32(self.adaLN_modulation, t).unsqueeze(2).chunk(2, dim=-1)
        x = _glue("modulate_fp32")(x.view(B, T, -1, C), shift, scale).view(B, N, C)
        return run_fp32(self.linear, x)


class LongCatVideoTransformer3DModel(ModelMixin, ConfigMixin):
    """The LongCat-Video DiT; defaults are the official full size (48 blocks of width 4096)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatSingleStreamBlock"]
    # Our runtime choice, never written into a checkpoint's config.json.
    ignore_for_config = ["attention_implementation"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size=(1, 2, 2),
        enable_flashattn3: bool = False,
        enable_flashattn2: bool = False,
        enable_xformers: bool = False,
        enable_bsa: bool = False,
        bsa_params: Optional[dict] = None,
        cp_split_hw: Optional[list] = None,
        text_tokens_zero_pad: bool = False,
        attention_implementation: Optional[str] = None,
    ):
        super().__init__()
        patch_size = tuple(patch_size)
        if patch_size[0] != 1:
            raise ValueError(f"patch_size[0] must be 1 (no temporal patching), got {patch_size}")
        if cp_split_hw is not None and int(cp_split_hw[0]) * int(cp_split_hw[1]) > 1:
            raise NotImplementedError(
                f"cp_split_hw={cp_split_hw}: context parallelism is not supported here; load with "
                "cp_split_hw=None (or [1, 1]) for single-process use"
            )
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.text_tokens_zero_pad = text_tokens_zero_pad
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            [LongCatSingleStreamBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), out_channels, adaln_tembed_dim)
        self.gradient_checkpointing = False
        self.set_attention_backend(
            attention_backends.backend_from_config(attention_implementation, enable_xformers, enable_bsa))

    # ---- runtime switches -------------------------------------------------------------------
    def set_attention_backend(self, backend) -> str:
        """A registered backend (models/attention/) by name or object; returns the name of the one
        that will actually run (``sdpa`` where the asked one cannot run at all)."""
        self.attention = attention_backends.select(backend)
        cross = attention_backends.cross_backend(self.attention)
        for block in self.blocks:
            block.attn.attention = self.attention
            block.attn.bsa_params = self.config.bsa_params
            block.cross_attn.attention = cross
        return self.attention.name

    @property
    def attention_backend(self) -> str:
        return self.attention.name

    def enable_bsa(self) -> None:
        self.set_attention_backend("bsa")

    def disable_bsa(self) -> None:
        self.set_attention_backend("sdpa")

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        num_cond_latents: int = 0,
        return_kv: bool = False,
        kv_cache_dict: Optional[dict] = None,
        skip_crs_attn: bool = False,
        offload_kv_cache: bool = False,
    ):
        """hidden_states [B, 16, T, H, W]; timestep [B] or [B, T] in [0, 1000];
        encoder_hidden_states [B, 1, L, C_text]; encoder_attention_mask [B, L] (1 = real token).
        Returns the velocity x0 − ε as float32 [B, 16, T, H, W] (or with the per-block kv cache)."""
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"latent height/width {H}x{W} must be divisible by the patch {ph}x{pw}")
        grid = (T // pt, H // ph, W // pw)
        if encoder_hidden_states.dim() != 4:
            raise ValueError(
                f"encoder_hidden_states must be 4-D [B, 1, L, C], got shape {tuple(encoder_hidden_states.shape)}"
            )
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(-1, grid[0])
        num_cond_latents = int(num_cond_latents or 0)
        kv_cache_dict = kv_cache_dict or {}

        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(hidden_states.to(dtype))
        # The timestep is rounded to the weight dtype before embedding, as in the official model.
        t = self.t_embedder(timestep.to(dtype).flatten()).view(B, grid[0], -1)

        y = self.y_embedder(encoder_hidden_states.to(dtype)).squeeze(1)  # [B, L, C]
        y_mask = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.reshape(B, -1)
            if self.text_tokens_zero_pad:
                # Zero the projected padding, then attend to all L positions (spec §2.6).
                y = y * mask[:, :, None].to(y.dtype)
            else:
                y_mask = mask != 0

        rope_grid = (grid[0] + num_cond_latents, *grid[1:]) if kv_cache_dict else grid
        self.blocks[0].attn.rope.get(rope_grid, x.device)  # fill the shared table cache outside the blocks
        kv_out = {}
        for i, block in enumerate(self.blocks):
            args = (x, y, y_mask, t, grid, num_cond_latents, return_kv, kv_cache_dict.get(i), skip_crs_attn)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                out = self._gradient_checkpointing_func(block, *args)
            else:
                out = block(*args)
            if return_kv:
                x, (k, v) = out
                kv_out[i] = (k.cpu(), v.cpu()) if offload_kv_cache else (k.contiguous(), v.contiguous())
            else:
                x = out

        x = self.final_layer(x, t, grid[0])
        out = self.unpatchify(x, grid).float()
        return (out, kv_out) if return_kv else out

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, N, pt·ph·pw·C] with C fastest -> [B, C, T·pt, h·ph, w·pw]."""
        B = x.shape[0]
        T, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.view(B, T, h, w, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, self.out_channels, T * pt, h * ph, w * pw)
