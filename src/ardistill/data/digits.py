"""The embedded default data set: scikit-learn's handwritten digits (no download).

``sklearn.datasets.load_digits`` ships 1797 grey images of 8x8 pixels with integer values 0..16
(16 = ink) and 10 classes (178..183 images each). For the DiT this is ``input_size`` 8,
``in_channels`` 1, and with patch size 2 a sequence of 16 tokens.

Model range: pixels p in 0..16 map to x = p / 8 - 1 in [-1, 1] (background -1, full ink +1).

Split: stratified and deterministic. Within each class, images are shuffled by
``numpy.random.default_rng(seed)`` and the first round(heldout_fraction * n_class) go to the
held-out split. With the defaults (seed 0, fraction 0.2) that is 1438 train and 359 held-out images
(held out per class 0..9: 36 36 35 37 36 36 36 36 35 36); the counts depend only on the class sizes,
the seed only picks which images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGITS_RESOLUTION = 8
DIGITS_CHANNELS = 1
DIGITS_CLASSES = 10
DIGITS_MAX_VALUE = 16  # scikit-learn's pixel values are integers 0..16
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class DigitsData:
    """One split of the digits: images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    split: str
    seed: int
    indices: np.ndarray  # positions in load_digits() order, so the split can be audited

    def __post_init__(self):
        if self.images.shape[1:] != (DIGITS_CHANNELS, DIGITS_RESOLUTION, DIGITS_RESOLUTION):
            raise ValueError(f"DigitsData: images must be (N, 1, 8, 8), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"DigitsData: labels {tuple(self.labels.shape)} do not match "
                             f"{self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """scikit-learn pixel values 0..16 -> float32 in [-1, 1] (x = p / 8 - 1)."""
    p = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return p / (DIGITS_MAX_VALUE / 2) - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model outputs in [-1, 1] (N, C, H, W) -> uint8 0..255 (N, H, W, C); values outside are clipped."""
    if x.dim() != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {tuple(x.shape)}")
    u = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).numpy()


def stratified_split(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) index arrays, sorted; per class, a seeded shuffle and the first round(f * n) held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(heldout_fraction * len(idx)))
        heldout.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def load_digits_split(split: str = "train", seed: int = 0, heldout_fraction: float = 0.2) -> DigitsData:
    """The scikit-learn digits, one split ('train', 'heldout' or 'all'), in the model range [-1, 1]."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose from {SPLITS}")
    from sklearn.datasets import (
        load_digits,  # ships with scikit-learn; imported late to keep start-up fast
    )

    raw = load_digits()
    labels = raw.target.astype(np.int64)
    if split == "all":
        idx = np.arange(len(labels))
    else:
        train, heldout = stratified_split(labels, heldout_fraction, seed)
        idx = train if split == "train" else heldout
    images = to_model_range(raw.images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    return DigitsData(images=images, labels=torch.from_numpy(labels[idx]), split=split, seed=seed, indices=idx)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    m = max_shift
    padded = torch.nn.functional.pad(x, (m, m, m, m), value=-1.0)
    offsets = torch.randint(0, 2 * m + 1, (B, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(B):  # B <= a few hundred 8x8 images: a loop is cheaper than a gather here
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy:dy + H, dx:dx + W]
    return out
