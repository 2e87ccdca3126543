"""Learning-rate schedules: linear warm-up then constant (distill, finetune-gan), or then cosine decay
(teacher training)."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


LR_SCHEDULES = ("constant", "cosine")  # teacher training, after the warm-up


def learning_rate(cfg, step: int) -> float:
    """Learning rate at (0-based) ``step``: linear warm-up, then constant or cosine to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
