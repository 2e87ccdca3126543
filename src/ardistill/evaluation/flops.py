"""Analytic FLOPs per sample (1 multiply-add = 2 FLOPs) for teacher sampling, step distillation and ARD.

DiT's paper reports "Gflops" that are multiply-adds (DiT-XL/2 at 256 px: 118.6); ``gmacs`` gives
that unit. ARD's extra cost is the attention of the lower ``history_layers`` over cached blocks: for
DiT-XL/2, S = 4, history_layers = 6, mask M4 it is 1.15% of step distillation's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ardistill.models.dit import DiTConfig
from ardistill.models.masks import attended_pairs


def forward_flops(cfg: DiTConfig, out_channels: int | None = None, cond_vectors: int = 1,
                  extra_keys: int = 0) -> int:
    """FLOPs of one forward pass of one sample over its N tokens (keys: N + extra_keys)."""
    D, N, L = cfg.hidden_size, cfg.num_patches, cfg.depth
    p, C = cfg.patch_size, cfg.in_channels
    Co = cfg.out_channels if out_channels is None else out_channels
    hidden = int(D * cfg.mlp_ratio)
    Nk = N + extra_keys
    embed = 2 * N * (C * p * p) * D
    cond = 2 * cond_vectors * (256 * D + D * D)  # timestep MLP (label lookup is free)
    per_layer = (2 * cond_vectors * D * 6 * D  # adaLN, once per condition vector
                 + 2 * N * D * 3 * D  # qkv
                 + 2 * 2 * N * Nk * D  # scores + weighted values
                 + 2 * N * D * D  # proj
                 + 2 * 2 * N * D * hidden)  # mlp
    final = 2 * cond_vectors * D * 2 * D + 2 * N * D * p * p * Co
    return embed + cond + L * per_layer + final


def history_attention_flops(cfg: DiTConfig, num_steps: int, history_layers: int, mask: str = "M4") -> int:
    """Extra FLOPs of attending to cached blocks over a whole S-step sample."""
    N, D = cfg.num_patches, cfg.hidden_size
    return history_layers * attended_pairs(mask, num_steps) * 2 * 2 * N * N * D


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per generated sample."""

    teacher: int
    step_distillation: int
    ard: int

    @property
    def ard_overhead(self) -> float:
        """ARD's extra FLOPs relative to step distillation (0.0115 = 1.15%)."""
        return self.ard / self.step_distillation - 1

    def as_dict(self) -> dict:
        return {"teacher": self.teacher, "step_distillation": self.step_distillation, "ard": self.ard,
                "ard_overhead": self.ard_overhead}


def sampling_flops(cfg: DiTConfig, teacher_steps: int, num_steps: int, history_layers: int,
                   mask: str = "M4", cfg_scale: float = 1.5, teacher_nfe_per_step: int = 1) -> FlopsReport:
    """Per-sample FLOPs: teacher (guided: 2 passes per evaluation), step distillation, ARD (KV cache)."""
    guided = 2 if cfg_scale != 1.0 else 1
    teacher = teacher_steps * teacher_nfe_per_step * guided * forward_flops(cfg)
    student_step = forward_flops(cfg, out_channels=cfg.in_channels)
    sd = num_steps * student_step
    ard = sd + history_attention_flops(cfg, num_steps, history_layers, mask)
    return FlopsReport(teacher=teacher, step_distillation=sd, ard=ard)


def gmacs(flops: int) -> float:
    """FLOPs -> G multiply-adds (DiT's "Gflops")."""
    return flops / 2e9
