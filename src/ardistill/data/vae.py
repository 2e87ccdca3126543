"""Latent codecs: images in [-1, 1] <-> the space the teacher DiT works in.

DiT-XL/2 at 256 px is a *latent* model: it denoises 4 x 32 x 32 latents of the Stable Diffusion VAE
(sd-vae-ft-ema or sd-vae-ft-mse), scaled by ``SD_VAE_SCALE`` = 0.18215 so that they have roughly unit
variance. Teacher sampling, trajectory recording, distillation and student sampling all stay in
latents; only evaluation (and the GAN stage's real data) go through the VAE.

- ``LatentCodec`` wraps a diffusers ``AutoencoderKL`` loaded from a local folder (no hub download)
  or built from a config dict (tests). diffusers is an optional extra: ``pip install ardistill[diffusers]``.
- ``IdentityCodec`` is the codec of pixel-space models (the digits teacher): encode = decode = identity.

Both expose the same methods, so the pipeline never asks which one it holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

SD_VAE_SCALE = 0.18215  # latent scale of the SD VAE used by DiT/ARD (x_latent = 0.18215 * vae.encode(x).mean)
POSTERIORS = ("mean", "sample")


def _import_autoencoder_kl():
    """diffusers' AutoencoderKL, imported late with an error that says how to install it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("latent models need diffusers' AutoencoderKL: pip install 'ardistill[diffusers]'") from e
    return AutoencoderKL


