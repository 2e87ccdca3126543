"""Your own data end to end: image folders -> train-teacher, train-classifier -> demo --benchmark folder (with GAN)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ardistill.comparison import CompareConfig, compare, get_benchmark
from ardistill.data.sources import image_folder_splits, load_image_folder
from ardistill.evaluation.classifier import ClassifierTrainConfig, load_digits_classifier, train_classifier

CLASSES = ("red", "green", "blue")


def _folder(root, per_class: int, seed: int, classes=CLASSES):
    """Class c: noisy images whose channel c is bright (learnable by a tiny CNN in a few epochs)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (12, 12, 3), dtype=np.uint8)
            img[..., c % 3] += 160
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_image_folder_splits_are_disjoint_seeded_and_keep_every_class(tmp_path):
    root = _folder(tmp_path / "d", per_class=6, seed=0)
    tr, ho = image_folder_splits(root, 8, heldout_fraction=0.34, seed=1)
    assert len(tr) + len(ho) == 18 and len(ho) == 6  # two of each class held out
    assert sorted(ho.labels.tolist()) == [0, 0, 1, 1, 2, 2] and set(tr.labels.tolist()) == {0, 1, 2}
    every = load_image_folder(root, 8).images.flatten(1)
    rows = lambda x: {tuple(r.tolist()) for r in x.images.flatten(1)}  # noqa: E731
    assert not rows(tr) & rows(ho) and len(rows(tr) | rows(ho)) == len(every)
    tr2, ho2 = image_folder_splits(root, 8, heldout_fraction=0.34, seed=1)
    assert torch.equal(ho.images, ho2.images)
    _, ho3 = image_folder_splits(root, 8, heldout_fraction=0.34, seed=2)
    assert not torch.equal(ho.images, ho3.images)


def test_a_heldout_folder_must_have_the_same_classes(tmp_path):
    _folder(tmp_path / "train", 2, 0)
    _folder(tmp_path / "val", 2, 1, classes=("red", "green", "yellow"))
    with pytest.raises(ValueError, match="same class sub-folders"):
        image_folder_splits(tmp_path / "train", 8, heldout=tmp_path / "val")
    with pytest.raises(ValueError, match="no such folder"):
        ClassifierTrainConfig(data=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="heldout_data is for image folders"):
        ClassifierTrainConfig(data="photos", heldout_data=str(tmp_path / "val"))


def test_train_classifier_on_a_folder_from_the_cli(tmp_path):
    from ardistill.cli import main
    _folder(tmp_path / "train", 8, 0)
    _folder(tmp_path / "val", 4, 1)
    out = tmp_path / "clf.safetensors"
    assert main(["train-classifier", "--data", str(tmp_path / "train"), "--heldout-data", str(tmp_path / "val"),
                 "--image-size", "8", "--epochs", "15", "--batch-size", "8", "--no-progress", "--threads", "1"]
                + ["--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["classes"] == sorted(CLASSES) and summary["heldout_images"] == 12
    assert summary["heldout_accuracy"] >= 0.9  # the classes differ by a bright channel
    clf = load_digits_classifier(out)
    assert (clf.cfg.in_channels, clf.cfg.input_size, clf.cfg.num_classes) == (3, 8, 3)


def test_folder_benchmark_needs_its_parts_and_rejects_a_teacher_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="needs real_train, real_heldout, classifier, teacher"):
        CompareConfig(benchmark="folder")
    with pytest.raises(ValueError, match="for benchmark 'folder'"):
        CompareConfig(benchmark="photos", classifier="x")


@pytest.mark.slow
def test_demo_on_your_own_data_end_to_end_with_gan(tmp_path, monkeypatch):
    """train-teacher --data FOLDER, train-classifier --data FOLDER, then demo --teacher ... --real-* --classifier
    --gan through the CLI: the report's reference is the held-out folder, the GAN's real images the training one."""
    import ardistill.training.finetune_gan as fg
    from ardistill.cli import main
    for k, v in dict(steps=2, gan_warmup=1, batch_size=8).items():
        monkeypatch.setitem(fg.DIGITS_GAN_SETTINGS, k, v)
    train, val = _folder(tmp_path / "train", 8, 0), _folder(tmp_path / "val", 4, 1)
    assert main(["train-teacher", "--data", str(train), "--image-size", "8", "--model", "DiT-T/2", "--steps", "3",
                 "--batch-size", "8", "--out", str(tmp_path / "t"), "--no-progress", "--threads", "1"]) == 0
    assert main(["train-classifier", "--data", str(train), "--heldout-data", str(val), "--image-size", "8",
                 "--epochs", "2", "--out", str(tmp_path / "clf.safetensors"), "--no-progress"]) == 0
    teacher = str(tmp_path / "t" / "teacher.safetensors")
    own = ["--teacher", teacher, "--real-train", str(train), "--real-heldout", str(val),
           "--classifier", str(tmp_path / "clf.safetensors")]
    assert main(["demo", *own, "--benchmark", "photos"]) == 2  # own data flags with an embedded benchmark
    assert main(["demo", *own, "--out", str(tmp_path / "demo"), "--train-count", "16", "--eval-count", "12",
                 "--steps", "2", "--batch-size", "8", "--gan", "--no-progress"]) == 0
    m = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert m["models"][0]["name"] == "held-out real folder (vs train split)"
    assert all(np.isfinite(r["fd"]) for r in m["models"])
    report = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "ARD (R+G)" in report and str(val) in report
    gan = json.loads((tmp_path / "demo" / "students" / next(
        p.name for p in (tmp_path / "demo" / "students").iterdir() if p.name.endswith("-gan")) / "config.json")
        .read_text())["gan"]
    assert gan["real"] == str(train.resolve())
    cfg = json.loads((tmp_path / "demo" / "config.json").read_text())["compare"]
    bench = get_benchmark(CompareConfig(**{**cfg, "seeds": tuple(cfg["seeds"])}))
    assert cfg["benchmark"] == "folder" and bench.heldout == str(val) and bench.gan_real == str(train)
