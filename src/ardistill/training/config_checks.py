"""What every training config shares: its dict form (config.json, checkpoints) and the checks of its fields.

Each check raises ``ValueError`` naming the config class and the field (``DistillConfig.steps must be >= 1,
got 0``), so that a command-line mistake reads as the flag that caused it.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Sequence


class ConfigDict:
    """``to_dict`` / ``from_dict`` of a frozen config dataclass: tuples are stored as lists, and an unknown
    field (a config from another version, a typo) is refused by name."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**d)


def _owner(cfg) -> str:
    return type(cfg).__name__


def check_choices(cfg, choices: dict[str, Sequence]) -> None:
    """Each named field is one of its allowed values."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{_owner(cfg)}.{name} must be one of {allowed}, got {getattr(cfg, name)!r}")


def check_at_least(cfg, minimum: int, names: Sequence[str]) -> None:
    """Each named field is >= ``minimum`` (1: counts and periods; 0: sizes that may be off)."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{_owner(cfg)}.{name} must be >= {minimum}, got {getattr(cfg, name)}")


def check_fraction(cfg, name: str, interval: str = "[0, 1]", why: str = "") -> None:
    """The field lies in the unit interval, written as it is checked: "[0, 1]", "[0, 1)" or "(0, 1)".

    ``why``: the message's reason instead of the value (e.g. why 0 is not allowed).
    """
    v = getattr(cfg, name)
    low_ok = v >= 0 if interval[0] == "[" else v > 0
    high_ok = v <= 1 if interval[-1] == "]" else v < 1
    if not (low_ok and high_ok):
        raise ValueError(f"{_owner(cfg)}.{name} must be in {interval}" + (f": {why}" if why else f", got {v}"))


def check_betas(cfg, names: Sequence[str]) -> None:
    """Adam's (beta1, beta2): two numbers in [0, 1)."""
    for name in names:
        b = getattr(cfg, name)
        if len(b) != 2 or not all(0 <= v < 1 for v in b):
            raise ValueError(f"{_owner(cfg)}.{name} must be two numbers in [0, 1), got {b}")


def check_loss_weights(cfg) -> None:
    """Per-step loss weights: none negative, not all zero (() = equal weights)."""
    w = cfg.loss_weights
    if any(v < 0 for v in w) or (w and sum(w) == 0):
        raise ValueError(f"{_owner(cfg)}.loss_weights must be >= 0 and not all zero, got {w}")


def check_batch_split(cfg) -> None:
    """The global batch splits into ``grad_accum`` micro-batches."""
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"{_owner(cfg)}.batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