class IdentityCodec:
    """The codec of a pixel-space model: images are the model's space."""

    scale = 1.0
    downsample = 1

    def __init__(self, channels: int | None = None):
        self.image_channels = channels  # None = whatever comes in
        self.latent_channels = channels

    def encode(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if self.image_channels is None:
            raise ValueError("IdentityCodec: latent_shape needs the channel count (IdentityCodec(channels=...))")
        return (self.image_channels, image_size, image_size)

    def to(self, device=None, dtype=None) -> "IdentityCodec":
        return self

    def describe(self) -> dict:
        return {"kind": "identity", "channels": self.image_channels}


class LatentCodec:
    """Images in [-1, 1] (B, 3, H, W) <-> scaled latents (B, 4, H/8, W/8) through an AutoencoderKL.

    Args:
        vae: a diffusers ``AutoencoderKL`` (kept in eval mode, gradients off).
        scale: latent scale; ``SD_VAE_SCALE`` for DiT.
        posterior: "mean" (deterministic) or "sample" (the posterior sample DiT's training used;
            noise drawn per image from ``seeds`` so results do not depend on batch composition).
        batch_size: images per VAE call (bounds memory when decoding 64 images of 256 px at once).
        source: where the weights came from, recorded by ``describe``.
    """

    def __init__(self, vae, scale: float = SD_VAE_SCALE, posterior: str = "mean", batch_size: int = 32,
                 source: str = "config"):
        if posterior not in POSTERIORS:
            raise ValueError(f"LatentCodec: posterior must be one of {POSTERIORS}, got {posterior!r}")
        if not scale > 0:
            raise ValueError(f"LatentCodec: scale must be > 0, got {scale}")
        if batch_size < 1:
            raise ValueError(f"LatentCodec: batch_size must be >= 1, got {batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(scale)
        self.posterior = posterior
        self.batch_size = int(batch_size)
        self.source = str(source)
        cfg = vae.config
        self.image_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x downsampler per block but the last

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: torch.dtype = torch.float32,
                        subfolder: str | None = None, **kw) -> "LatentCodec":
        """Load from a local diffusers folder (config.json + diffusion_pytorch_model.safetensors); never downloads."""
        path = Path(path)
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {folder} has no config.json; expected a diffusers AutoencoderKL folder "
                                    "(config.json + diffusion_pytorch_model.safetensors), see docs/scale.md")
        AutoencoderKL = _import_autoencoder_kl()
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True, torch_dtype=dtype,
                                            low_cpu_mem_usage=False)  # no `accelerate` needed
        codec = cls(vae, source=str(folder), **kw).to(device)
        own = getattr(vae.config, "scaling_factor", None)
        if own is not None and abs(own - codec.scale) > 1e-8:
            warnings.warn(f"VAE {folder}: config scaling_factor {own} differs from the codec's scale {codec.scale}; "
                          "the codec's scale is used (DiT's latents use 0.18215)")
        return codec

    @classmethod
    def from_config(cls, config: dict, seed: int = 0, **kw) -> "LatentCodec":
        """A randomly initialised AutoencoderKL from a config dict (tests, benchmarks)."""
        AutoencoderKL = _import_autoencoder_kl()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**config)
        return cls(vae, source="config", **kw)

    def to(self, device=None, dtype=None) -> "LatentCodec":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:  # diffusers warns about any dtype keyword, even None
            self.vae.to(**kw)
        return self

    # ---- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a square image (256 -> (4, 32, 32) for the SD VAE)."""
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not divisible by the VAE's downsampling {self.downsample}")
        h = image_size // self.downsample
        return (self.latent_channels, h, h)

    def describe(self) -> dict:
        return {"kind": "sd-vae", "source": self.source, "scale": self.scale, "posterior": self.posterior,
                "latent_channels": self.latent_channels, "downsample": self.downsample}

    # ---- encode / decode ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scale * latents (B, 4, H/8, W/8), float32.

        With ``posterior="sample"``, ``seeds`` (one per image) fix the posterior noise.
        """
        if images.dim() != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"LatentCodec.encode expects (B, {self.image_channels}, H, W), got {tuple(images.shape)}")
        if self.posterior == "sample" and (seeds is None or len(seeds) != images.shape[0]):
            raise ValueError("LatentCodec.encode with posterior='sample' needs one seed per image")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            z = dist.mean
            if self.posterior == "sample":
                from ardistill.sampling.ode import randn_from_seeds
                noise = randn_from_seeds(list(seeds[i:i + self.batch_size]), tuple(z.shape[1:]), device=z.device,
                                         dtype=z.dtype)
                z = z + dist.std * noise
            out.append(z.float() * self.scale)
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), float32, nominally in [-1, 1] (not clipped)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"LatentCodec.decode expects (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        out = []
        for i in range(0, latents.shape[0], self.batch_size):
            z = latents[i:i + self.batch_size].to(self.device, self.dtype) / self.scale
            out.append(self.vae.decode(z).sample.float())
        return torch.cat(out).to(latents.device)


Codec = LatentCodec | IdentityCodec


def load_codec(vae: str | Path | None, device=None, dtype: torch.dtype = torch.float32, channels: int | None = None,
               **kw) -> Codec:
    """``None`` or "identity" -> IdentityCodec (pixel models); a folder path -> LatentCodec.from_pretrained."""
    if vae is None or str(vae) == "identity":
        return IdentityCodec(channels)
    return LatentCodec.from_pretrained(vae, device=device, dtype=dtype, **kw)


# A tiny AutoencoderKL for tests and --tiny benchmarks: 2 blocks (8x downsampling would need 4), 4 latent channels.
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
)


def load_vae_folder(path: str | Path, device=None, dtype: torch.dtype = torch.float32, **kw) -> LatentCodec:
    """A teacher's VAE from a local diffusers folder (or a pipeline folder's vae/), with the folder's own
    ``scaling_factor`` (SD VAE 0.18215 for PixArt-alpha, SDXL VAE 0.13025 for PixArt-Sigma)."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"VAE folder not found: {path} (a local diffusers AutoencoderKL folder, or a "
                                "pipeline folder with vae/)")
    subfolder = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
    config = (path / subfolder if subfolder else path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    scale = json.loads(config.read_text()).get("scaling_factor", SD_VAE_SCALE)
    return LatentCodec.from_pretrained(path, device=device, dtype=dtype, subfolder=subfolder, scale=scale, **kw)
