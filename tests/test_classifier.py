"""The digits classifier: trains, saves and loads; the shipped one is accurate on held-out digits."""

from __future__ import annotations

import json

import pytest
import torch

from ardistill.assets import DIGITS_CLASSIFIER
from ardistill.io.checkpoints import CheckpointError, save_model
from ardistill.evaluation.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    DigitsClassifier,
    accuracy,
    load_digits_classifier,
    train_classifier,
)
from ardistill.data.digits import load_digits_split




def test_shapes():
    m = DigitsClassifier(ClassifierConfig(width=8, feature_dim=16))
    x = torch.zeros(5, 1, 8, 8)
    assert m.features(x).shape == (5, 16) and m(x).shape == (5, 10)
    assert (m.features(torch.randn(5, 1, 8, 8)) >= -0.17).all()  # GELU features (its minimum is about -0.17)


def test_train_save_load(tmp_path):
    cfg = ClassifierTrainConfig(epochs=3, width=8, feature_dim=16, lr=1e-2)
    r = train_classifier(cfg, tmp_path / "c.safetensors", progress=False)
    assert r.heldout_accuracy > 0.5  # three epochs of a tiny CNN (0.73 when written): far above chance (0.1)
    model = load_digits_classifier(tmp_path / "c.safetensors")
    assert model.cfg == ClassifierConfig(width=8, feature_dim=16) and not model.training
    assert accuracy(model, load_digits_split("heldout")) == pytest.approx(r.heldout_accuracy)
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["heldout_accuracy"] == r.heldout_accuracy and summary["train_config"]["epochs"] == 3
    again = train_classifier(cfg, tmp_path / "d.safetensors", progress=False)
    assert again.heldout_accuracy == r.heldout_accuracy  # seeded: the same training replayed in one process


def test_loading_another_kind_is_refused(tmp_path):
    save_model(torch.nn.Linear(2, 2), {"x": 1}, tmp_path / "other.safetensors", kind="teacher")
    with pytest.raises(CheckpointError, match="not a 'digits-classifier'"):
        load_digits_classifier(tmp_path / "other.safetensors")


def test_shipped_classifier_is_accurate_on_heldout_digits():
    assert DIGITS_CLASSIFIER.exists()
    model = load_digits_classifier()
    held = load_digits_split("heldout")
    assert len(held) == 359
    assert accuracy(model, held) > 0.97
    with torch.no_grad():
        f = model.features(held.images)
    assert torch.isfinite(f).all() and f.shape == (359, model.cfg.feature_dim)
    assert (f.std(0) > 1e-3).all()  # every feature dimension varies (no dead units)


def test_cli(tmp_path, capsys):
    from ardistill.cli import main
    out = tmp_path / "c.safetensors"
    assert main(["train-classifier", "--out", str(out), "--epochs", "1", "--width", "8", "--feature-dim", "16",
                 "--no-progress"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert load_digits_classifier(out).cfg.feature_dim == 16
