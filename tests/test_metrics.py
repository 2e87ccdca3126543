"""Metric formulas on cases with known answers; streaming statistics against numpy; two ranks under gloo."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ardistill.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    gather_features,
    inception_score,
    manifold_coverage,
    manifold_radii,
    precision_recall,
)

# metric formulas against closed forms and numpy, in float64: the tolerances are far above float64 rounding
pytestmark = pytest.mark.numerics


def _np_stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------- Fréchet distance

def test_fd_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = _np_stats(x)
    fd = frechet_distance(mu, sigma, mu, sigma)
    assert abs(fd) < 1e-6 * np.trace(sigma)


def test_fd_unit_covariances_is_squared_mean_distance():
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 2.5])
    assert frechet_distance(mu1, np.eye(3), mu2, np.eye(3)) == pytest.approx(1 + 9 + 4, abs=1e-9)


def test_fd_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expect, rel=1e-10)


def test_fd_hand_computed_2d_cases():
    # sigma2 = [[2, 1], [1, 2]] has eigenvalues 3 and 1, so tr sqrt(I sigma2) = sqrt(3) + 1
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    s2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert frechet_distance(mu1, np.eye(2), mu2, s2) == pytest.approx(5 + 2 + 4 - 2 * (math.sqrt(3) + 1), abs=1e-9)
    # a singular sigma2: sigma1 sigma2 = [[2, 0], [1, 0]] has eigenvalues 2 and 0 -> 4 + 1 - 2 sqrt(2)
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(4 + 1 - 2 * math.sqrt(2), abs=1e-6)


def test_fd_general_matches_symmetric_formula():
    # tr sqrt(s1 s2) = tr sqrt(s1^(1/2) s2 s1^(1/2)), computed here by eigendecompositions
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)


def test_fd_singular_fallback_and_imaginary_parts(monkeypatch):
    import ardistill.evaluation.metrics as m

    real_sqrtm, calls = m._sqrtm, []

    def flaky(a):  # the first product is "singular": non-finite square root, as scipy gives
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(m, "_sqrtm", flaky)
    with pytest.warns(UserWarning, match="adding 0.001 to the diagonals"):
        fd = frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), eps=1e-3)
    np.testing.assert_allclose(calls[1], np.eye(2) * 1.001 ** 2)  # (sigma1 + eps I)(sigma2 + eps I)
    assert fd == pytest.approx(2 + 2 - 2 * 2 * 1.001, abs=1e-12)
    # round-off imaginary parts are dropped; a large one on the diagonal is an error
    monkeypatch.setattr(m, "_sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0.0, abs=1e-8)
    # a large one: for covariances, the symmetric form gives the same distance (pytorch-fid raises here)
    monkeypatch.setattr(m, "_sqrtm", lambda a: real_sqrtm(a) + 0.5j)
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) * 2  # few samples: rank-deficient covariances
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    s1[:, 2] = s1[2, :] = 0.0  # and a singular one
    with pytest.warns(UserWarning, match="symmetric form"):
        fd = frechet_distance(np.ones(3), s1, np.zeros(3), s2)
    monkeypatch.setattr(m, "_sqrtm", real_sqrtm)
    assert fd == pytest.approx(frechet_distance(np.ones(3), s1, np.zeros(3), s2), rel=1e-6)
    # inputs that are not covariances still raise
    monkeypatch.setattr(m, "_sqrtm", lambda a: real_sqrtm(a) + 0.5j)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


def test_fd_shape_errors():
    with pytest.raises(ValueError, match="mean vectors differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"covariances must both be \(2, 2\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# ----------------------------------------------------------------------------- streaming statistics

@pytest.mark.parametrize("chunk", [1, 7, 50, 101])
def test_feature_stats_equal_numpy_whatever_the_chunking(chunk):
    x = np.random.default_rng(4).normal(loc=3.0, size=(101, 5)) @ np.diag([1, 2, 3, 4, 5])
    stats = FeatureStats()
    for j, i in enumerate(range(0, len(x), chunk)):
        part = x[i:i + chunk]
        stats.update(torch.from_numpy(part) if j % 2 else part)  # numpy or torch batches
    mu, sigma = stats.mu_sigma()
    ref_mu, ref_sigma = _np_stats(x)
    assert stats.count == 101 and mu.dtype == np.float64
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-10)


def test_feature_stats_merge_and_fd_of_identical_sets():
    x = np.random.default_rng(5).normal(size=(60, 4))
    a, b, whole = FeatureStats(), FeatureStats(), FeatureStats().update(x)
    a.update(x[:25])
    b.update(x[25:])
    merged = FeatureStats().merge(a).merge(b).merge(FeatureStats())
    for m, w in zip(merged.mu_sigma(), whole.mu_sigma()):
        np.testing.assert_allclose(m, w, rtol=1e-12, atol=1e-14)
    assert abs(frechet_distance(*merged.mu_sigma(), *whole.mu_sigma())) < 1e-9


def test_feature_stats_errors():
    s = FeatureStats().update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        s.mu_sigma()
    with pytest.raises(ValueError, match="dimension changed: accumulated 3, got 4"):
        s.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        s.update(np.zeros(3))
    with pytest.raises(ValueError, match="no feature vectors"):
        FeatureStats().mean()


def test_gather_features_single_process_is_identity():
    x = torch.randn(5, 3)
    assert torch.equal(gather_features(x), x)


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from ardistill.io import distributed
    from ardistill.evaluation.metrics import FeatureStats, gather_features

    distributed.init("cpu")
    r = distributed.rank()
    x = np.load(sys.argv[1])
    shard = x[:7] if r == 0 else x[7:]  # uneven shards
    stats = FeatureStats()
    for i in range(0, len(shard), 4):
        stats.update(torch.from_numpy(shard[i:i + 4]))
    stats.all_reduce()
    empty = FeatureStats()  # rank 1 sees no samples at all
    if r == 0:
        empty.update(x[:3])
    empty.all_reduce()
    gathered = gather_features(torch.from_numpy(shard))
    if r == 0:
        mu, sigma = stats.mu_sigma()
        mu_e, sigma_e = empty.mu_sigma()
        np.savez(sys.argv[2], count=stats.count, mu=mu, sigma=sigma, count_e=empty.count, mu_e=mu_e,
                 sigma_e=sigma_e, gathered=gathered.numpy())
    distributed.cleanup()
""")


