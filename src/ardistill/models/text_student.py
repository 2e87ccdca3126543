"""The ARD student of a text-conditioned (PixArt-form) teacher: one DiT over the few-step trajectory, reading the text.

Everything of models/student.py carries over: the S input states (block 0 = the initial noise) are
patch-embedded with the teacher's embedder and concatenated into S*N tokens; every block carries its
own time through adaLN-single (``adaln_single(tau_k)`` once per block, plus each layer's learned
table); the lower ``history_layers`` self-attention layers use the block mask (M4 by default), the
layers above see only their own block. What is new is the text:

- the caption is projected (``caption_projection``) and every layer's cross-attention keys/values of
  it are computed **once per sample** (``TextDiT.text_kvs``), then shared by all S trajectory blocks
  in the teacher-forced pass and by all S steps of cached sampling;
- every block's image tokens cross-attend to the same text (history never enters cross-attention, and
  the text never enters the self-attention history cache), with the text's padding mask, so a caption
  padded to another length gives the same output.

Glossary: S num_steps (blocks), N image tokens per block, D width, N_h history_layers, T text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ardistill.models.attention import HistoryAttention, default_backend, needs_grad
from ardistill.models.kv_cache import KVCache
from ardistill.models.student import StudentConfig
from ardistill.models.text_dit import (CaptionProjection, PatchEmbed, TextDiT, TextDiTBlock,
                                       TextDiTConfig, TextKV, adaln_single_for, final_layer, unpatchify)


@dataclass(frozen=True, eq=True)
class TextStudentConfig(StudentConfig):
    """StudentConfig whose teacher is a TextDiTConfig; saved inside every checkpoint."""

    teacher: TextDiTConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if isinstance(self.teacher, dict):
            object.__setattr__(self, "teacher", TextDiTConfig.from_dict(self.teacher))
        if not isinstance(self.teacher, TextDiTConfig):
            raise ValueError(f"TextStudentConfig: teacher must be a TextDiTConfig, got {type(self.teacher).__name__}")
        super().__post_init__()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["teacher"] = self.teacher.to_dict()
        return d


class TextHead(nn.Module):
    """PixArt's output layer as a student head: ``scale_shift_table`` (2, D) + t_emb, then ``proj_out``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)


