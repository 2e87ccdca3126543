"""The DiT backbone (every teacher) and the class-conditional config, weight-compatible with facebookresearch/DiT.

Read top to bottom: config, model, registry. ``DiT(cfg)(x, t, y)`` returns (B, out_channels, H, W)
where out_channels = 2 * in_channels with learned sigma (the ODE uses the first in_channels). The same
class with a ``TextDiTConfig`` (models/text_dit.py) is the PixArt-form text-to-image model: the
conditioning is pluggable (models/conditioning.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ardistill.sampling.diffusion import PROCESS_NAMES
from ardistill.models.conditioning import conditioning_for
from ardistill.models.configs import BackboneConfig, registered_config
from ardistill.models.layers import unpatchify


@dataclass(frozen=True)
class DiTConfig(BackboneConfig):
    """Architecture of a DiT; everything needed to rebuild the model from a file."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    prediction: str = "eps"  # "eps" (VP process, DiT) or "velocity" (rectified flow)
    # named process of sampling.diffusion (PROCESS_NAMES): "vp", or a flow convention "flow" (SD3-style),
    # "sit", "repa"; None = the default for ``prediction`` (VP for eps, "flow" for velocity)
    process: str | None = None

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig: input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig: hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")
        for name in ("depth", "num_classes", "in_channels", "patch_size", "input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"DiTConfig: class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.prediction not in ("eps", "velocity"):
            raise ValueError(f"DiTConfig: prediction must be 'eps' or 'velocity', got {self.prediction!r}")
        if self.process is not None:
            if self.process not in PROCESS_NAMES:
                raise ValueError(f"DiTConfig: process must be one of {PROCESS_NAMES} or None, got {self.process!r}")
            if (self.process == "vp") != (self.prediction == "eps"):
                raise ValueError(f"DiTConfig: process {self.process!r} does not fit prediction {self.prediction!r} "
                                 f"('vp' predicts eps; the flow conventions predict a velocity)")

    @property
    def conditioning(self) -> str:
        """The backbone's conditioning (models/conditioning.py): class labels by adaLN-Zero."""
        return "class"

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.input_size, self.input_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size // self.patch_size,) * 2

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["process"] is None:  # configs written before the field existed stay byte-identical
            del d["process"]
        return d



class DiT(nn.Module):
    """The one diffusion transformer: patch embedding, ``depth`` layers, an output layer, with pluggable conditioning.

    ``cfg.conditioning`` picks the conditioning (models/conditioning.py): a ``DiTConfig`` is DiT's
    class-conditional model (adaLN-Zero; ``model(x, t, y)``, state dict = facebookresearch/DiT's), a
    ``TextDiTConfig`` the PixArt form (cross-attention to captions, adaLN-single; ``model(x, t, text,
    text_mask)``, state dict = diffusers' PixArtTransformer2DModel's). The ARD student
    (models/student.py) is built from the same conditioning, so every teacher and student share it.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.conditioning = conditioning_for(cfg)
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.conditioning.build(self, cfg, teacher=True)
        self.initialize_weights()

    @property
    def arch(self):
        """The architecture config (the student's is its teacher's)."""
        return self.cfg

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers (``blocks`` in DiT's names, ``transformer_blocks`` in PixArt's)."""
        return self.conditioning.layers(self)

    def initialize_weights(self) -> None:
        """The original initialisation of the conditioning's family (DiT's adaLN-Zero, PixArt's)."""
        self.conditioning.initialize(self, self.cfg)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embedding (B, N, D)."""
        return self.conditioning.embed(self, x)

    def context(self, *cond, **extra):
        """What the condition gives every layer, computed once per sample (class: label embedding; text:
        the layers' keys/values of the caption); labels are dropped for guidance in training."""
        return self.conditioning.context(self, cond, self.training, **extra)

    def modulation(self, t: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B,) or per block (B, K) -> adaLN inputs of the layers and of the output layer."""
        return self.conditioning.modulation(self, t, ctx)

    def output(self, h: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        """Output layer: tokens (B, L, D) -> (B, L, p*p*out_channels)."""
        return self.conditioning.output(self, h, c_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor, **extra) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, the condition (labels y (B,); or text (B, T, C_text) and its
        mask (B, T) bool, with optional ``resolution``/``aspect_ratio`` micro-conditions) -> (B, out_channels, H, W)."""
        if tuple(x.shape[-2:]) != self.cfg.image_size:
            raise ValueError(f"{type(self.cfg).__name__} was built for {self.cfg.image_size} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        h = self.embed(x)
        ctx = self.context(*cond, **extra)
        c, c_out = self.modulation(t, ctx)
        for i, block in enumerate(self.layers):
            h = block(h, *self.conditioning.block_args(c, ctx, i))
        return unpatchify(self.output(h, c_out), self.patch_size, self.out_channels, self.cfg.grid_size)


# Standard sizes from the paper (names are also CLI choices), plus tiny ones for tests and CPU work.
_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "T": dict(depth=2, hidden_size=64, num_heads=4),  # tests
}
DiT_models: dict[str, dict] = {f"DiT-{s}/{p}": dict(_SIZES[s], patch_size=p) for s in _SIZES for p in (2, 4, 8)}
# The embedded default: 8x8 single-channel digits, 16 tokens of patch 2.
DiT_models["DiT-digits"] = dict(depth=6, hidden_size=128, num_heads=4, patch_size=2, input_size=8,
                                in_channels=1, num_classes=10, learn_sigma=False)
# The shipped digits teacher's size: at equal CPU training time it matched DiT-digits' FD and it is
# 2.4x cheaper per sample, which every CPU demo (recording, distillation) pays (docs/digits.md).
DiT_models["DiT-digits-S"] = dict(DiT_models["DiT-digits"], depth=4, hidden_size=96)
# The embedded photos benchmark: 16x16 RGB crops, 64 tokens of patch 2; DiT-digits-S's width and depth
# so that recording and distillation fit a 2-core CPU demo (docs/photos.md).
DiT_models["DiT-photos-S"] = dict(DiT_models["DiT-digits-S"], input_size=16, in_channels=3)
# A smaller photos teacher (DiT-T's depth 2 and width 64): the teacher-size axis of the regime study.
DiT_models["DiT-photos-T"] = dict(DiT_models["DiT-photos-S"], depth=2, hidden_size=64)


def dit_config(name: str, **overrides) -> DiTConfig:
    """Config of a registered size, with overrides (input_size, in_channels, num_classes, ...)."""
    return registered_config(DiTConfig, DiT_models, "DiT", name, **overrides)


def build_dit(name: str, **overrides) -> DiT:
    return DiT(dit_config(name, **overrides))
