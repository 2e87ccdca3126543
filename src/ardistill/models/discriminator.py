"""The discriminator of ARD's second stage ("ARD (R+G)"), its hinge losses and the adaptive GAN weight.

D(x, t, y): an image x (a student output or a real image, noised to time t by the forward process)
goes through a **frozen copy of the teacher DiT** conditioned on (t, y). The token features after
each chosen transformer block feed one small **head** each: a parameter-free LayerNorm, spectral-
normalised 1-D convolutions over the N tokens (raster order), and an unconditional logit plus a
projection on a class embedding (Miyato & Koyama's projection discriminator), i.e. one logit per
token. The frozen network has no trainable parameter (no gradient, no optimizer, no DDP), but the
generator's gradient flows *through* it to the fakes.

Losses (averaged over tokens, heads and samples):
    L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]        L_G = -E[D(fake)]
Adaptive generator weight (VQGAN's rule, at the student's last output head weight w):
    lambda = factor * clamp(||dL_reg/dw|| / (||dL_G/dw|| + eps), 0, max_weight), 0 during the warm-up.

Glossary: B batch, N tokens per image, D teacher width, C head channels, L number of heads.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ardistill.models.configs import strict_from_dict
from ardistill.models.dit import DiT

DISC_HEADS_KIND = "ard-disc-heads"  # checkpoints.save_model kind of a heads file


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The trainable part of the discriminator (the heads); the feature network is the teacher."""

    hidden_size: int  # D, the teacher's width
    num_classes: int
    depth: int  # the teacher's depth (to validate ``blocks``)
    blocks: tuple[int, ...] = ()  # teacher blocks (0-based) that get a head; () = every block
    channels: int = 64  # C
    kernel_size: int = 3  # token-mixing 1-D convolution (odd)
    cmap_dim: int = 64  # size of the class projection

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        for name in ("hidden_size", "num_classes", "depth", "channels", "kernel_size", "cmap_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"DiscriminatorConfig.kernel_size must be odd (same-length output), got {self.kernel_size}")
        bad = [b for b in self.blocks if not 0 <= b < self.depth]
        if bad or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"DiscriminatorConfig.blocks must be distinct block indices in [0, {self.depth}), "
                             f"got {self.blocks}")

    @property
    def tapped_blocks(self) -> tuple[int, ...]:
        """The blocks with a head, ascending."""
        return tuple(sorted(self.blocks)) if self.blocks else tuple(range(self.depth))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiscriminatorConfig":
        return strict_from_dict(cls, d)


