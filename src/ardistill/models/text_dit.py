"""The text-conditioned DiT's configuration (PixArt-alpha / PixArt-Sigma form) and its registered sizes.

The model itself is the one DiT backbone (models/dit.py) with text conditioning
(models/conditioning.py: ``TextConditioning``, built from models/pixart_layers.py): ``DiT(cfg)`` with a
``TextDiTConfig`` is a PixArt-form model whose state-dict names are diffusers' PixArtTransformer2DModel's,
and ``DiT(cfg)(x, t, text, text_mask)`` returns (B, out_channels, H, W). Guidance uses a null text: the
text encoder's encoding of the empty prompt (diffusers' PixArt pipeline does the same with T5's empty
prompt), so the state dict stays one to one with diffusers'. ``TextDiT`` is the backbone's name where a
text model is meant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ardistill.models.configs import BackboneConfig, registered_config
from ardistill.models.dit import DiT
from ardistill.models.pixart_layers import TextKV, pad_text  # noqa: F401  (the text API's names)

TextDiT = DiT  # the one backbone; a TextDiTConfig selects its text conditioning

PREDICTIONS = ("eps", "velocity")


@dataclass(frozen=True)
class TextDiTConfig(BackboneConfig):
    """Architecture of a text-conditioned DiT (PixArt form); everything needed to rebuild it from a file.

    ``sample_size`` and ``interpolation_scale`` are diffusers' names: the position embedding of an
    (h, w)-token grid uses positions i / (h / base) / scale with base = sample_size // patch_size
    (PixArt's multi-aspect convention); ``interpolation_scale=None`` means max(sample_size // 64, 1).
    """

    input_size: tuple[int, int] = (128, 128)  # (H, W) of the model's input (latent) images
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # diffusers' BasicTransformerBlock always uses 4
    caption_channels: int = 4096  # width C of the text encoder's tokens
    sample_size: int = 128
    interpolation_scale: float | None = None
    learn_sigma: bool = True
    prediction: str = "eps"  # "eps" (VP process) or "velocity" (rectified flow)
    caption_dropout_prob: float = 0.1  # training-time chance of the null text (what makes CFG possible)
    # PixArt-alpha 1024's micro-conditions (diffusers' name): the image's pixel size and aspect ratio are
    # embedded and added to the time embedding. ``resolution`` is the pixel (H, W) a fixed-size model
    # (the teacher of a recording, the student) is conditioned on; None = 8 x input_size (the VAE's factor).
    use_additional_conditions: bool = False
    resolution: tuple[int, int] | None = None

    def __post_init__(self):
        size = self.input_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        if len(self.input_size) != 2:
            raise ValueError(f"TextDiTConfig: input_size must be (H, W), got {self.input_size}")
        for name in ("depth", "in_channels", "patch_size", "caption_channels", "sample_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextDiTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if any(s % self.patch_size for s in self.input_size):
            raise ValueError(f"TextDiTConfig: input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TextDiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"TextDiTConfig: hidden_size {self.hidden_size} must be a multiple of 4 "
                             "(2-D sin-cos embedding)")
        if self.interpolation_scale is not None and self.interpolation_scale <= 0:
            raise ValueError(f"TextDiTConfig: interpolation_scale must be > 0, got {self.interpolation_scale}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"TextDiTConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 <= self.caption_dropout_prob < 1:
            raise ValueError(f"TextDiTConfig: caption_dropout_prob must be in [0, 1), got {self.caption_dropout_prob}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"TextDiTConfig: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.resolution is not None:
            object.__setattr__(self, "resolution", tuple(int(r) for r in self.resolution))
            if len(self.resolution) != 2 or min(self.resolution) < 1:
                raise ValueError(f"TextDiTConfig: resolution must be a pixel (H, W), got {self.resolution}")
        if self.use_additional_conditions and self.hidden_size % 3:
            raise ValueError(f"TextDiTConfig: micro-conditions embed into hidden_size / 3 channels each; "
                             f"hidden_size {self.hidden_size} is not divisible by 3")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    @property
    def conditioning(self) -> str:
        """The backbone's conditioning (models/conditioning.py): captions by cross-attention, adaLN-single."""
        return "text"

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size

    @property
    def pos_interpolation_scale(self) -> float:
        s = self.interpolation_scale
        return float(max(self.sample_size // 64, 1) if s is None else s)

    @property
    def micro_resolution(self) -> tuple[int, int]:
        """Pixel (H, W) given to the micro-condition embedders by default."""
        return self.resolution or (8 * self.input_size[0], 8 * self.input_size[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        if d["resolution"] is not None:
            d["resolution"] = list(d["resolution"])
        return d



# Sizes: PixArt's XL/2 (the public text-to-image teachers; issue 15 loads them), a tiny test size, and the
# embedded benchmark's size (two digits side by side, 8x16 pixels, 32 tokens of patch 2).
TextDiT_models: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, caption_channels=4096,
                        input_size=(128, 128), sample_size=128, in_channels=4, learn_sigma=True),
    "TextDiT-T": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, caption_channels=32,
                      input_size=(8, 16), sample_size=8, in_channels=1, learn_sigma=False),
    "TextDiT-digits": dict(depth=4, hidden_size=96, num_heads=4, patch_size=2, caption_channels=32,
                           input_size=(8, 16), sample_size=8, in_channels=1, learn_sigma=False),
}


def text_dit_config(name: str, **overrides) -> TextDiTConfig:
    """Config of a registered size, with overrides (input_size, caption_channels, ...)."""
    return registered_config(TextDiTConfig, TextDiT_models, "text DiT", name, **overrides)


def build_text_dit(name: str, **overrides) -> TextDiT:
    return TextDiT(text_dit_config(name, **overrides))

