"""What a comparison is measured on: a benchmark's shipped teacher, its real data and its feature network.

Class-conditional: the embedded digits and photos (``BENCHMARKS``), or your own image folders with a
classifier trained on them (``FolderBenchmark``). Text-to-image: the two-digit benchmark (``DIGIT_PAIRS``,
data/digit_pairs.py), whose captions come in a training set and two evaluation sets, seen and held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch


@dataclass(frozen=True)
class Benchmark:
    """An embedded benchmark: the shipped teacher, the feature network of its metrics, its real images."""

    name: str
    teacher_asset: str  # attribute of ardistill.assets
    features: str  # a key of evaluation.features.FEATURE_NETWORKS
    description: str  # how the real reference is described in reports

    def teacher_path(self) -> Path:
        import ardistill.assets as assets
        return assets.shipped(getattr(assets, self.teacher_asset), f"{self.name} teacher")

    @property
    def gan_real(self) -> str:
        """The GAN stage's real images (GANConfig.real): the benchmark's training split."""
        return self.name

    def feature_network(self, device=None):
        from ardistill.evaluation.features import get_feature_network
        return get_feature_network(self.features, device=device)

    def real_images(self, split: str) -> torch.Tensor:
        """The benchmark's real images of one split ('train' or 'heldout'), (N, C, H, W) in [-1, 1]."""
        if self.name == "photos":
            from ardistill.data.photos import load_photos_split
            return load_photos_split(split).images
        from ardistill.data.digits import load_digits_split
        return load_digits_split(split).images


@dataclass(frozen=True)
class FolderBenchmark:
    """Your own data as a benchmark: the images a teacher was trained on, held-out images of the same
    classes (ImageNet-layout folders) and a classifier trained on them (``ardistill train-classifier
    --data TRAIN --heldout-data HELDOUT --image-size N``), whose features give FD, precision/recall and IS.
    Images are ADM centre-cropped to the classifier's input size. There is no shipped teacher."""

    train: str
    heldout: str
    classifier: str
    name: str = "folder"

    @property
    def description(self) -> str:
        return f"the held-out images of {self.heldout}"

    @property
    def features(self) -> str:
        return "classifier"

    @property
    def gan_real(self) -> str:
        return self.train

    @cached_property
    def _classifier(self):
        from ardistill.evaluation.classifier import load_digits_classifier
        return load_digits_classifier(self.classifier)

    def teacher_path(self) -> Path:
        raise ValueError("benchmark 'folder' (your own data) has no shipped teacher: give --teacher")

    def feature_network(self, device=None):
        from ardistill.evaluation.features import get_feature_network
        return get_feature_network("classifier", classifier=self._classifier, device=device)

    def real_images(self, split: str) -> torch.Tensor:
        from ardistill.data.sources import load_image_folder
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
        return load_image_folder(self.train if split == "train" else self.heldout,
                                 self._classifier.cfg.input_size).images


def get_benchmark(cfg) -> "Benchmark | FolderBenchmark":
    """The benchmark a class-conditional comparison (a CompareConfig) evaluates against: an embedded one, or
    your own data ('folder')."""
    if cfg.benchmark == "folder":
        return FolderBenchmark(cfg.real_train, cfg.real_heldout, cfg.classifier)
    return BENCHMARKS[cfg.benchmark]


BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark("digits", "DIGITS_TEACHER", "digits", "the held-out digits split (359 images)"),
    "photos": Benchmark("photos", "PHOTOS_TEACHER", "photos",
                        "the held-out photo crops (2000 images from regions no training crop touches)"),
}


@dataclass(frozen=True)
class DigitPairsBenchmark:
    """The text-to-image benchmark: two digits side by side, captioned (data/digit_pairs.py). Captions of
    the pairs the teacher saw train the students; evaluation has two caption sets, seen pairs and held-out
    pairs (never in teacher training), each with real pairs of the digits' held-out images as reference.
    The shipped digits classifier reads each half (adherence) and gives the features (FD, precision/recall)."""

    # (report name, pair set, caption seed) of each evaluation set
    eval_sets: tuple[tuple[str, str, int], ...] = (("seen", "seen", 1), ("held-out", "heldout", 2))
    name: str = "digit pairs"

    def teacher_path(self) -> Path:
        """The shipped digit-pairs text teacher (assets/)."""
        from ardistill.assets import DIGITS_T2I_TEACHER, shipped
        return shipped(DIGITS_T2I_TEACHER, "digit-pairs text teacher")

    @property
    def set_names(self) -> list[str]:
        return [name for name, _, _ in self.eval_sets]

    def caption_sets(self, train_prompts: int, eval_count: int) -> dict:
        """'train' (seen pairs, the digits' training images) and each evaluation set: name -> DigitPairs."""
        from ardistill.data.digit_pairs import make_digit_pairs
        sets = {"train": make_digit_pairs(train_prompts, split="train", pairs="seen", seed=0)}
        for name, pairs, seed in self.eval_sets:
            sets[name] = make_digit_pairs(eval_count, split="heldout", pairs=pairs, seed=seed)
        return sets

    def real_pairs(self, name: str, count: int, draw: int):
        """Real pairs of an evaluation set's pair kind from the held-out digits; ``draw`` offsets the set's
        seed (100: the FD reference, 200: an independent draw read against its own digits)."""
        from ardistill.data.digit_pairs import make_digit_pairs
        pairs, seed = next((p, s) for n, p, s in self.eval_sets if n == name)
        return make_digit_pairs(count, split="heldout", pairs=pairs, seed=draw + seed)

    def classifier(self, device=None):
        """The shipped digits classifier, in eval mode on ``device``."""
        from ardistill.evaluation.classifier import load_digits_classifier
        return load_digits_classifier().to(device).eval()


DIGIT_PAIRS = DigitPairsBenchmark()
