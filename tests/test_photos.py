"""The embedded photos data set: offline, deterministic, held-out regions disjoint from training regions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ardistill.data.photos import (
    PHOTO_CLASS_NAMES,
    PHOTOS_CLASSES,
    PhotoCropsConfig,
    crop_positions,
    load_photos,
    load_photos_split,
    region_columns,
)

SMALL = PhotoCropsConfig(train_per_class=40, heldout_per_class=12)


def _digest(d) -> str:
    return hashlib.sha256(d.images.numpy().tobytes() + d.labels.numpy().tobytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_crops():
    a, b = load_photos_split("train", seed=0, cfg=SMALL), load_photos_split("train", seed=0, cfg=SMALL)
    assert _digest(a) == _digest(b) and np.array_equal(a.positions, b.positions)
    c = load_photos_split("train", seed=1, cfg=SMALL)
    assert _digest(a) != _digest(c)


def test_shapes_range_classes():
    d = load_photos_split("heldout", cfg=SMALL)
    assert d.images.shape == (PHOTOS_CLASSES * 12, 3, 16, 16) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.labels.tolist() == [c for c in range(PHOTOS_CLASSES) for _ in range(12)]
    assert len(PHOTO_CLASS_NAMES) == PHOTOS_CLASSES == 10


def test_heldout_regions_do_not_overlap_training_regions():
    photos = load_photos(SMALL.short_side)
    train, held = load_photos_split("train", cfg=SMALL), load_photos_split("heldout", cfg=SMALL)
    r = SMALL.resolution
    for label, photo in enumerate(photos):
        h, w = photo.shape[:2]
        assert min(h, w) == SMALL.short_side
        tr = train.positions[train.labels.numpy() == label]
        he = held.positions[held.labels.numpy() == label]
        # every training crop ends left of the cut, every held-out crop starts at or right of it
        cut = region_columns(w, SMALL, "heldout")[0]
        assert (tr[:, 1] + r <= cut).all() and (he[:, 1] >= cut).all() and (he[:, 1] + r <= w).all()
        assert (tr[:, 0] + r <= h).all() and (he[:, 0] + r <= h).all()
        # and the pixels are what the positions say (flips included)
        i = int(np.flatnonzero(held.labels.numpy() == label)[0])
        y, x, flip = held.positions[i]
        crop = photo[y:y + r, x:x + r]
        crop = crop[:, ::-1] if flip else crop
        expect = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(held.images[i], expect)


def test_both_splits_use_flips_and_many_positions():
    pos = crop_positions((64, 96), PhotoCropsConfig(), "train", 0, 3)
    assert 0.4 < pos[:, 2].mean() < 0.6 and len({(y, x) for y, x, _ in pos}) > 500


def test_config_is_validated():
    with pytest.raises(ValueError, match="heldout_width"):
        PhotoCropsConfig(heldout_width=8)
    with pytest.raises(ValueError, match="split"):
        load_photos_split("test")
