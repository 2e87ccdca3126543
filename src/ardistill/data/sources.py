"""What a teacher trains on: the embedded data sets, an image folder or a latent store, behind one interface.

``open_training_data(spec)`` takes ``"digits"``, ``"photos"``, a folder in ImageNet layout, or a
latent store written by ``ardistill encode-latents``, and returns a ``TrainingData``: its sample
shape, class count, a description for config.json, and ``sample(batch_size, generator)``, which
draws a batch with every random choice (indices, shifts, flips) taken from the caller's generator
so that a training run that checkpoints the generator resumes exactly.

The digits draw (indices, then shifts) is the one the shipped digits teacher was trained with; it
must not change or that teacher stops being reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED = ("digits", "photos")


@dataclass
class TrainingData:
    """Training images or latents with labels, in memory or memory-mapped, sampled with a caller's generator."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W) of one sample
    num_classes: int
    info: dict
    images: torch.Tensor | None = None  # (N, C, H, W) in the model range, when held in memory
    labels: torch.Tensor | None = None
    augment_shift: int = 0  # digits only: random translation with background fill
    hflip: bool = False  # image folders: mirror half the draws
    store: object = None  # a LatentStore

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else int(self.labels.shape[0])

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (x0 (B, C, H, W) float32, labels (B,) int64) drawn with replacement."""
        if self.store is not None:
            return self.store.sample(batch_size, generator)
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        x0 = self.images[idx]
        if self.augment_shift:
            from ardistill.data.digits import random_shift
            x0 = random_shift(x0, self.augment_shift, generator)
        if self.hflip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        return x0, self.labels[idx]

    def describe(self) -> dict:
        """What config.json records about the data."""
        return {"name": self.name, "num_images": len(self), "shape": list(self.shape),
                "num_classes": self.num_classes, **self.info}


def open_training_data(spec: str, *, image_size: int = 32, hflip: bool = False, augment_shift: int = 0,
                       data_seed: int = 0, heldout_fraction: float = 0.2) -> TrainingData:
    """The training split of ``spec``: 'digits', 'photos', an image-folder path or a latent-store path.

    Args:
        spec: what to train on.
        image_size: ADM centre-crop size for an image folder (ignored otherwise).
        hflip: mirror half of the image-folder draws (latent stores mirror when they hold mirrors).
        augment_shift: digits only, random translation by up to this many pixels.
        data_seed: seed of the digits' train / held-out split, or of the photo crops.
        heldout_fraction: the digits' held-out fraction.
    """
    if augment_shift and spec != "digits":
        raise ValueError(f"augment_shift (background-filled translation) is for the digits only, not {spec!r}")
    if spec == "digits":
        from ardistill.data.digits import DIGITS_CHANNELS, DIGITS_CLASSES, DIGITS_RESOLUTION, load_digits_split
        if hflip:
            raise ValueError("hflip does not apply to the digits (mirrored digits are other glyphs)")
        d = load_digits_split("train", seed=data_seed, heldout_fraction=heldout_fraction)
        return TrainingData(name="sklearn-digits", shape=(DIGITS_CHANNELS, DIGITS_RESOLUTION, DIGITS_RESOLUTION),
                            num_classes=DIGITS_CLASSES, images=d.images, labels=d.labels, augment_shift=augment_shift,
                            info={"split": "train", "value_range": [-1, 1], "heldout_fraction": heldout_fraction,
                                  "data_seed": data_seed})
    if spec == "photos":
        from ardistill.data.photos import PHOTOS_CLASSES, PhotoCropsConfig, load_photos_split
        if hflip:
            raise ValueError("hflip: the photo crops already include seeded flips")
        crops = PhotoCropsConfig()
        d = load_photos_split("train", seed=data_seed, cfg=crops)
        return TrainingData(name="photos", shape=tuple(d.images.shape[1:]), num_classes=PHOTOS_CLASSES,
                            images=d.images, labels=d.labels,
                            info={"split": "train", "value_range": [-1, 1], "data_seed": data_seed,
                                  "crops": crops.to_dict()})
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"training data {spec!r}: not 'digits' or 'photos' and no such folder")
    from ardistill.data.shard_files import MANIFEST
    if (path / MANIFEST).exists():
        from ardistill.data.image_folder import LatentStore
        store = LatentStore(path)
        if hflip:
            raise ValueError(f"{path}: a latent store mirrors by itself when it was encoded with flips; drop hflip")
        return TrainingData(name="latent-store", shape=tuple(store.shape), num_classes=store.num_classes,
                            store=store, info={"root": str(path), "flipped": store.layout.flipped})
    d = load_image_folder(path, image_size)
    return TrainingData(name="image-folder", shape=tuple(d.images.shape[1:]), num_classes=len(d.classes),
                        images=d.images, labels=d.labels, hflip=hflip,
                        info={"root": str(path), "image_size": image_size, "hflip": hflip, "classes": d.classes,
                              "value_range": [-1, 1]})


@dataclass
class LabelledImages:
    """Images (N, C, H, W) float32 in [-1, 1] with labels (N,) int64 and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    root: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> "LabelledImages":
        return LabelledImages(self.images[idx], self.labels[idx], self.classes, self.root)


def load_image_folder(root: str | Path, image_size: int) -> LabelledImages:
    """Every image of an ImageNet-layout folder (``root/<class>/<images>``), ADM centre-cropped to
    ``image_size``, in memory (small data sets)."""
    from ardistill.data.image_folder import ImageFolder
    folder = ImageFolder(root, image_size=image_size)
    images = torch.stack([folder.load(i) for i in range(len(folder))])
    labels = torch.tensor([c for _, c in folder.items], dtype=torch.int64)
    return LabelledImages(images, labels, list(folder.classes), str(root))


def image_folder_splits(root: str | Path, image_size: int, heldout: str | Path | None = None,
                        heldout_fraction: float = 0.2, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    """(train, held-out) images of your own data: ``heldout`` is a second folder with the same classes
    (e.g. ImageNet's val/ beside train/), or else ``heldout_fraction`` of each class of ``root`` is
    held out, chosen with ``seed`` (at least one image per class stays in training)."""
    data = load_image_folder(root, image_size)
    if heldout is not None:
        other = load_image_folder(heldout, image_size)
        if other.classes != data.classes:
            raise ValueError(f"held-out folder {heldout} has the classes {other.classes[:10]}, the training folder "
                             f"{root} {data.classes[:10]}: they must be the same class sub-folders")
        return data, other
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(len(data.classes)):
        idx = (data.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[:min(round(len(idx) * heldout_fraction), len(idx) - 1)])
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held_idx] = False
    if not len(held_idx):
        raise ValueError(f"image folder {root}: too few images to hold {heldout_fraction} of each class out; "
                         "give a held-out folder")
    return data.subset(keep.nonzero().flatten()), data.subset(held_idx)