class TeacherFeatures(nn.Module):
    """A frozen copy of the teacher DiT that returns the tokens after the tapped blocks.

    Blocks above the last tapped one and the final layer are dropped (never run). The module stays
    in eval mode (no label dropout) whatever ``train()`` is called with, and none of its parameters
    requires grad, so it is never updated, but gradients flow through it to its input ``x``.
    """

    def __init__(self, teacher: DiT, blocks: Sequence[int]):
        super().__init__()
        self.taps = tuple(sorted(int(b) for b in blocks))
        if not self.taps or self.taps[0] < 0 or self.taps[-1] >= teacher.cfg.depth:
            raise ValueError(f"tapped blocks {self.taps} are not in [0, {teacher.cfg.depth})")
        self.cfg = teacher.cfg
        self.x_embedder = copy.deepcopy(teacher.x_embedder)
        self.t_embedder = copy.deepcopy(teacher.t_embedder)
        self.y_embedder = copy.deepcopy(teacher.y_embedder)
        self.pos_embed = nn.Parameter(teacher.pos_embed.detach().clone(), requires_grad=False)
        self.blocks = nn.ModuleList(copy.deepcopy(teacher.blocks[i]) for i in range(self.taps[-1] + 1))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "TeacherFeatures":
        return super().train(False)  # frozen: always the teacher's inference behaviour

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, H, W) at network times t (B,), labels y (B,) -> [(B, N, D)] per tapped block."""
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, train=False)  # (B, D)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i in self.taps:
                out.append(h)
        return out


class DiscriminatorHead(nn.Module):
    """Tokens (B, N, D) + labels -> per-token logits (B, N): SN 1-D convs and a class projection."""

    def __init__(self, hidden_size: int, channels: int, kernel_size: int, num_classes: int, cmap_dim: int):
        super().__init__()
        # Parameter-free LayerNorm: DiT's residual stream grows with depth; this puts every tapped
        # block on one scale, so one D learning rate suits all heads and all model sizes.
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.conv_in = spectral_norm(nn.Conv1d(hidden_size, channels, 1))
        self.conv_mix = spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2))
        self.to_logit = spectral_norm(nn.Conv1d(channels, 1, 1))
        self.to_cmap = spectral_norm(nn.Conv1d(channels, cmap_dim, 1))
        self.embed = nn.Embedding(num_classes, cmap_dim)
        nn.init.normal_(self.embed.weight, std=1.0)  # unit-variance class codes, as the SN branches
        self.cmap_scale = 1.0 / math.sqrt(cmap_dim)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens).transpose(1, 2)  # (B, D, N): convolve over tokens
        h = F.leaky_relu(self.conv_in(h), 0.2)
        h = h + F.leaky_relu(self.conv_mix(h), 0.2)  # residual token mixing
        cmap = self.embed(y).unsqueeze(-1)  # (B, cmap, 1)
        return self.to_logit(h)[:, 0] + (self.to_cmap(h) * cmap).sum(1) * self.cmap_scale  # (B, N)


class DiscriminatorHeads(nn.Module):
    """One head per tapped block; the only trainable (and DDP-wrapped) part of the discriminator."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(DiscriminatorHead(cfg.hidden_size, cfg.channels, cfg.kernel_size,
                                                     cfg.num_classes, cfg.cmap_dim) for _ in cfg.tapped_blocks)

    def forward(self, features: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Per-block tokens [(B, N, D)] * L, labels (B,) -> logits (B, L, N)."""
        if len(features) != len(self.heads):
            raise ValueError(f"got features of {len(features)} blocks for {len(self.heads)} heads")
        return torch.stack([head(f, y) for head, f in zip(self.heads, features)], dim=1)


class Discriminator(nn.Module):
    """Frozen teacher features + trainable heads; ``D(x, t, y) -> logits (B, L, N)``.

    The training loop calls ``features`` and (the DDP-wrapped) ``heads`` separately, so that the
    frozen network is never wrapped and its fake features can be shared by the G and D losses.
    """

    def __init__(self, teacher: DiT, cfg: DiscriminatorConfig):
        super().__init__()
        if (cfg.hidden_size, cfg.num_classes, cfg.depth) != (teacher.cfg.hidden_size, teacher.cfg.num_classes,
                                                             teacher.cfg.depth):
            raise ValueError(f"DiscriminatorConfig {cfg} does not fit the teacher {teacher.cfg}")
        self.cfg = cfg
        self.features = TeacherFeatures(teacher, cfg.tapped_blocks)
        self.heads = DiscriminatorHeads(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x, t, y), y)


def discriminator_config_for(teacher: DiT, blocks: Sequence[int] = (), channels: int = 64, kernel_size: int = 3,
                             cmap_dim: int = 64) -> DiscriminatorConfig:
    """The heads' config for a teacher."""
    tc = teacher.cfg
    return DiscriminatorConfig(hidden_size=tc.hidden_size, num_classes=tc.num_classes, depth=tc.depth,
                               blocks=tuple(blocks), channels=channels, kernel_size=kernel_size, cmap_dim=cmap_dim)


# ------------------------------------------------------------------------------------------------
# losses


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_D, real part, fake part): E[relu(1 - D(real))] + E[relu(1 + D(fake))], means over all logits."""
    real = F.relu(1.0 - real_logits.float()).mean()
    fake = F.relu(1.0 + fake_logits.float()).mean()
    return real + fake, real, fake


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(fake)] (the generator's hinge loss)."""
    return -fake_logits.float().mean()


def adaptive_weight_from_grads(g_reg: torch.Tensor, g_gan: torch.Tensor, factor: float, max_weight: float = 1e4,
                               eps: float = 1e-4) -> torch.Tensor:
    """factor * clamp(||g_reg|| / (||g_gan|| + eps), 0, max_weight), detached (VQGAN's calculate_adaptive_weight)."""
    ratio = g_reg.detach().float().norm() / (g_gan.detach().float().norm() + eps)
    return torch.clamp(ratio, 0.0, max_weight) * factor


def adaptive_weight(reg_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, factor: float,
                    max_weight: float = 1e4, eps: float = 1e-4,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The generator's GAN weight from the two losses' gradients at ``last_layer`` (graphs are kept).

    ``reduce`` (e.g. a mean over processes) is applied to each gradient first, so that every process
    uses the weight of the global batch.
    """
    # allow_unused: a loss that does not reach the layer has gradient 0 there (not an error)
    g_reg, g_gan = (g if g is not None else torch.zeros_like(last_layer) for g in
                    (torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0]
                     for loss in (reg_loss, gan_loss)))
    if reduce is not None:
        g_reg, g_gan = reduce(g_reg), reduce(g_gan)
    return adaptive_weight_from_grads(g_reg, g_gan, factor, max_weight, eps)


def last_head_weight(student: nn.Module) -> torch.Tensor:
    """The student's last output layer (the final step's head, ``heads[-1].linear.weight``)."""
    student = getattr(student, "module", student)
    return student.heads[-1].linear.weight
