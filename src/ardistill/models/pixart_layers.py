"""The PixArt-alpha / PixArt-Sigma layers (arXiv 2310.00426), named as diffusers' PixArtTransformer2DModel.

The text conditioning of the one DiT backbone (models/conditioning.py: ``TextConditioning``) is built
from these; the class conditioning uses DiT's layers (models/layers.py). PixArt is DiT's shape plus:
- adaLN-single: one shared time MLP (``adaln_single``) maps t to 6D modulation values once; each
  block adds its own learned ``scale_shift_table`` (6, D) instead of carrying a 6D x D adaLN linear.
- cross-attention (``attn2``) after self-attention, from the image tokens to the projected text
  tokens, with the text's padding mask; it has no norm and no gate (as in PixArt).
- a caption projection (``caption_projection``: linear, tanh-GELU, linear) from the text encoder's
  width C to D.

Block-level API: ``block.text_kv(text, mask)`` projects the text keys/values once per sample;
``block(x, t_mod, kv, attn_mask=None, kv_cache=None)`` runs one block on (B, L, D) tokens with
per-sample (B, 6D) or per-block (B, K, 6D) modulation; ``final_layer(h, t_emb, table, proj_out,
norm)`` is PixArt's output layer, also per block.

Glossary: B batch, K trajectory blocks, N image tokens per block, L = K*N, T text tokens,
C text-encoder width, D width, H heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ardistill.models.attention import attend
from ardistill.models.layers import LayerKVCache, TimestepEmbedder, as_blocks, gate, modulate


# ---- embedders --------------------------------------------------------------------------------------
def pixart_pos_embed(embed_dim: int, grid_size: tuple[int, int], base_size: int,
                     interpolation_scale: float = 1.0) -> torch.Tensor:
    """PixArt's 2-D sin-cos position embedding (h*w, D), diffusers' get_2d_sincos_pos_embed numerics.

    Token order is row-major over (h, w); the first D/2 channels encode the column, the rest the row
    (DiT's "w goes first" order). Positions are scaled to the base grid, so aspect ratios share a range.
    """
    gh, gw = grid_size
    pos_h = torch.arange(gh, dtype=torch.float32) / (gh / base_size) / interpolation_scale
    pos_w = torch.arange(gw, dtype=torch.float32) / (gw / base_size) / interpolation_scale
    grid_w, grid_h = torch.meshgrid(pos_w, pos_h, indexing="xy")  # each (gh, gw)
    emb = torch.cat([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], dim=1)
    return emb.float()


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens + fixed positions (B, N, D); diffusers' names (``proj``, buffer ``pos_embed``)."""

    def __init__(self, cfg: "TextDiTConfig"):
        super().__init__()
        D = cfg.hidden_size
        self.proj = nn.Conv2d(cfg.in_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)
        pos = pixart_pos_embed(D, cfg.grid_size, cfg.sample_size // cfg.patch_size, cfg.pos_interpolation_scale)
        # Not persistent: it is a function of the config, and diffusers' state dicts do not carry it.
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)


class _TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding names)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _CombinedTimestepEmbedder(nn.Module):
    """t -> 256-d sinusoid ([cos, sin], DiT's frequencies) -> MLP; the ``emb`` of diffusers' AdaLayerNormSingle."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.timestep_embedder = _TimestepMLP(frequency_embedding_size, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = TimestepEmbedder.timestep_embedding(t, self.frequency_embedding_size)
        return self.timestep_embedder(t_freq.to(self.timestep_embedder.linear_1.weight.dtype))


class AdaLNSingle(nn.Module):
    """adaLN-single: one shared time MLP; t (any shape) -> (t_mod (*t.shape, 6D), t_emb (*t.shape, D)).

    With ``resolution`` (PixArt-alpha 1024's micro-conditions) the embedded pixel size (H, W) and aspect
    ratio H / W, D/3 channels each, are added to t_emb before the shared linear, as in PixArtMS.
    """

    def __init__(self, dim: int, resolution: tuple[int, int] | None = None):
        super().__init__()
        self.emb = _CombinedTimestepEmbedder(dim)
        self.resolution = resolution  # default micro-condition (pixels); None = no micro-conditions
        if resolution is not None:
            self.emb.resolution_embedder = _TimestepMLP(self.emb.frequency_embedding_size, dim // 3)
            self.emb.aspect_ratio_embedder = _TimestepMLP(self.emb.frequency_embedding_size, dim // 3)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim, bias=True)

    def size_embedding(self, resolution: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        """Micro-conditions: resolution (B, 2) pixels, aspect_ratio (B, 1) -> (B, D) added to the time embedding."""
        B, f = resolution.shape[0], self.emb.frequency_embedding_size
        dtype = self.linear.weight.dtype
        res = TimestepEmbedder.timestep_embedding(resolution.reshape(-1), f).to(dtype)
        ar = TimestepEmbedder.timestep_embedding(aspect_ratio.reshape(-1), f).to(dtype)
        return torch.cat([self.emb.resolution_embedder(res).reshape(B, -1),
                          self.emb.aspect_ratio_embedder(ar).reshape(B, -1)], dim=1)

    def forward(self, t: torch.Tensor, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``resolution`` (B, 2) and ``aspect_ratio`` (B, 1) override the default micro-condition (t then (B,))."""
        t_emb = self.emb(t)
        if self.resolution is not None:
            if resolution is None:  # one fixed size: a constant added to every time embedding
                h, w = self.resolution
                resolution = torch.tensor([[float(h), float(w)]], device=t_emb.device)
                aspect_ratio = torch.tensor([[h / w]], device=t_emb.device)
            elif aspect_ratio is None:
                raise ValueError("micro-conditions: give aspect_ratio (B, 1) with resolution (B, 2)")
            t_emb = t_emb + self.size_embedding(resolution.to(t_emb.device), aspect_ratio.to(t_emb.device))
        elif resolution is not None or aspect_ratio is not None:
            raise ValueError("this model has no micro-conditions (use_additional_conditions is False)")
        return self.linear(self.silu(t_emb)), t_emb


class CaptionProjection(nn.Module):
    """Text tokens (B, T, C) -> (B, T, D): linear_1, tanh-GELU, linear_2 (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim, bias=True)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim, bias=True)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(text)))


# ---- attention --------------------------------------------------------------------------------------
class TextKV(NamedTuple):
    """One block's cross-attention keys/values of the text, computed once per sample.

    k, v: (B, H, T, hd); mask: (B, 1, 1, T) bool, True = a real token (padding is never attended).
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (diffusers' ``to_q/to_k/to_v/to_out.0``)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kv_dim = kv_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_k = nn.Linear(kv_dim, dim, bias=True)
        self.to_v = nn.Linear(kv_dim, dim, bias=True)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=True))  # index 0, as in diffusers' ModuleList

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = x.shape
        return self.to_out(x.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """Self-attention; ``attn_mask`` (L, L) bool (True = may attend) or a FlexAttention BlockMask.

        ``kv_cache`` as in layers.Attention.
        """
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        return self._out(attend(q, k, v, attn_mask))

    def kv(self, context: torch.Tensor, mask: torch.Tensor) -> TextKV:
        """Project the context (B, T, D) once: keys/values per head and its padding mask (B, T) bool."""
        if mask.dtype != torch.bool or mask.shape != context.shape[:2]:
            raise ValueError(f"text mask must be bool of shape {tuple(context.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return TextKV(self._heads(self.to_k(context)), self._heads(self.to_v(context)), mask[:, None, None, :])

    def cross(self, x: torch.Tensor, kv: TextKV) -> torch.Tensor:
        """Cross-attention of image tokens (B', L, D) to the text; B' may be a multiple m of the text batch B.

        With B' = m * B (the student's per-block layout (B*K, N, D), sample-major), the m rows of a
        sample are read as one sequence of m*L queries: every query attends to its own sample's text.
        """
        B = kv.k.shape[0]
        Bq, L, D = x.shape
        if Bq % B:
            raise ValueError(f"cross-attention: {Bq} query rows for a text batch of {B}")
        xs = x.reshape(B, (Bq // B) * L, D)
        out = F.scaled_dot_product_attention(self._heads(self.to_q(xs)), kv.k, kv.v, attn_mask=kv.mask)
        return self._out(out).reshape(Bq, L, D)


class _GELUProj(nn.Module):
    """Linear then tanh-GELU (diffusers' GELU(approximate="tanh") module: ``proj``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0`` (linear + tanh-GELU), ``net.1`` (dropout slot, identity here), ``net.2`` linear: diffusers' names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim, bias=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ---- block and output layer -------------------------------------------------------------------------
class TextDiTBlock(nn.Module):
    """PixArt block: adaLN-single self-attention, cross-attention to the text, adaLN-single MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(hidden_size, num_heads)
        self.attn2 = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> TextKV:
        """This block's keys/values of the projected text (B, T, D): compute once per sample, reuse every step."""
        return self.attn2.kv(text, text_mask)

    def forward(self, x: torch.Tensor, t_mod: torch.Tensor, text_kv: TextKV,
                attn_mask: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """x (B', L, D); t_mod (B', 6D) per sample or (B', K, 6D) per block of L/K tokens; text_kv of batch B | B'."""
        t_mod = as_blocks(t_mod)
        B, K = t_mod.shape[:2]
        mod = self.scale_shift_table + t_mod.view(B, K, 6, -1)  # (B, K, 6, D): once per block, not per token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(2)
        x = x + gate(self.attn1(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, kv_cache), gate_msa)
        x = x + self.attn2.cross(x, text_kv)  # PixArt: no norm, no gate before cross-attention
        x = x + gate(self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


def final_layer(h: torch.Tensor, t_emb: torch.Tensor, scale_shift_table: torch.Tensor, proj_out: nn.Linear,
                norm: nn.LayerNorm) -> torch.Tensor:
    """PixArt's output: LayerNorm, shift/scale = table (2, D) + t_emb (no SiLU), linear to patch pixels.

    h (B, L, D); t_emb (B, D) per sample or (B, K, D) per block -> (B, L, p*p*C_out).
    """
    shift, scale = (scale_shift_table + as_blocks(t_emb).unsqueeze(2)).unbind(2)  # each (B, K, D)
    return proj_out(modulate(norm(h), shift, scale))


def adaln_single_for(cfg: "TextDiTConfig") -> AdaLNSingle:
    """The adaLN-single module of a config (with its micro-condition embedders when it has them)."""
    return AdaLNSingle(cfg.hidden_size, cfg.micro_resolution if cfg.use_additional_conditions else None)


def pad_text(text: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, T, C) tokens and (B, T) mask with zeros / False up to ``length`` tokens (>= T)."""
    T = text.shape[1]
    if length < T:
        raise ValueError(f"cannot pad {T} text tokens to {length}")
    if length == T:
        return text, mask
    return F.pad(text, (0, 0, 0, length - T)), F.pad(mask, (0, length - T), value=False)


# Sizes: PixArt's XL/2 (the public text-to-image teachers; issue 15 loads them), a tiny test size, and the
