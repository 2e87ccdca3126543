"""The shipped photos teacher and photos classifier load, match their recorded sha256, and fit the data."""

from __future__ import annotations

import json

import torch

from ardistill.assets import PHOTOS_CLASSIFIER, PHOTOS_CLASSIFIER_CONFIG, PHOTOS_TEACHER, PHOTOS_TEACHER_CONFIG
from ardistill.evaluation.classifier import accuracy, load_photos_classifier
from ardistill.io.checkpoints import load_teacher
from ardistill.io.fileio import sha256_file


def test_teacher_loads_and_matches_its_sidecar():
    side = json.loads(PHOTOS_TEACHER_CONFIG.read_text())
    assert sha256_file(PHOTOS_TEACHER) == side["sha256"]
    assert PHOTOS_TEACHER.stat().st_size < 25 * 2 ** 20
    teacher = load_teacher(PHOTOS_TEACHER)
    c = teacher.cfg
    assert (c.input_size, c.in_channels, c.num_classes, c.prediction) == (16, 3, 10, "eps")
    assert side["train"]["data"] == "photos" and side["model"]["depth"] == c.depth
    with torch.no_grad():
        out = teacher(torch.zeros(2, 3, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([0, 9]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_classifier_loads_matches_its_sidecar_and_its_accuracy():
    from ardistill.data.photos import load_photos_split
    side = json.loads(PHOTOS_CLASSIFIER_CONFIG.read_text())
    assert sha256_file(PHOTOS_CLASSIFIER) == side["sha256"]
    model = load_photos_classifier()
    assert (model.cfg.in_channels, model.cfg.input_size, model.cfg.num_classes) == (3, 16, 10)
    held = load_photos_split("heldout")
    # exact although the sidecar was written on another machine: accuracy counts argmax decisions, and the
    # closest one is 8e-5 of its logits' scale from a tie, 400x the float32 rounding between kernels (2e-7)
    assert abs(accuracy(model, held) - side["heldout_accuracy"]) < 1e-9
    assert side["heldout_accuracy"] > 0.5  # chance is 0.1
