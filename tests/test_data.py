"""The embedded digits: deterministic stratified split, value range, conversions, shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ardistill.data.digits import (
    load_digits_split,
    random_shift,
    stratified_split,
    to_model_range,
    to_uint8,
)


def test_split_is_deterministic_disjoint_and_complete():
    a, b = load_digits_split("train"), load_digits_split("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    held = load_digits_split("heldout")
    assert (len(a), len(held)) == (1438, 359)
    assert not set(a.indices) & set(held.indices)
    assert sorted(set(a.indices) | set(held.indices)) == list(range(1797))
    other = load_digits_split("heldout", seed=1)
    assert len(other) == len(held) and not np.array_equal(other.indices, held.indices)


def test_split_is_stratified():
    full = load_digits_split("all").labels.numpy()
    held = load_digits_split("heldout").labels.numpy()
    per_class = np.bincount(full, minlength=10)
    held_per_class = np.bincount(held, minlength=10)
    assert np.all(np.abs(held_per_class - 0.2 * per_class) <= 0.5)  # round(0.2 * n) in every class
    assert held_per_class.tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        stratified_split(np.zeros(10, dtype=int), 1.0, 0)


def test_shapes_dtypes_and_value_range():
    d = load_digits_split("train")
    assert d.images.shape == (1438, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.labels.dtype == torch.int64 and set(d.labels.tolist()) == set(range(10))
    assert d.images.min() == -1 and d.images.max() == 1
    # values are p / 8 - 1 for integer p in 0..16
    p = (d.images + 1) * 8
    assert torch.equal(p, p.round())


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'test'"):
        load_digits_split("test")


def test_conversions_round_trip():
    assert to_model_range(np.array([0, 8, 16])).tolist() == [-1.0, 0.0, 1.0]
    u = to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2))
    assert u.shape == (1, 2, 2, 1) and u.dtype == np.uint8
    assert u.ravel().tolist() == [0, 128, 255, 255]  # 0 -> 127.5 rounds to 128; out of range is clipped


def test_random_shift_moves_by_at_most_the_limit():
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, 0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift(x, 0, g), x)
    y = random_shift(x, 1, g)
    assert torch.all((y == 1).flatten(1).sum(1) == 1)  # the ink pixel is kept, background filled with -1
    pos = (y[:, 0] == 1).nonzero()[:, 1:]
    assert ((pos - 4).abs() <= 1).all() and len({tuple(p.tolist()) for p in pos}) > 1
