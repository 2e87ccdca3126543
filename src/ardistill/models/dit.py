"""Teacher DiT, weight-compatible with facebookresearch/DiT ``models.py``.

Read top to bottom: config, model, registry. ``DiT(cfg)(x, t, y)`` returns (B, out_channels, H, W)
where out_channels = 2 * in_channels with learned sigma (the ODE uses the first in_channels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from ardistill.sampling.diffusion import PROCESS_NAMES
from ardistill.models.layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder,
                              get_2d_sincos_pos_embed, unpatchify)


@dataclass(frozen=True)
class DiTConfig:
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
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["process"] is None:  # configs written before the field existed stay byte-identical
            del d["process"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DiTConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero conditioning on timestep and class."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed sin-cos embedding; a frozen Parameter (not a buffer) so the state-dict key matches DiT.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, fixed pos-embed, adaLN-Zero (zeroed modulation and output)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid = int(self.cfg.num_patches ** 0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embedding (B, N, D)."""
        return self.x_embedder(x) + self.pos_embed

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Timesteps (any shape) and labels (B,) -> adaLN conditioning (*t.shape, D)."""
        y_emb = self.y_embedder(y, self.training)  # (B, D)
        t_emb = self.t_embedder(t)
        if t_emb.dim() == 3:  # per-block times (B, K) -> (B, K, D)
            y_emb = y_emb.unsqueeze(1)
        return t_emb + y_emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels -> (B, out_channels, H, W)."""
        h = self.embed(x)
        c = self.condition(t, y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        return unpatchify(h, self.patch_size, self.out_channels)


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
    if name not in DiT_models:
        raise KeyError(f"unknown DiT size {name!r}; choose from {sorted(DiT_models)}")
    return replace(DiTConfig(**DiT_models[name]), **overrides)


def build_dit(name: str, **overrides) -> DiT:
    return DiT(dit_config(name, **overrides))
