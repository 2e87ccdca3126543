"""Real images for GAN fine-tuning's discriminator, in the student's state space: an embedded data set's
training split, an image folder, or pre-encoded latents (``ardistill encode-latents``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import torch

from ardistill.data.sources import EMBEDDED


class RealData(Protocol):
    """Real images for the discriminator, in the student's state space."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W) float32, labels (B,) int64)."""
        ...

    def identity(self) -> dict: ...


class _InMemoryReal:
    """Real images held in memory: ``images`` (N, C, H, W) in [-1, 1], ``labels`` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, generator):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


class EmbeddedReal(_InMemoryReal):
    """The training split of an embedded data set ("digits" or "photos"), in [-1, 1]: the images the
    benchmark's teacher was trained on (``data.sources.open_training_data``)."""

    def __init__(self, name: str = "digits"):
        from ardistill.data.sources import open_training_data
        d = open_training_data(name)
        self.images, self.labels, self.name = d.images, d.labels, name
        self.shape, self.num_classes = tuple(d.shape), d.num_classes

    def identity(self) -> dict:
        return {"kind": self.name, "split": "train", "count": len(self)}


class LatentReal:
    """Pre-encoded latents (``ardistill encode-latents``); the mirrored latent half the time."""

    def __init__(self, root: str | Path, verify_shards: bool = True):
        from ardistill.data.image_folder import LatentStore
        self.store = LatentStore(root, verify_shards=verify_shards)
        self.shape, self.num_classes = tuple(self.store.shape), self.store.num_classes

    def __len__(self) -> int:
        return len(self.store)

    def batch(self, indices, generator):
        flip = (torch.rand(len(indices), generator=generator) < 0.5).numpy() if self.store.layout.flipped else None
        return self.store.batch(indices, flip)

    def identity(self) -> dict:
        content = hashlib.sha256("".join(s["sha256"] for s in self.store.shards).encode()).hexdigest()
        return {"kind": "latents", "count": len(self), "shape": list(self.shape), "content": content}


class FolderReal(_InMemoryReal):
    """An image folder in ImageNet layout (your own data), ADM centre-cropped to the student's image size."""

    def __init__(self, root: str | Path, image_size: int):
        from ardistill.data.sources import load_image_folder
        d = load_image_folder(root, image_size)
        self.root, self.images, self.labels, self.classes = str(root), d.images, d.labels, d.classes
        self.shape, self.num_classes = tuple(d.images.shape[1:]), len(d.classes)

    def identity(self) -> dict:
        content = hashlib.sha256(self.images.numpy().tobytes() + self.labels.numpy().tobytes()).hexdigest()
        return {"kind": "image-folder", "count": len(self), "shape": list(self.shape), "classes": self.classes,
                "content": content}


def open_real(spec: str, verify_shards: bool = True, image_size: int | None = None) -> RealData:
    """"digits" or "photos" -> that embedded data set's train split; a folder with a trajectory-store
    manifest -> a latent store; any other folder -> an image folder (centre-cropped to ``image_size``)."""
    from ardistill.data.shard_files import MANIFEST
    if spec in EMBEDDED:
        return EmbeddedReal(spec)
    if Path(spec).is_dir() and not (Path(spec) / MANIFEST).exists():
        if image_size is None:
            raise ValueError(f"real data {spec}: an image folder needs the image size to crop to")
        return FolderReal(spec, image_size)
    return LatentReal(spec, verify_shards)
