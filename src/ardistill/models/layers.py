"""Transformer building blocks shared by the teacher DiT and the ARD student.

Parameter names follow facebookresearch/DiT exactly (``x_embedder.proj``, ``t_embedder.mlp``,
``attn.qkv`` ...), so original checkpoints load with ``strict=True``.

Conditioning may be per sample (teacher: ``c`` of shape (B, D)) or per block of tokens (student:
``c`` of shape (B, K, D) for a sequence of K blocks of N tokens). Block-wise adaLN is computed once
per block and broadcast over its N tokens, never once per token.

Glossary: B batch, K blocks (trajectory states), N tokens per block, L = K*N, D width, H heads.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ardistill.models.attention import attend


class LayerKVCache(Protocol):
    """What an attention layer needs from a cache: store the new keys/values, get what to attend."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x (B, L, D), shift/scale (B, K, D) with L = K * N."""
    B, L, D = x.shape
    K = shift.shape[1]
    x = x.view(B, K, L // K, D)
    return (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(B, L, D)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-block gate; x (B, L, D), g (B, K, D)."""
    B, L, D = x.shape
    K = g.shape[1]
    return (x.view(B, K, L // K, D) * g.unsqueeze(2)).view(B, L, D)


def as_blocks(c: torch.Tensor) -> torch.Tensor:
    """Conditioning (B, D) -> (B, 1, D); (B, K, D) is returned as is."""
    return c.unsqueeze(1) if c.dim() == 2 else c


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, N, D) with a strided conv (timm PatchEmbed names: ``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors, with DiT's sinusoid (frequencies exp(-ln(10000) * i / half))."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """Sinusoidal embedding of any-shaped t -> (*t.shape, dim); [cos, sin] order as in DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; the last row is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability dropout_prob (training) or where forced."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention.

    ``attn_mask``: optional boolean (L, L) mask, True = may attend, or a FlexAttention BlockMask
    (models/attention.py: the block-sparse history kernel). ``kv_cache``: optional per-layer
    cache; the layer hands it this call's keys/values and attends to what it returns (earlier
    visible blocks + this call's tokens), which is how the KV-cached sampler runs one block at a time.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        x = attend(q, k, v, attn_mask)  # F.scaled_dot_product_attention, or flex_attention for a BlockMask
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm Mlp names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; conditioning per sample (B, D) or per block (B, K, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(as_blocks(c))  # (B, K, 6D): once per block, not per token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate(self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, kv_cache), gate_msa)
        x = x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


class FinalLayer(nn.Module):
    """adaLN + linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(as_blocks(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim), as in DiT/MAE."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int,
               grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Tokens (B, h*w, p*p*C) -> images (B, C, h*p, w*p), DiT's (and diffusers') layout; a square grid by default."""
    p, c = patch_size, channels
    if grid_size is None:
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a square grid"
    else:
        h, w = grid_size
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)
