"""The second embedded data set: 16x16 RGB crops of the photographs shipped in scikit-image and scikit-learn.

Harder than the 8x8 digits (3 channels, 4x the pixels, natural-image texture and colour), and like
them it ships offline: the ten source photos are files inside the ``scikit-image`` and
``scikit-learn`` wheels, read from the package folders with Pillow (no pooch download, no network).
One class per source photo:

  0 astronaut  1 coffee  2 chelsea (cat)  3 rocket  4 hubble_deep_field  5 immunohistochemistry
  6 retina (central 60%, without the black surround)  7 motorcycle_left  8 china  9 flower

Each photo is downscaled so that its short side is ``short_side`` pixels (ADM's BOX halving, then one
BICUBIC resize). The right-most ``heldout_width`` columns of every downscaled photo are the held-out
region; training crops lie entirely left of it, held-out crops entirely inside it, so a reference
image never shares a pixel with a training image. Crop positions and horizontal flips come from
``numpy.random.default_rng([seed, class, split])``: the same seed gives the same bytes, and every
crop's (y, x, flip) is kept in ``positions`` so the split can be audited.

Model range: uint8 0..255 -> x = p / 127.5 - 1 in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS_RESOLUTION = 16
PHOTOS_CHANNELS = 3
SPLITS = ("train", "heldout")

# (class name, package, file, crop box as fractions (left, top, right, bottom) of the original)
PHOTO_SOURCES: tuple[tuple[str, str, str, tuple[float, float, float, float]], ...] = (
    ("astronaut", "skimage", "astronaut.png", (0.0, 0.0, 1.0, 1.0)),
    ("coffee", "skimage", "coffee.png", (0.0, 0.0, 1.0, 1.0)),
    ("chelsea", "skimage", "chelsea.png", (0.0, 0.0, 1.0, 1.0)),
    ("rocket", "skimage", "rocket.jpg", (0.0, 0.0, 1.0, 1.0)),
    ("hubble_deep_field", "skimage", "hubble_deep_field.jpg", (0.0, 0.0, 1.0, 1.0)),
    ("immunohistochemistry", "skimage", "ihc.png", (0.0, 0.0, 1.0, 1.0)),
    ("retina", "skimage", "retina.jpg", (0.2, 0.2, 0.8, 0.8)),  # the fundus, not its black surround
    ("motorcycle", "skimage", "motorcycle_left.png", (0.0, 0.0, 1.0, 1.0)),
    ("china", "sklearn", "china.jpg", (0.0, 0.0, 1.0, 1.0)),
    ("flower", "sklearn", "flower.jpg", (0.0, 0.0, 1.0, 1.0)),
)
PHOTOS_CLASSES = len(PHOTO_SOURCES)
PHOTO_CLASS_NAMES = tuple(s[0] for s in PHOTO_SOURCES)


@dataclass(frozen=True)
class PhotoCropsConfig:
    """How the crops are made; the defaults are the benchmark's (docs/photos.md)."""

    resolution: int = PHOTOS_RESOLUTION  # crop side
    short_side: int = 64  # each photo's short side after downscaling
    heldout_width: int = 24  # right-most columns of each photo reserved for held-out crops
    train_per_class: int = 1000
    heldout_per_class: int = 200

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"PhotoCropsConfig.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.heldout_width < self.resolution:
            raise ValueError(f"PhotoCropsConfig.heldout_width ({self.heldout_width}) must be >= resolution "
                             f"({self.resolution}): held-out crops lie inside the held-out region")
        if self.short_side < self.resolution:
            raise ValueError(f"PhotoCropsConfig.short_side ({self.short_side}) must be >= resolution ({self.resolution})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhotosData:
    """One split of the photo crops: images (N, 3, R, R) float32 in [-1, 1], labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    split: str
    seed: int
    positions: np.ndarray  # (N, 3) int: top y, left x (in the downscaled photo of the label), flipped 0/1

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.shape[1] != PHOTOS_CHANNELS:
            raise ValueError(f"PhotosData: images must be (N, 3, R, R), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],) or self.positions.shape != (self.images.shape[0], 3):
            raise ValueError(f"PhotosData: labels {tuple(self.labels.shape)} / positions {self.positions.shape} "
                             f"do not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def source_path(package: str, filename: str) -> Path:
    """The file of a source photo inside its installed package (FileNotFoundError naming it if absent)."""
    if package == "skimage":
        try:
            import skimage
        except ImportError as e:
            raise ImportError("the photos data set reads its images from scikit-image's wheel: "
                              "pip install scikit-image (or ardistill[photos])") from e
        path = Path(skimage.__file__).parent / "data" / filename
    elif package == "sklearn":
        import sklearn
        path = Path(sklearn.__file__).parent / "datasets" / "images" / filename
    else:
        raise ValueError(f"unknown photo package {package!r}")
    if not path.exists():
        raise FileNotFoundError(f"photo {filename!r} is not in the installed {package} ({path}); "
                                f"this scikit-image / scikit-learn build does not ship it")
    return path


def downscale(img: Image.Image, short_side: int) -> np.ndarray:
    """ADM-style downscale (BOX halving while >= 2x, then BICUBIC) to the given short side; uint8 (H, W, 3)."""
    while min(img.size) >= 2 * short_side:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = short_side / min(img.size)
    img = img.resize(tuple(max(short_side, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


@lru_cache(maxsize=4)
def load_photos(short_side: int = 64) -> tuple[np.ndarray, ...]:
    """The ten source photos, cropped to their boxes and downscaled; uint8 (H, W, 3) each, read-only."""
    out = []
    for _, package, filename, (l, t, r, b) in PHOTO_SOURCES:
        path = source_path(package, filename)
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            im = im.crop((round(l * w), round(t * h), round(r * w), round(b * h)))
            arr = downscale(im, short_side)
        arr.flags.writeable = False
        out.append(arr)
    return tuple(out)


def region_columns(width: int, cfg: PhotoCropsConfig, split: str) -> tuple[int, int]:
    """[x_start, x_end) columns of a photo of ``width`` that the split's crops must lie in."""
    if width < cfg.heldout_width + cfg.resolution:
        raise ValueError(f"photo of width {width} is too narrow for a training region and a held-out band "
                         f"of {cfg.heldout_width} columns")
    cut = width - cfg.heldout_width
    return (0, cut) if split == "train" else (cut, width)


def crop_positions(photo_shape: tuple[int, int], cfg: PhotoCropsConfig, split: str, seed: int,
                   label: int) -> np.ndarray:
    """(n, 3) crops (y, x, flip) inside the split's region, from default_rng([seed, label, split])."""
    h, w = photo_shape
    x0, x1 = region_columns(w, cfg, split)
    n = cfg.train_per_class if split == "train" else cfg.heldout_per_class
    rng = np.random.default_rng([seed, label, SPLITS.index(split)])
    y = rng.integers(0, h - cfg.resolution + 1, n)
    x = rng.integers(x0, x1 - cfg.resolution + 1, n)
    flip = rng.integers(0, 2, n)
    return np.stack([y, x, flip], axis=1).astype(np.int64)


def load_photos_split(split: str = "train", seed: int = 0, cfg: PhotoCropsConfig = PhotoCropsConfig()) -> PhotosData:
    """The photo crops, one split ('train' or 'heldout'), in the model range [-1, 1], class-ordered."""
    if split not in SPLITS:
        raise ValueError(f"unknown photos split {split!r}; choose from {SPLITS}")
    photos = load_photos(cfg.short_side)
    crops, labels, positions = [], [], []
    r = cfg.resolution
    for label, photo in enumerate(photos):
        pos = crop_positions(photo.shape[:2], cfg, split, seed, label)
        for y, x, flip in pos:
            c = photo[y:y + r, x:x + r]
            crops.append(c[:, ::-1] if flip else c)
        labels.append(np.full(len(pos), label, dtype=np.int64))
        positions.append(pos)
    arr = np.ascontiguousarray(np.stack(crops))  # (N, R, R, 3) uint8
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    return PhotosData(images=images.contiguous(), labels=torch.from_numpy(np.concatenate(labels)), split=split,
                      seed=seed, positions=np.concatenate(positions))
