"""ADM evaluator .npz batches: round trips, streaming, reference statistics and validation errors."""

import os
import re
import zipfile

import numpy as np
import pytest
import torch

from ardistill.evaluation.adm import read_adm_npz, to_uint8_nhwc, write_adm_npz, write_adm_stats
from ardistill.evaluation.metrics import FeatureStats, frechet_distance


def _images(n=10, h=8, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_round_trip_as_the_adm_evaluator_reads_it(tmp_path):
    x, labels = _images(), np.arange(10) % 4
    path = write_adm_npz(tmp_path / "samples.npz", x, labels=labels)
    with np.load(path) as npz:  # what evaluator.py's np.load / zip reader sees
        assert npz["arr_0"].dtype == np.uint8 and np.array_equal(npz["arr_0"], x)
        assert np.array_equal(npz["arr_1"], labels)
    with zipfile.ZipFile(path) as zf:  # stored, not deflated, so arr_0 streams straight from disk
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    batch = read_adm_npz(path)
    assert batch.image_shape == (10, 8, 6, 3) and batch.num_images == 10
    assert np.array_equal(batch.images(), x) and np.array_equal(batch.labels, labels)
    assert [b.shape[0] for b in batch.iter_images(4)] == [4, 4, 2]
    assert np.array_equal(np.concatenate(list(batch.iter_images(3))), x)
    t = torch.cat(list(batch.iter_tensors(4)))  # NCHW for the feature networks
    assert t.dtype == torch.uint8 and torch.equal(t, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert batch.mu is None and batch.stats == {}
    assert [p for p in os.listdir(tmp_path) if p != "samples.npz"] == []  # no temp files left


def test_streaming_write_from_batches(tmp_path):
    x = _images(11, c=1)
    path = write_adm_npz(tmp_path / "s.npz", (x[i:i + 4] for i in range(0, 11, 4)), num_images=11)
    assert np.array_equal(np.load(path)["arr_0"], x)
    with pytest.raises(ValueError, match="num_images = 12 but 11 images were given"):
        write_adm_npz(tmp_path / "short.npz", (x[i:i + 4] for i in range(0, 11, 4)), num_images=12)
    with pytest.raises(ValueError, match="more than num_images = 5"):
        write_adm_npz(tmp_path / "long.npz", iter([x[:4], x[4:8]]), num_images=5)
    with pytest.raises(ValueError, match="num_images is required"):
        write_adm_npz(tmp_path / "n.npz", iter([x]))
    with pytest.raises(ValueError, match=r"batch of int16 \(2, 8, 6, 1\) does not match uint8"):
        write_adm_npz(tmp_path / "d.npz", iter([x[:2], x[2:4].astype(np.int16)]), num_images=4)
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # failed writes leave nothing behind


def test_reads_reference_batches_with_statistics(tmp_path):
    # an ADM reference batch: images plus pool (mu, sigma) and spatial (mu_s, sigma_s) statistics
    rng = np.random.default_rng(1)
    x, f = _images(), rng.normal(size=(50, 4))
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=x, mu=f.mean(0), sigma=np.cov(f, rowvar=False), mu_s=np.zeros(3), sigma_s=np.eye(3))
    batch = read_adm_npz(ref, require_images=True)
    assert set(batch.stats) == {"mu", "sigma", "mu_s", "sigma_s"}
    assert np.array_equal(batch.images(), x)
    stats = FeatureStats().update(f)
    assert abs(frechet_distance(*stats.mu_sigma(), batch.mu, batch.sigma)) < 1e-9
    # compressed archives stream too
    np.savez_compressed(tmp_path / "c.npz", arr_0=x)
    assert np.array_equal(np.concatenate(list(read_adm_npz(tmp_path / "c.npz").iter_images(3))), x)


def test_statistics_only_files(tmp_path):
    path = write_adm_stats(tmp_path / "ref_stats.npz", np.ones(3), np.eye(3))
    batch = read_adm_npz(path)
    assert batch.image_shape is None and np.array_equal(batch.sigma, np.eye(3))
    with pytest.raises(ValueError, match=f"{path}: no 'arr_0'"):
        next(batch.iter_images())
    with pytest.raises(ValueError, match=f"{path}: missing 'arr_0'"):
        read_adm_npz(path, require_images=True)
    write_adm_npz(tmp_path / "both.npz", _images(), stats={"mu": np.zeros(2), "sigma": np.eye(2)})
    assert np.array_equal(read_adm_npz(tmp_path / "both.npz").mu, np.zeros(2))


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "'arr_0' must be uint8 images .* got dtype float32"),
    ({"arr_0": np.zeros((4, 4, 3), np.uint8)}, r"'arr_0' must have rank 4 \(N, H, W, C\); got shape \(4, 4, 3\)"),
    ({"arr_0": np.zeros((2, 3, 4, 4), np.uint8)}, r"'arr_0' must be channels-last .* got shape \(2, 3, 4, 4\)"),
    ({"arr_1": np.zeros(3)}, "missing 'arr_0'"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "mu": np.zeros(3)}, "'mu' and 'sigma' must come together"),
    ({"mu": np.zeros(3), "sigma": np.eye(2)}, r"'sigma' must be a float \(3, 3\) matrix"),
    ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, "'mu' must be a 1-D float array"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "arr_1": np.zeros(3, np.int64)},
     r"'arr_1' \(labels\) must have shape \(2,\)"),
])
def test_validation_errors_name_the_file_and_key(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
        read_adm_npz(path)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADM batch not found"):
        read_adm_npz(tmp_path / "none.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not an .npz"):
        read_adm_npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="must be uint8 images"):
        write_adm_npz(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(2,\)"):
        write_adm_npz(tmp_path / "l.npz", _images(2), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="unknown stats keys"):
        write_adm_npz(tmp_path / "k.npz", _images(2), stats={"mu": np.zeros(2), "sigma": np.eye(2), "fid": 1})


def test_to_uint8_nhwc_uses_dit_rounding():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0]).reshape(1, 1, 1, 7).repeat(2, 3, 2, 1)
    out = to_uint8_nhwc(x)
    assert out.shape == (2, 2, 7, 3) and out.dtype == np.uint8
    # clamp(127.5 x + 128) truncated: 0, 0, 0 (0.1275 -> 0), 128, 191 (191.75), 255, 255
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]