@pytest.mark.slow
def test_two_process_gloo_stats_equal_single_process(tmp_path):
    x = np.random.default_rng(6).normal(size=(19, 3))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    mu, sigma = _np_stats(x)
    assert int(out["count"]) == 19
    np.testing.assert_allclose(out["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(out["sigma"], sigma, rtol=1e-10)
    assert int(out["count_e"]) == 3
    np.testing.assert_allclose(out["sigma_e"], np.cov(x[:3], rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(out["gathered"], x)


# ----------------------------------------------------------------------------- Inception Score

def test_is_uniform_predictions_is_one():
    assert inception_score(probs=np.full((20, 7), 1 / 7), splits=2) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(torch.zeros(20, 7), splits=4)[0] == pytest.approx(1.0, abs=1e-12)


def test_is_confident_distinct_one_hot_is_num_classes():
    probs = np.eye(10)[np.arange(100) % 10]
    mean, std = inception_score(probs=probs, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # large logits approach the same limit
    assert inception_score(torch.from_numpy(probs) * 60.0, splits=5)[0] == pytest.approx(10.0, rel=1e-9)


def test_is_hand_computed_and_splits():
    # p1 = (1/2, 1/2), p2 = (1, 0): p(y) = (3/4, 1/4); KL1 = 1/2 ln(2/3) + 1/2 ln 2, KL2 = ln(4/3)
    kl = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2)) + 0.5 * math.log(4 / 3)
    assert inception_score(probs=[[0.5, 0.5], [1.0, 0.0]], splits=1) == pytest.approx((math.exp(kl), 0.0))
    # consecutive equal splits: first half distinct one-hot (IS 2), second half one class (IS 1)
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert inception_score(probs=probs, splits=2) == pytest.approx((1.5, 0.5))
    # logits and their softmax agree
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    a = inception_score(logits, splits=3)
    b = inception_score(probs=torch.softmax(logits.double(), 1), splits=3)
    assert a == pytest.approx(b, rel=1e-12)


def test_is_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        inception_score(np.zeros((4, 2)), probs=np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="exactly one"):
        inception_score()
    with pytest.raises(ValueError, match=r"splits must be in \[1, N = 4\]"):
        inception_score(np.zeros((4, 2)), splits=5)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(probs=np.full((4, 2), 0.3))


# ----------------------------------------------------------------------------- precision / recall

def _brute_force_pr(real, fake, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]
    rr, rf = radii(real), radii(fake)
    d = ((fake[:, None] - real[None]) ** 2).sum(-1)  # (fake, real)
    return (d <= rr[None]).any(1).mean(), (d.T <= rf[None]).any(1).mean()


def test_pr_identical_sets_is_one_one():
    x = np.random.default_rng(7).normal(size=(40, 8))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_pr_disjoint_far_sets_is_zero_zero():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


@pytest.mark.parametrize("fp16", [False, True])
def test_pr_hand_computed_subset_cases(fp16):
    # k = 1, real {0, 1, 2, 3}, fake {0, 1, 10, 11}: all squared radii are 1.
    # precision: 0 and 1 are inside, 10 and 11 are not -> 1/2;
    # recall: 0, 1 inside, 2 is at squared distance 1 = radius of fake point 1 (boundary counts) -> 3/4.
    real, fake = np.array([[0.0], [1], [2], [3]]), np.array([[0.0], [1], [10], [11]])
    assert precision_recall(real, fake, k=1, fp16=fp16) == (0.5, 0.75)
    # k = 3, real {0..4}: squared radii (9, 4, 4, 4, 9); fake {-3, 7, 20, 21, 22, 23}:
    # -3 reaches 0 (9 <= 9), 7 reaches 4 (9 <= 9), 20..23 reach nothing -> precision 2/6;
    # fake -3 has squared radius 24^2 (its 3rd neighbour is 21) and covers every real point -> recall 1.
    # exact even in fp16: every distance and radius here is a small integer (< 2048), so every partial sum
    # is exact whatever order a kernel adds in
    real = np.arange(5.0)[:, None]
    fake = np.array([-3.0, 7, 20, 21, 22, 23])[:, None]
    np.testing.assert_array_equal(manifold_radii(real, k=3, fp16=fp16).numpy(), [9, 4, 4, 4, 9])
    np.testing.assert_array_equal(manifold_radii(fake, k=3, fp16=fp16).numpy(), [576, 196, 9, 4, 4, 9])
    assert precision_recall(real, fake, k=3, fp16=fp16) == pytest.approx((1 / 3, 1.0))


def test_pr_blocked_equals_brute_force():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(53, 6)).astype(np.float32)
    fake = (rng.normal(size=(41, 6)) * 1.3 + 0.4).astype(np.float32)
    expect = _brute_force_pr(real.astype(np.float64), fake.astype(np.float64), k=3)
    # float32 blocked distances vs float64: exact fractions are still right, since every distance here is at
    # least 3e-4 of |a|^2 + |b|^2 away from the radius it is compared with, 1000x float32 rounding
    for bs in (5, 17, 10000):
        assert precision_recall(torch.from_numpy(real), fake, k=3, batch_size=bs) == pytest.approx(expect)
    assert 0 < expect[0] < 1 and 0 < expect[1] < 1  # a case that exercises both sides


def test_manifold_errors_and_coverage_shapes():
    with pytest.raises(ValueError, match="1 <= k < N; got k = 3, N = 3"):
        manifold_radii(np.zeros((3, 2)), k=3)
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        manifold_coverage(x, torch.zeros(4), np.zeros((4, 3)), torch.zeros(4))
    with pytest.raises(ValueError, match="radii must be"):
        manifold_coverage(x, torch.zeros(3), x, torch.zeros(4))
