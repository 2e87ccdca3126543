"""Tiny random teachers and what the tests make from them: DiT configs, models with every weight random, a toy
prompt encoder, a tiny recording of a teacher and the config of a short distillation run on one.

Test files import these directly (``from tiny_teachers import ...``; pytest puts tests/ on sys.path, as for
tolerances.py); tests/conftest.py wraps some as fixtures. Two ways of drawing the weights are kept apart, since
tests' expected numbers depend on which one made their teacher:

- ``random_dit`` / ``randomize_weights``: every weight from a ``torch.Generator`` seeded ``seed``;
- ``random_from_global_rng``: ``torch.manual_seed(seed)``, build, then ``normal_`` from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ardistill.models.dit import DiT, DiTConfig

# depth 2, width 64, 8x8 latents with 4 channels: 16 tokens, fast on CPU.
TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
# the digits' shape (1 x 8 x 8, 10 classes, no learned variance): with it the embedded digits serve as real data
DIGITS = dict(in_channels=1, learn_sigma=False)
# a 16-trajectory recording in two shards: S = 4 student steps on T = 8 teacher steps, no guidance
TINY_RECORD = dict(count=16, num_steps=4, teacher_steps=8, cfg_scale=1.0, shard_size=8, batch_size=8, dtype="float32")
# a short distillation run on it: 6 steps of batch 4, a checkpoint every 3, no tensorboard or progress bar
TINY_DISTILL = dict(steps=6, batch_size=4, lr=1e-3, ema_decay=0.9, ckpt_every=3, log_every=1, tensorboard=False,
                    progress=False)


def tiny_dit_config(**overrides) -> DiTConfig:
    """``DiTConfig`` of ``TINY_DIT`` with ``overrides``."""
    return DiTConfig(**{**TINY_DIT, **overrides})


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int, std: float, skip: tuple[str, ...] = ("pos_embed",)):
    """Every parameter but those named in ``skip`` (DiT's fixed sin-cos ``pos_embed``) drawn N(0, std^2), in
    ``named_parameters`` order, from a generator seeded ``seed``. DiT's adaLN-Zero init zeroes the modulation and
    the output layer (PixArt's the cross-attention outputs too), which would make any teacher and comparison
    trivial. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name not in skip:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_dit(cfg: DiTConfig | Mapping | None = None, *, seed: int = 0, std: float = 0.1, seed_torch: bool = False,
               **overrides) -> DiT:
    """A DiT of ``cfg`` (a ``DiTConfig`` or its fields; ``TINY_DIT`` if None) with ``overrides``, every weight
    random (``randomize_weights(model, seed, std)``), in eval mode. ``seed_torch``: call ``torch.manual_seed(seed)``
    before building it, as some tests do (torch's global RNG then leaves it in the same state on every run)."""
    if isinstance(cfg, DiTConfig):
        config = replace(cfg, **overrides)
    else:
        config = DiTConfig(**{**(TINY_DIT if cfg is None else cfg), **overrides})
    if seed_torch:
        torch.manual_seed(seed)
    return randomize_weights(DiT(config), seed, std).eval()


@torch.no_grad()
def random_from_global_rng(build: Callable[[], torch.nn.Module], std: float, seed: int = 0) -> torch.nn.Module:
    """``torch.manual_seed(seed)``, ``model = build()``, then every trainable parameter ``normal_(0, std)`` from
    torch's global RNG in ``parameters()`` order (DiT's fixed ``pos_embed`` is not trainable, so it is kept)."""
    torch.manual_seed(seed)
    model = build()
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(0, std)
    return model


def random_text_dit(std: float = 0.1, seed: int = 0, **overrides):
    """A ``TextDiT-T`` (with config ``overrides``) in eval mode, every weight drawn by ``random_from_global_rng``."""
    from ardistill.models.text_dit import TextDiT, text_dit_config
    return random_from_global_rng(lambda: TextDiT(text_dit_config("TextDiT-T", **overrides)).eval(), std, seed)


@torch.no_grad()
def flow_text_teacher(std: float = 0.05, seed: int = 0, **overrides):
    """The text distillation tests' ``TextDiT-T`` flow teacher (``prediction="velocity"``, config ``overrides``):
    ``torch.manual_seed(seed)``, then every parameter ``randn_like(p) * std``. Random weights give velocities of
    order one, so the states stay of order one."""
    from ardistill.models.text_dit import TextDiT, text_dit_config
    torch.manual_seed(seed)
    teacher = TextDiT(text_dit_config("TextDiT-T", prediction="velocity", **overrides))
    for p in teacher.parameters():
        p.copy_(torch.randn_like(p) * std)
    return teacher


class ToyPromptEncoder:
    """A deterministic stand-in text encoder: a start token ``<s>`` and then one vector per word (at most
    ``length - 1`` words), the one at position j drawn from a generator seeded ``sum(map(ord, word)) +
    position_stride * j``; ``length`` tokens of ``width``, the padding filled with ``pad``."""

    def __init__(self, width: int, length: int = 5, pad: float = 0.0, position_stride: int = 13):
        self.width, self.length, self.pad, self.position_stride = width, length, pad, position_stride

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.full((len(prompts), self.length, self.width), self.pad)
        mask = torch.zeros(len(prompts), self.length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = ["<s>"] + p.split()[:self.length - 1]
            for j, w in enumerate(words):
                g = torch.Generator().manual_seed(sum(map(ord, w)) + self.position_stride * j)
                tokens[i, j] = torch.randn(self.width, generator=g)
            mask[i, :len(words)] = True
        return tokens, mask

    def identity(self) -> dict:
        """What ``write_prompt_store`` stores as the encoder: name, (dummy) weights hash, width, length."""
        return {"name": "toy", "sha256": "0" * 64, "width": self.width, "max_length": self.length}


def record_tiny(root: Path, teacher: DiT, **record_overrides) -> dict:
    """``teacher`` saved to ``root/teacher.safetensors`` and recorded to ``root/rec`` (``TINY_RECORD`` with
    ``record_overrides``). Returns the paths (``root``; ``recording``, ``teacher`` as strings) and ``teacher_model``."""
    from ardistill.data.record import RecordConfig, record
    from ardistill.io.checkpoints import save_checkpoint_safetensors
    root = Path(root)
    save_checkpoint_safetensors(teacher, root / "teacher.safetensors")
    record(teacher, root / "rec", RecordConfig(**{**TINY_RECORD, **record_overrides}), progress=False)
    return {"root": root, "recording": str(root / "rec"), "teacher": str(root / "teacher.safetensors"),
            "teacher_model": teacher}


def tiny_distill_config(rec: Mapping, run_dir, **overrides):
    """``DistillConfig`` of ``TINY_DISTILL`` with ``overrides`` on ``rec``'s recording and teacher (the paths in a
    ``record_tiny`` result), writing to ``run_dir``."""
    from ardistill.training.distill import DistillConfig
    base = dict(recording=rec["recording"], teacher=rec["teacher"], run_dir=str(run_dir), **TINY_DISTILL)
    return DistillConfig(**{**base, **overrides})