class TextARDStudent(HistoryAttention, nn.Module):
    """Few-step text-to-image student that reads its own trajectory history; names follow diffusers' PixArt.

    ``attention`` ("sdpa" | "flex" | "auto") picks the history layers' kernel, as in ARDStudent.
    """

    def __init__(self, cfg: TextStudentConfig):
        super().__init__()
        self.cfg = cfg
        tc = cfg.teacher
        D = tc.hidden_size
        self.in_channels = tc.in_channels
        self.pos_embed = PatchEmbed(tc)
        self.adaln_single = adaln_single_for(tc)
        self.caption_projection = CaptionProjection(tc.caption_channels, D)
        self.transformer_blocks = nn.ModuleList([TextDiTBlock(D, tc.num_heads, tc.mlp_ratio) for _ in range(tc.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        n_heads = cfg.num_steps if cfg.heads == "per_step" else 1
        self.heads = nn.ModuleList([TextHead(D, tc.patch_size, tc.in_channels) for _ in range(n_heads)])
        self.register_buffer("block_times", torch.tensor(cfg.block_times, dtype=torch.float32), persistent=False)
        coeffs = cfg.step_coeffs or ((1.0, 1.0),) * cfg.num_steps
        self.register_buffer("step_coeffs", torch.tensor(coeffs, dtype=torch.float32), persistent=False)
        self._mask_cache: dict[tuple, object] = {}  # (kernel, K, N, device) -> dense mask or BlockMask
        self.attention = default_backend()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: TextDiT, cfg: TextStudentConfig) -> "TextARDStudent":
        """A student whose every weight starts from the teacher's (heads from its output layer)."""
        if teacher.cfg != cfg.teacher:
            raise ValueError(f"teacher config {teacher.cfg} differs from the student's teacher config {cfg.teacher}")
        student = cls(cfg)
        sd = teacher.state_dict()
        own = {k: v for k, v in sd.items() if k != "scale_shift_table" and not k.startswith("proj_out.")}
        missing, unexpected = student.load_state_dict(own, strict=False)
        if unexpected or not all(k.startswith("heads.") for k in missing):
            raise ValueError(f"teacher and student names differ: unexpected {unexpected[:5]}, missing {missing[:5]}")
        head = _head_from_output(sd, cfg.teacher)
        for h in student.heads:
            h.load_state_dict(head)
        return student

    # ---- pieces ---------------------------------------------------------------------------------
    def text_kvs(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV]:
        """Every layer's cross-attention keys/values of the caption: once per sample, as TextDiT.text_kvs."""
        C = self.cfg.teacher.caption_channels
        if text.dim() != 3 or text.shape[-1] != C:
            raise ValueError(f"text must be (B, T, {C}), got {tuple(text.shape)}")
        if not bool(text_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token (the empty prompt encodes to one)")
        ctx = self.caption_projection(text)  # (B, T, D)
        return [block.text_kv(ctx, text_mask) for block in self.transformer_blocks]

    def _condition(self, B: int, blocks: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block adaLN-single inputs (B, K, 6D) and t_emb (B, K, D): computed once per block, not per token."""
        t_mod, t_emb = self.adaln_single(self.block_times[blocks])  # (K, 6D), (K, D)
        return t_mod.unsqueeze(0).expand(B, -1, -1), t_emb.unsqueeze(0).expand(B, -1, -1)

    def _head(self, h: torch.Tensor, t_emb: torch.Tensor, first_block: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, K*N, D) -> predictions (B, K, C, H, W); ``x`` (B, K, C, H, W) feeds the "ode_step" output."""
        B, K = t_emb.shape[:2]
        tc = self.cfg.teacher
        if len(self.heads) == 1:
            hd = self.heads[0]
            out = final_layer(h, t_emb, hd.scale_shift_table, hd.proj_out, self.norm_out)
        else:
            N = h.shape[1] // K
            hb = h.view(B, K, N, -1)
            out = torch.cat([final_layer(hb[:, k], t_emb[:, k:k + 1], self.heads[first_block + k].scale_shift_table,
                                         self.heads[first_block + k].proj_out, self.norm_out) for k in range(K)], dim=1)
        img = unpatchify(out.reshape(B * K, out.shape[1] // K, -1), tc.grid_size, tc.patch_size, tc.in_channels)
        img = img.view(B, K, *img.shape[1:])
        if self.cfg.output == "ode_step":
            ab = self.step_coeffs[first_block:first_block + K].to(img.dtype)  # (K, 2)
            img = ab[:, 0].view(1, K, 1, 1, 1) * x + ab[:, 1].view(1, K, 1, 1, 1) * img
        return img

    def _run_block(self, block: TextDiTBlock, *args, **kw) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kw)
        return block(*args, **kw)

    # ---- teacher-forced forward -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: inputs (B, K, C, H, W), caption tokens (B, T, C_text) and mask (B, T) -> states 1..K."""
        B, K = x.shape[:2]
        if K > self.cfg.num_steps:
            raise ValueError(f"got {K} blocks, the student has num_steps = {self.cfg.num_steps}")
        kvs = self.text_kvs(text, text_mask)  # once per sample, shared by all K blocks
        h = self.pos_embed(x.flatten(0, 1))  # (B*K, N, D)
        N, D = h.shape[1:]
        t_mod, t_emb = self._condition(B, slice(0, K))  # (B, K, 6D), (B, K, D)
        t_mod_flat = t_mod.reshape(B * K, -1)
        history = self.cfg.uses_history and K > 1
        if history:  # dense bool mask (SDPA) or BlockMask (FlexAttention), see models/attention.py
            mask = self._history_mask(K, N, h, self.cfg.teacher.num_heads, needs_grad(h, self.transformer_blocks[0]))
        for i, (block, kv) in enumerate(zip(self.transformer_blocks, kvs)):
            if history and i < self.cfg.history_layers:
                h = self._run_block(block, h.reshape(B, K * N, D), t_mod, kv, attn_mask=mask).view(B * K, N, D)
            else:  # own block only: self-attention per block; cross-attention reads the sample's text
                h = self._run_block(block, h, t_mod_flat, kv)
        return self._head(h.reshape(B, K * N, D), t_emb, 0, x)

    # ---- KV-cached autoregressive sampling ------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, return_all: bool = False,
               history: bool = True):
        """Few-step sampling: step s runs one block; the lower history_layers read the KV cache of earlier blocks.

        The text keys/values are computed once, before the first step. Returns the final state
        (B, C, H, W), or with ``return_all`` all S predictions (B, S, C, H, W); ``history=False`` is
        the history-cut ablation (same weights, every block sees only itself).
        """
        S, Nh = self.cfg.num_steps, (self.cfg.history_layers if self.cfg.uses_history and history else 0)
        kvs = self.text_kvs(text, text_mask)
        cache = KVCache(Nh, self.cfg.mask)
        x, outs = noise, []
        for s in range(S):
            h = self.pos_embed(x)  # (B, N, D)
            t_mod, t_emb = self._condition(x.shape[0], slice(s, s + 1))  # (B, 1, 6D), (B, 1, D)
            for i, (block, kv) in enumerate(zip(self.transformer_blocks, kvs)):
                h = block(h, t_mod, kv, kv_cache=cache.layer(i) if i < Nh else None)
            if Nh:
                cache.advance()
            x = self._head(h, t_emb, s, x.unsqueeze(1))[:, 0]
            outs.append(x)
        return torch.stack(outs, dim=1) if return_all else x


def _head_from_output(sd: dict, tc: TextDiTConfig) -> dict:
    """Teacher output layer -> a student head predicting in_channels (drops learned-sigma outputs)."""
    w, b = sd["proj_out.weight"], sd["proj_out.bias"]
    if tc.learn_sigma:
        p, C, D = tc.patch_size, tc.in_channels, tc.hidden_size
        w = w.view(p * p, 2 * C, D)[:, :C].reshape(p * p * C, D)
        b = b.view(p * p, 2 * C)[:, :C].reshape(p * p * C)
    return {"scale_shift_table": sd["scale_shift_table"].clone(), "proj_out.weight": w.clone(), "proj_out.bias": b.clone()}


def build_text_student(teacher: TextDiT, **kw) -> TextARDStudent:
    """Convenience: TextStudentConfig(teacher=teacher.cfg, **kw) initialised from the teacher."""
    return TextARDStudent.from_teacher(teacher, TextStudentConfig(teacher=teacher.cfg, **kw))
