"""The feature networks of the embedded data sets: a small CNN classifier whose penultimate layer is the metrics' feature space.

On the embedded default (8x8 digits) Inception-v3 is meaningless, so Fréchet distance, precision /
recall and the Inception Score are computed on this classifier instead: ``features(x)`` is the
``feature_dim``-vector before the class head (after a GELU: unlike ReLU, its units cannot die, so
every dimension carries information), ``forward(x)``
the 10 logits. Inputs are (N, 1, 8, 8) in the model range [-1, 1].

Training uses light augmentation (shifts of up to 1 pixel, Gaussian pixel noise) so the features
stay well-behaved on generated samples, which are never exactly like the training digits.
The shipped weights (``assets/digits_classifier.safetensors``) and their held-out accuracy are
described in docs/digits.md. The same network, trained on the photo crops (``data='photos'``,
(N, 3, 16, 16), no shifts since a background fill would be visible), is
``assets/photos_classifier.safetensors`` (docs/photos.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ardistill.data.digits import (
    DIGITS_CHANNELS,
    DIGITS_CLASSES,
    DIGITS_RESOLUTION,
    DigitsData,
    load_digits_split,
    random_shift,
)
from ardistill.io.fileio import atomic_write_json

CLASSIFIER_DATA = ("digits", "photos")

CLASSIFIER_KIND = "digits-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the digits classifier."""

    in_channels: int = DIGITS_CHANNELS
    input_size: int = DIGITS_RESOLUTION
    num_classes: int = DIGITS_CLASSES
    width: int = 32  # channels of the first conv; the next two have 2 * width
    feature_dim: int = 64

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"ClassifierConfig.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.input_size % 4:
            raise ValueError(f"ClassifierConfig.input_size must be a multiple of 4 (two 2x poolings), "
                             f"got {self.input_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ClassifierConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool CNN; ``features`` = penultimate GELU layer, ``forward`` = class logits."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, H/2, W/2)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
        )
        self.fc = nn.Linear(2 * w * (cfg.input_size // 4) ** 2, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> penultimate features (B, feature_dim)."""
        return F.gelu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Everything that determines a classifier training run (saved in the checkpoint's metadata)."""

    data: str = "digits"  # 'digits', 'photos' or an image folder (root/<class>/<images>): your own data
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, cosine decay to 0 over the run
    weight_decay: float = 1e-4
    augment_shift: int | None = None  # random translation by up to this many pixels (None: 1 digits, 0 photos)
    noise_std: float = 0.1  # Gaussian pixel noise added to the inputs (model range [-1, 1])
    width: int = 32
    feature_dim: int = 64
    seed: int = 0
    data_seed: int = 0
    heldout_fraction: float = 0.2  # digits, or an image folder without heldout_data: per class
    image_size: int = 32  # image folders: ADM centre-crop size (that of the teacher's samples)
    heldout_data: str | None = None  # image folders: a held-out folder with the same classes

    def __post_init__(self):
        if self.data not in CLASSIFIER_DATA and not Path(self.data).is_dir():
            raise ValueError(f"ClassifierTrainConfig.data must be one of {CLASSIFIER_DATA} or an image folder, "
                             f"got {self.data!r} (no such folder)")
        if self.heldout_data is not None and self.data in CLASSIFIER_DATA:
            raise ValueError(f"ClassifierTrainConfig.heldout_data is for image folders, not {self.data!r}")
        if self.augment_shift is None:
            object.__setattr__(self, "augment_shift", 1 if self.data == "digits" else 0)
        if self.data != "digits" and self.augment_shift:
            raise ValueError(f"ClassifierTrainConfig.augment_shift must be 0 for {self.data!r} (shifts fill with "
                             "background)")
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"ClassifierTrainConfig.image_size must be a multiple of 4, got {self.image_size}")
        for name in ("epochs", "batch_size", "width", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.noise_std < 0 or self.augment_shift < 0:
            raise ValueError("ClassifierTrainConfig: lr must be > 0; weight_decay, noise_std, augment_shift >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"ClassifierTrainConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierResult:
    """Where the trained classifier went and how well it does."""

    path: Path
    train_accuracy: float
    heldout_accuracy: float
    wall_s: float


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 512) -> float:
    """Fraction of ``data`` classified correctly."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits = model(data.images[i:i + batch_size])
        correct += int((logits.argmax(1) == data.labels[i:i + batch_size]).sum())
    return correct / len(data)


def train_classifier(cfg: ClassifierTrainConfig, out: str | Path, progress: bool = True) -> ClassifierResult:
    """Train the classifier of ``cfg.data`` on its train split and save it (safetensors, config in the metadata).

    Args:
        cfg: the run's configuration.
        out: the .safetensors file to write; the held-out accuracy goes into its metadata.
        progress: show a tqdm progress bar over epochs.
    """
    from tqdm import tqdm

    from ardistill.io.checkpoints import save_model

    t_start = time.time()
    train, heldout = classifier_splits(cfg)
    c, size = train.images.shape[1], train.images.shape[2]
    own = cfg.data not in CLASSIFIER_DATA  # your own data: classes are its sub-folders, not the labels seen
    num_classes = len(train.classes) if own else int(train.labels.max()) + 1
    mcfg = ClassifierConfig(in_channels=c, input_size=size, num_classes=num_classes,
                            width=cfg.width, feature_dim=cfg.feature_dim)
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = DigitsClassifier(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step = 0
    bar = tqdm(range(cfg.epochs), disable=not progress, desc="train-classifier")
    for _ in bar:
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = random_shift(train.images[idx], cfg.augment_shift, gen)
            x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    result = ClassifierResult(path=Path(out), train_accuracy=accuracy(model, train),
                              heldout_accuracy=accuracy(model, heldout), wall_s=time.time() - t_start)
    summary = {"train_config": cfg.to_dict(), "train_accuracy": result.train_accuracy,
               "heldout_accuracy": result.heldout_accuracy, "heldout_images": len(heldout)}
    if own:  # the class order the labels follow
        summary["classes"] = list(train.classes)
    save_model(model, asdict(mcfg), out, kind=CLASSIFIER_KIND, extra_metadata=summary)
    atomic_write_json(Path(out).with_suffix(".json"), {"model": asdict(mcfg), **summary,
                                                        "wall_s": round(result.wall_s, 1)})
    return result


def classifier_splits(cfg: ClassifierTrainConfig):
    """(train, held-out) splits of the classifier's data set."""
    if cfg.data not in CLASSIFIER_DATA:
        from ardistill.data.sources import image_folder_splits
        return image_folder_splits(cfg.data, cfg.image_size, cfg.heldout_data, cfg.heldout_fraction, cfg.data_seed)
    if cfg.data == "photos":
        from ardistill.data.photos import load_photos_split
        return load_photos_split("train", seed=cfg.data_seed), load_photos_split("heldout", seed=cfg.data_seed)
    return (load_digits_split("train", seed=cfg.data_seed, heldout_fraction=cfg.heldout_fraction),
            load_digits_split("heldout", seed=cfg.data_seed, heldout_fraction=cfg.heldout_fraction))


def load_photos_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The photos classifier from a file (None = the shipped one), eval mode."""
    from ardistill.assets import PHOTOS_CLASSIFIER, shipped
    return load_digits_classifier(shipped(PHOTOS_CLASSIFIER, "photos classifier") if path is None else path)


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """A digits classifier from a file written by ``train_classifier`` (None = the shipped one), eval mode."""
    from ardistill.assets import DIGITS_CLASSIFIER, shipped
    from ardistill.io.checkpoints import (
        CheckpointError,
        check_state_dict,
        load_state_and_config,
    )

    path = shipped(DIGITS_CLASSIFIER, "digits classifier") if path is None else Path(path)
    state, config, metadata = load_state_and_config(path)
    if metadata.get("kind") != CLASSIFIER_KIND:
        raise CheckpointError(f"{path} holds a {metadata.get('kind')!r} model, not a {CLASSIFIER_KIND!r}")
    try:
        model = DigitsClassifier(ClassifierConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid classifier config: {e}") from e
    check_state_dict(model.state_dict(), state, str(path))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
