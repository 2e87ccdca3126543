"""How a condition enters the one DiT backbone: the only module a new conditioning type touches.

The backbone (models/dit.py: ``DiT``, the teacher) and the ARD student (models/student.py) are written
once; everything that depends on *what* conditions the model is a ``Conditioning``:

- ``build``: the modules it needs, registered on the model under the checkpoint names of its family
  (DiT's ``x_embedder/t_embedder/y_embedder/blocks/final_layer``; diffusers' PixArt
  ``pos_embed/adaln_single/caption_projection/transformer_blocks/proj_out``), in the order the original
  models create them (construction order = the RNG draws of a seeded init; registration order = the
  parameter order that optimizer states in saved checkpoints are keyed by);
- ``context``: what is computed once per sample (class: the label embedding; text: every layer's
  cross-attention keys/values of the caption, shared by all S trajectory blocks and all S sampling steps);
- ``modulation`` / ``block_modulation``: the adaLN inputs of the layers and of the output layer, per
  sample (teacher) or once per trajectory block (student: token-wise time);
- ``block_args``: what a layer takes besides the tokens; ``output``/``make_head``/``head_state``: the
  teacher's output layer and the student's heads initialised from it.

Two conditionings exist: ``ClassConditioning`` (class labels, adaLN-Zero, as DiT) and
``TextConditioning`` (captions by cross-attention with PixArt's adaLN-single). A new one (a second
text encoder, a pooled embedding added to the time) is one more class here, chosen by its config's
``conditioning`` name in ``CONDITIONINGS``.

Glossary: B batch, K trajectory blocks, N tokens per block, D width, T text tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ardistill.models.layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder,
                                     get_2d_sincos_pos_embed)
from ardistill.models.pixart_layers import CaptionProjection, TextDiTBlock, TextKV, adaln_single_for, final_layer
from ardistill.models.pixart_layers import PatchEmbed as PixArtPatchEmbed


def _xavier_linears(model: nn.Module) -> None:
    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
    model.apply(_basic_init)


def _xavier_conv(conv: nn.Conv2d) -> None:
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.constant_(conv.bias, 0)


def _drop_sigma(w: torch.Tensor, b: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """An output projection (p*p*2C, D) with learned sigma -> (p*p*C, D): the student predicts no variance."""
    if not cfg.learn_sigma:
        return w, b
    p, C, D = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    return (w.view(p * p, 2 * C, D)[:, :C].reshape(p * p * C, D), b.view(p * p, 2 * C)[:, :C].reshape(p * p * C))


class ClassConditioning:
    """Class labels by adaLN-Zero (DiT): c = t_emb(t) + y_emb(y); each layer maps c to its 6D modulation.

    The label table's last row is the null class of classifier-free guidance (dropped with
    ``class_dropout_prob`` in training). ``model(x, t, y)``, ``student(x, y)``, ``student.sample(noise, y)``.
    """

    name = "class"

    def build(self, model: nn.Module, cfg, teacher: bool) -> None:
        D = cfg.hidden_size
        model.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        model.t_embedder = TimestepEmbedder(D)
        # Same table shape in the student (null row included) so weights copy; never dropped there.
        model.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed sin-cos embedding; a frozen Parameter (not a buffer) so the state-dict key matches DiT.
        model.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, D), requires_grad=False)
        model.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        if teacher:
            model.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        else:  # the student's heads come from the teacher's final layer; only the positions are set here
            self._set_pos_embed(model, cfg)

    @staticmethod
    def _set_pos_embed(model: nn.Module, cfg) -> None:
        grid = int(cfg.num_patches ** 0.5)
        model.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0))

    def initialize(self, model: nn.Module, cfg) -> None:
        """DiT's initialisation: xavier linears, fixed pos-embed, adaLN-Zero (zeroed modulation and output)."""
        _xavier_linears(model)
        self._set_pos_embed(model, cfg)
        _xavier_conv(model.x_embedder.proj)
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
        for block in model.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.x_embedder(x) + model.pos_embed

    def context(self, model: nn.Module, cond: tuple, train: bool, **extra) -> torch.Tensor:
        """The label embedding (B, D); labels are dropped to the null class in training (CFG)."""
        if extra:
            raise ValueError(f"class conditioning takes no {sorted(extra)}")
        (y,) = cond
        return model.y_embedder(y, train)

    def modulation(self, model: nn.Module, t: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B,) or per-block (B, K) -> c for the layers and for the output layer (the same here)."""
        t_emb = model.t_embedder(t)
        y_emb = ctx.unsqueeze(1) if t_emb.dim() == 3 else ctx
        c = t_emb + y_emb
        return c, c

    def block_modulation(self, model: nn.Module, times: torch.Tensor, ctx: torch.Tensor, batch: int):
        """The student's per-block conditioning: block times (K,) -> c (B, K, D), once per block, not per token."""
        c = model.t_embedder(times).unsqueeze(0) + ctx.unsqueeze(1)
        return c, c

    def block_args(self, c: torch.Tensor, ctx: torch.Tensor, layer: int) -> tuple:
        return (c,)

    def output(self, model: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model.final_layer(h, c)

    # ---- the student's heads ----------------------------------------------------------------------------
    def make_head(self, cfg) -> nn.Module:
        return FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.in_channels)

    def is_output_key(self, key: str) -> bool:
        return key.startswith("final_layer.")

    def head_state(self, teacher_state: dict, cfg) -> dict:
        """The teacher's final layer as a head predicting in_channels (learned-sigma outputs dropped)."""
        sd = {k[len("final_layer."):]: v for k, v in teacher_state.items() if k.startswith("final_layer.")}
        sd["linear.weight"], sd["linear.bias"] = (t.clone() for t in _drop_sigma(sd["linear.weight"], sd["linear.bias"], cfg))
        return sd


