"""Text-conditioned teacher DiT in the PixArt-alpha / PixArt-Sigma form, named as diffusers' PixArtTransformer2DModel.

Read top to bottom: config, embedders, attention, block, final layer, model, registry. It is DiT's
shape plus three changes (PixArt-alpha, arXiv 2310.00426):
- adaLN-single: one shared time MLP (``adaln_single``) maps t to 6D modulation values once; each
  block adds its own learned ``scale_shift_table`` (6, D) instead of carrying a 6D x D adaLN linear.
- cross-attention (``attn2``) after self-attention, from the image tokens to the projected text
  tokens, with the text's padding mask; it has no norm and no gate (as in PixArt).
- a caption projection (``caption_projection``: linear, tanh-GELU, linear) from the text encoder's
  width C to D.
Guidance uses a null text: the text encoder's encoding of the empty prompt (diffusers' PixArt
pipeline does the same with T5's empty prompt), so the state dict stays one to one with diffusers'.

``TextDiT(cfg)(x, t, text, text_mask)`` returns (B, out_channels, H, W).

Block-level API for the ARD student (models/student.py's pattern): ``TextDiT.time_modulation(t)``
gives (t_mod (..., 6D), t_emb (..., D)) per sample (B, .) or per trajectory block (B, K, .);
``block.text_kv(text, mask)`` projects the text keys/values once per sample; ``block(x, t_mod, kv,
attn_mask=None, kv_cache=None)`` runs one block on (B, L, D) tokens with per-block modulation;
``final_layer(h, t_emb, table, proj_out, norm)`` is PixArt's output layer, also per block.

Glossary: B batch, K trajectory blocks, N image tokens per block, L = K*N, T text tokens,
C text-encoder width, D width, H heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ardistill.models.attention import attend
from ardistill.models.layers import LayerKVCache, TimestepEmbedder, as_blocks, gate, modulate

PREDICTIONS = ("eps", "velocity")


@dataclass(frozen=True)
class TextDiTConfig:
    """Architecture of a text-conditioned DiT (PixArt form); everything needed to rebuild it from a file.

    ``sample_size`` and ``interpolation_scale`` are diffusers' names: the position embedding of an
    (h, w)-token grid uses positions i / (h / base) / scale with base = sample_size // patch_size
    (PixArt's multi-aspect convention); ``interpolation_scale=None`` means max(sample_size // 64, 1).
    """

    input_size: tuple[int, int] = (128, 128)  # (H, W) of the model's input (latent) images
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # diffusers' BasicTransformerBlock always uses 4
    caption_channels: int = 4096  # width C of the text encoder's tokens
    sample_size: int = 128
    interpolation_scale: float | None = None
    learn_sigma: bool = True
    prediction: str = "eps"  # "eps" (VP process) or "velocity" (rectified flow)
    caption_dropout_prob: float = 0.1  # training-time chance of the null text (what makes CFG possible)
    # PixArt-alpha 1024's micro-conditions (diffusers' name): the image's pixel size and aspect ratio are
    # embedded and added to the time embedding. ``resolution`` is the pixel (H, W) a fixed-size model
    # (the teacher of a recording, the student) is conditioned on; None = 8 x input_size (the VAE's factor).
    use_additional_conditions: bool = False
    resolution: tuple[int, int] | None = None

    def __post_init__(self):
        size = self.input_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        if len(self.input_size) != 2:
            raise ValueError(f"TextDiTConfig: input_size must be (H, W), got {self.input_size}")
        for name in ("depth", "in_channels", "patch_size", "caption_channels", "sample_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextDiTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if any(s % self.patch_size for s in self.input_size):
            raise ValueError(f"TextDiTConfig: input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TextDiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"TextDiTConfig: hidden_size {self.hidden_size} must be a multiple of 4 "
                             "(2-D sin-cos embedding)")
        if self.interpolation_scale is not None and self.interpolation_scale <= 0:
            raise ValueError(f"TextDiTConfig: interpolation_scale must be > 0, got {self.interpolation_scale}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"TextDiTConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 <= self.caption_dropout_prob < 1:
            raise ValueError(f"TextDiTConfig: caption_dropout_prob must be in [0, 1), got {self.caption_dropout_prob}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"TextDiTConfig: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.resolution is not None:
            object.__setattr__(self, "resolution", tuple(int(r) for r in self.resolution))
            if len(self.resolution) != 2 or min(self.resolution) < 1:
                raise ValueError(f"TextDiTConfig: resolution must be a pixel (H, W), got {self.resolution}")
        if self.use_additional_conditions and self.hidden_size % 3:
            raise ValueError(f"TextDiTConfig: micro-conditions embed into hidden_size / 3 channels each; "
                             f"hidden_size {self.hidden_size} is not divisible by 3")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def pos_interpolation_scale(self) -> float:
        s = self.interpolation_scale
        return float(max(self.sample_size // 64, 1) if s is None else s)

    @property
    def micro_resolution(self) -> tuple[int, int]:
        """Pixel (H, W) given to the micro-condition embedders by default."""
        return self.resolution or (8 * self.input_size[0], 8 * self.input_size[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        if d["resolution"] is not None:
            d["resolution"] = list(d["resolution"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TextDiTConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TextDiTConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


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

    def __init__(self, cfg: TextDiTConfig):
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


def unpatchify(x: torch.Tensor, grid_size: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Tokens (B, h*w, p*p*C) -> images (B, C, h*p, w*p), the DiT / diffusers layout, rectangular grids too."""
    h, w = grid_size
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


# ---- the model --------------------------------------------------------------------------------------
class TextDiT(nn.Module):
    """Text-conditioned diffusion transformer (PixArt form); state-dict names = diffusers' PixArtTransformer2DModel."""

    def __init__(self, cfg: TextDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.pos_embed = PatchEmbed(cfg)  # diffusers calls the patch embedder ``pos_embed``
        self.transformer_blocks = nn.ModuleList(
            [TextDiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.proj_out = nn.Linear(D, cfg.patch_size * cfg.patch_size * cfg.out_channels)
        self.adaln_single = adaln_single_for(cfg)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's initialisation: xavier linears, N(0, 0.02) time and caption MLPs, zeroed output
        projections of cross-attention and of the final layer, so a fresh model predicts zero."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        w = self.pos_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.pos_embed.proj.bias, 0)
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.normal_(self.adaln_single.linear.weight, std=0.02)
        if self.cfg.use_additional_conditions:
            for mlp in (self.adaln_single.emb.resolution_embedder, self.adaln_single.emb.aspect_ratio_embedder):
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_2.weight, std=0.02)
        D = self.cfg.hidden_size
        for block in self.transformer_blocks:
            nn.init.constant_(block.attn2.to_out[0].weight, 0)
            nn.init.constant_(block.attn2.to_out[0].bias, 0)
            block.scale_shift_table.data.normal_().div_(D**0.5)
        self.scale_shift_table.data.normal_().div_(D**0.5)
        nn.init.constant_(self.proj_out.weight, 0)
        nn.init.constant_(self.proj_out.bias, 0)

    # ---- pieces the student reuses --------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embedding (B, N, D)."""
        return self.pos_embed(x)

    def time_modulation(self, t: torch.Tensor, resolution: torch.Tensor | None = None,
                        aspect_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (any shape) -> (t_mod (*t.shape, 6D) for the blocks, t_emb (*t.shape, D) for the output)."""
        return self.adaln_single(t, resolution, aspect_ratio)

    def text_kvs(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV]:
        """Encoder tokens (B, T, C) and mask (B, T) -> every block's text keys/values (once per sample)."""
        if text.dim() != 3 or text.shape[-1] != self.cfg.caption_channels:
            raise ValueError(f"text must be (B, T, {self.cfg.caption_channels}), got {tuple(text.shape)}")
        if not bool(text_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token (the empty prompt encodes to one)")
        ctx = self.caption_projection(text)  # (B, T, D)
        return [block.text_kv(ctx, text_mask) for block in self.transformer_blocks]

    def output(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Final layer: tokens (B, L, D) -> (B, L, p*p*out_channels)."""
        return final_layer(h, t_emb, self.scale_shift_table, self.proj_out, self.norm_out)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, text (B, T, C_text), text_mask (B, T) bool -> (B, out_channels, H, W).

        ``resolution`` (B, 2) / ``aspect_ratio`` (B, 1): micro-conditions other than the config's (models that have them).
        """
        if tuple(x.shape[-2:]) != self.cfg.input_size:
            raise ValueError(f"TextDiT was built for {self.cfg.input_size} inputs, got {tuple(x.shape[-2:])}")
        h = self.embed(x)
        t_mod, t_emb = self.time_modulation(t, resolution, aspect_ratio)
        for block, kv in zip(self.transformer_blocks, self.text_kvs(text, text_mask)):
            h = block(h, t_mod, kv)
        h = self.output(h, t_emb)
        return unpatchify(h, self.cfg.grid_size, self.patch_size, self.out_channels)


def adaln_single_for(cfg: TextDiTConfig) -> AdaLNSingle:
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
# embedded benchmark's size (two digits side by side, 8x16 pixels, 32 tokens of patch 2).
TextDiT_models: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, caption_channels=4096,
                        input_size=(128, 128), sample_size=128, in_channels=4, learn_sigma=True),
    "TextDiT-T": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, caption_channels=32,
                      input_size=(8, 16), sample_size=8, in_channels=1, learn_sigma=False),
    "TextDiT-digits": dict(depth=4, hidden_size=96, num_heads=4, patch_size=2, caption_channels=32,
                           input_size=(8, 16), sample_size=8, in_channels=1, learn_sigma=False),
}


def text_dit_config(name: str, **overrides) -> TextDiTConfig:
    """Config of a registered size, with overrides (input_size, caption_channels, ...)."""
    if name not in TextDiT_models:
        raise KeyError(f"unknown text DiT size {name!r}; choose from {sorted(TextDiT_models)}")
    return replace(TextDiTConfig(**TextDiT_models[name]), **overrides)


def build_text_dit(name: str, **overrides) -> TextDiT:
    return TextDiT(text_dit_config(name, **overrides))
