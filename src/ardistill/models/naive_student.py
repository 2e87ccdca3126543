"""Reference ARD student written the way the public code does it; for benchmarks and tests only.

Same function and parameter names as ``ARDStudent`` (``naive.load_state_dict(student.state_dict())``),
computed the straightforward way:
- the time embedding and every adaLN modulation are computed per token (B, S*N, D), not per block;
- every layer attends over the whole S*N-token sequence with an additive (0 / -inf) mask: the
  history mask in the lower ``history_layers`` layers, the block-diagonal mask M1 above them.
``bench/bench_train_step.py`` measures what ``ARDStudent`` gains over this; the tests check that
both compute the same predictions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ardistill.models.layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, unpatchify
from ardistill.models.masks import token_mask
from ardistill.models.student import StudentConfig


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = may attend) -> additive float mask (0 or -inf)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class NaiveBlock(DiTBlock):
    """DiT's block (same parameters) with per-token adaLN: ``c`` is (B, L, D), one conditioning vector per token."""

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, attn_mask)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class NaiveARDStudent(nn.Module):
    """Teacher-forced ARD student, public-code style (per-token adaLN, full-sequence masked attention)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        tc = cfg.teacher
        D = tc.hidden_size
        self.patch_size, self.in_channels = tc.patch_size, tc.in_channels
        self.x_embedder = PatchEmbed(tc.patch_size, tc.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(tc.num_classes, D, tc.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, tc.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList([NaiveBlock(D, tc.num_heads, tc.mlp_ratio) for _ in range(tc.depth)])
        num_heads = cfg.num_steps if cfg.heads == "per_step" else 1
        # DiT's FinalLayer with per-token conditioning c (B, L, D): L blocks of one token each
        self.heads = nn.ModuleList([FinalLayer(D, tc.patch_size, tc.in_channels) for _ in range(num_heads)])
        self.register_buffer("block_times", torch.tensor(cfg.block_times, dtype=torch.float32), persistent=False)
        coeffs = cfg.step_coeffs or ((1.0, 1.0),) * cfg.num_steps
        self.register_buffer("step_coeffs", torch.tensor(coeffs, dtype=torch.float32), persistent=False)
        grid = int(tc.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inputs (B, K, C, H, W) -> predictions (B, K, C, H, W), like ``ARDStudent.forward``."""
        B, K = x.shape[:2]
        h = self.x_embedder(x.flatten(0, 1)) + self.pos_embed  # (B*K, N, D)
        N, D = h.shape[1:]
        L = K * N
        h = h.reshape(B, L, D)
        t_tok = self.block_times[:K].repeat_interleave(N).expand(B, L)  # token-wise times (B, L)
        c = self.t_embedder(t_tok) + self.y_embedder(y, train=False).unsqueeze(1)  # (B, L, D), per token
        history = self.cfg.mask if self.cfg.uses_history else "M1"
        masks = {kind: additive_mask(token_mask(kind, K, N)).to(h.device, h.dtype) for kind in {history, "M1"}}
        for i, block in enumerate(self.blocks):
            h = block(h, c, masks[history if i < self.cfg.history_layers else "M1"])
        outs = []
        for k in range(K):  # block k's tokens through its head (one head per step, or the shared one)
            head = self.heads[k if len(self.heads) > 1 else 0]
            tok = slice(k * N, (k + 1) * N)
            img = unpatchify(head(h[:, tok], c[:, tok]), self.patch_size, self.in_channels)
            if self.cfg.output == "ode_step":
                img = self.step_coeffs[k, 0] * x[:, k] + self.step_coeffs[k, 1] * img
            outs.append(img)
        return torch.stack(outs, dim=1)