class TextContext(NamedTuple):
    """What a caption gives every step: each layer's cross-attention keys/values, and micro-conditions if any."""

    kvs: list[TextKV]
    resolution: torch.Tensor | None = None
    aspect_ratio: torch.Tensor | None = None


class TextHead(nn.Module):
    """PixArt's output layer as a student head: ``scale_shift_table`` (2, D) + t_emb, then ``proj_out``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # no parameters

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return final_layer(h, t_emb, self.scale_shift_table, self.proj_out, self.norm)


class TextConditioning:
    """Captions by cross-attention, time by PixArt's adaLN-single; diffusers' PixArtTransformer2DModel names.

    ``model(x, t, text, text_mask)`` with encoder tokens (B, T, C) and their padding mask (B, T) bool;
    ``resolution``/``aspect_ratio`` keywords give other micro-conditions (models that have them).
    """

    name = "text"

    def build(self, model: nn.Module, cfg, teacher: bool) -> None:
        D = cfg.hidden_size
        model.pos_embed = PixArtPatchEmbed(cfg)  # diffusers calls the patch embedder ``pos_embed``
        if teacher:  # diffusers' order
            model.transformer_blocks = self._blocks(cfg)
            model.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            model.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
            model.proj_out = nn.Linear(D, cfg.patch_size * cfg.patch_size * cfg.out_channels)
            model.adaln_single = adaln_single_for(cfg)
            model.caption_projection = CaptionProjection(cfg.caption_channels, D)
        else:  # the student's order (its saved checkpoints' parameter order)
            model.adaln_single = adaln_single_for(cfg)
            model.caption_projection = CaptionProjection(cfg.caption_channels, D)
            model.transformer_blocks = self._blocks(cfg)

    @staticmethod
    def _blocks(cfg) -> nn.ModuleList:
        return nn.ModuleList([TextDiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])

    def initialize(self, model: nn.Module, cfg) -> None:
        """PixArt's initialisation: xavier linears, N(0, 0.02) time and caption MLPs, zeroed output
        projections of cross-attention and of the final layer, so a fresh model predicts zero."""
        _xavier_linears(model)
        _xavier_conv(model.pos_embed.proj)
        emb = model.adaln_single.emb
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.normal_(model.adaln_single.linear.weight, std=0.02)
        if cfg.use_additional_conditions:
            for mlp in (emb.resolution_embedder, emb.aspect_ratio_embedder):
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        nn.init.normal_(model.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(model.caption_projection.linear_2.weight, std=0.02)
        D = cfg.hidden_size
        for block in model.transformer_blocks:
            nn.init.constant_(block.attn2.to_out[0].weight, 0)
            nn.init.constant_(block.attn2.to_out[0].bias, 0)
            block.scale_shift_table.data.normal_().div_(D**0.5)
        model.scale_shift_table.data.normal_().div_(D**0.5)
        nn.init.constant_(model.proj_out.weight, 0)
        nn.init.constant_(model.proj_out.bias, 0)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer_blocks

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.pos_embed(x)

    def context(self, model: nn.Module, cond: tuple, train: bool, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None) -> TextContext:
        """Every layer's keys/values of the caption, computed once per sample (text (B, T, C), mask (B, T)).

        ``cond`` is (text, text_mask) or, as PixArt's forward takes them, (text, text_mask, resolution[, aspect_ratio]).
        """
        if not 2 <= len(cond) <= 4 or (len(cond) > 2 and (resolution is not None or aspect_ratio is not None)):
            raise ValueError("text conditioning takes (text, text_mask) and optionally resolution, aspect_ratio")
        text, text_mask, *micro = cond
        if micro:
            resolution, aspect_ratio = (micro + [None])[:2]
        C = model.arch.caption_channels
        if text.dim() != 3 or text.shape[-1] != C:
            raise ValueError(f"text must be (B, T, {C}), got {tuple(text.shape)}")
        if not bool(text_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token (the empty prompt encodes to one)")
        ctx = model.caption_projection(text)  # (B, T, D)
        return TextContext([block.text_kv(ctx, text_mask) for block in model.transformer_blocks], resolution,
                           aspect_ratio)

    def modulation(self, model: nn.Module, t: torch.Tensor, ctx: TextContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (any shape) -> (t_mod (*t.shape, 6D) for the layers, t_emb (*t.shape, D) for the output)."""
        return model.adaln_single(t, ctx.resolution, ctx.aspect_ratio)

    def block_modulation(self, model: nn.Module, times: torch.Tensor, ctx: TextContext, batch: int):
        """The student's per-block adaLN-single inputs (B, K, 6D) and t_emb (B, K, D), once per block."""
        t_mod, t_emb = model.adaln_single(times)  # (K, 6D), (K, D)
        return t_mod.unsqueeze(0).expand(batch, -1, -1), t_emb.unsqueeze(0).expand(batch, -1, -1)

    def block_args(self, t_mod: torch.Tensor, ctx: TextContext, layer: int) -> tuple:
        return (t_mod, ctx.kvs[layer])

    def output(self, model: nn.Module, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return final_layer(h, t_emb, model.scale_shift_table, model.proj_out, model.norm_out)

    # ---- the student's heads ----------------------------------------------------------------------------
    def make_head(self, cfg) -> nn.Module:
        return TextHead(cfg.hidden_size, cfg.patch_size, cfg.in_channels)

    def is_output_key(self, key: str) -> bool:
        return key == "scale_shift_table" or key.startswith("proj_out.")

    def head_state(self, teacher_state: dict, cfg) -> dict:
        """The teacher's output layer as a head predicting in_channels (learned-sigma outputs dropped)."""
        w, b = _drop_sigma(teacher_state["proj_out.weight"], teacher_state["proj_out.bias"], cfg)
        return {"scale_shift_table": teacher_state["scale_shift_table"].clone(), "proj_out.weight": w.clone(),
                "proj_out.bias": b.clone()}


CONDITIONINGS = {"class": ClassConditioning(), "text": TextConditioning()}


def conditioning_for(cfg) -> ClassConditioning | TextConditioning:
    """The conditioning of a model config (DiTConfig: "class"; TextDiTConfig: "text")."""
    try:
        return CONDITIONINGS[cfg.conditioning]
    except (AttributeError, KeyError):
        raise ValueError(f"{type(cfg).__name__} names no known conditioning; choose from {sorted(CONDITIONINGS)}") from None
