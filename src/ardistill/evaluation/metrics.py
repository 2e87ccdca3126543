"""Sample-quality metrics over any feature function: Fréchet distance, Inception Score, precision/recall.

Statistics are gathered apart from the formulas (as in EDM): ``FeatureStats`` accumulates count,
sum and sum of outer products in float64, batch by batch and across ranks; ``frechet_distance``
only sees (mu, sigma). Precision/recall need every feature vector, so ranks ``gather_features``.

Glossary:
  mu, sigma    mean and covariance (ddof = 1, as ``np.cov``) of the feature vectors
  FD           |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)); FID when the
               features are Inception-v3 pool features
  IS           exp(E_x KL(p(y|x) || p(y))), mean and std over equal splits (improved-GAN)
  k, radius    k-NN manifold of a set: a ball around every point whose radius is the distance to
               its k-th nearest neighbour in the same set (Kynkäänniemi et al. 2019, k = 3 in ADM)
  precision    fraction of generated samples inside the real manifold
  recall       fraction of real samples inside the generated manifold
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from ardistill.io import distributed

ArrayLike = np.ndarray | torch.Tensor


def _as_2d(features: ArrayLike, what: str = "features") -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, F); got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------- streaming statistics

class FeatureStats:
    """Streaming count, sum and sum of outer products of feature vectors (float64), mergeable across ranks."""

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.sum: torch.Tensor | None = None  # (F,)
        self.sum_outer: torch.Tensor | None = None  # (F, F)
        if dim is not None:
            self._allocate(int(dim), torch.device("cpu"))

    @property
    def dim(self) -> int | None:
        return None if self.sum is None else int(self.sum.shape[0])

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: ArrayLike) -> "FeatureStats":
        """Add a batch of feature vectors (N, F); returns self."""
        x = _as_2d(features).to(torch.float64)
        if self.sum is None:
            self._allocate(x.shape[1], x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed: accumulated {self.dim}, got {x.shape[1]}")
        x = x.to(self.sum.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's statistics into this one; returns self."""
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.dim, other.sum.device)
        elif other.dim != self.dim:
            raise ValueError(f"cannot merge feature statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum the statistics over all ranks (every rank must call it); identity in one process."""
        if not distributed.is_distributed():
            return self
        # A rank that saw no samples has no tensors yet: agree on the dimension first.
        dims = {d for d in distributed.all_gather_object(self.dim) if d is not None}
        if len(dims) > 1:
            raise ValueError(f"ranks disagree on the feature dimension: {sorted(dims)}")
        if not dims:
            return self
        if self.sum is None:
            self._allocate(dims.pop(), _collective_device())
        device = self.sum.device
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=device),
                            self.sum, self.sum_outer.flatten()])
        distributed.all_reduce_sum(packed)
        f = self.dim
        self.count = int(round(packed[0].item()))
        self.sum = packed[1:1 + f].clone()
        self.sum_outer = packed[1 + f:].reshape(f, f).clone()
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no feature vectors were accumulated")
        return (self.sum / self.count).cpu().numpy()

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as float64 numpy arrays; sigma uses ddof = 1 like np.cov."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors; have {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _collective_device() -> torch.device:
    """Device that the process group's backend can reduce on (NCCL needs CUDA tensors)."""
    if distributed.is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_features(features: ArrayLike) -> torch.Tensor:
    """Concatenate every rank's (N_r, F) features in rank order (ranks may hold different N_r)."""
    x = _as_2d(features)
    if not distributed.is_distributed():
        return x
    device = _collective_device() if x.device.type == "cpu" else x.device
    x = x.to(device)
    sizes = [int(n) for n in distributed.all_gather_object(int(x.shape[0]))]
    # all_gather needs equal shapes: pad to the largest shard, trim afterwards.
    padded = torch.zeros(max(sizes), x.shape[1], dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# ----------------------------------------------------------------------------- Fréchet distance

def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as in the TTUR / ADM / pytorch-fid code.

    Where that code raises (scipy's square root of the non-symmetric product sigma1 @ sigma2 has a large
    imaginary part, as it can for the near-singular covariances of a collapsed generator or of few
    samples) and both inputs are covariances (symmetric, positive semi-definite to round-off), the trace
    term is computed in the symmetric form tr sqrt(A^1/2 B A^1/2) = tr sqrt(A B) by eigendecomposition
    instead, with a warning; inputs that are not covariances still raise.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: mu1 {mu1.shape}, mu2 {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances must both be {(mu1.shape[0],) * 2}; "
                         f"got sigma1 {sigma1.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product is (near) singular: retry with eps on the diagonals, as the standard code does.
        warnings.warn(f"Fréchet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    tr_covmean = np.trace(covmean.real)
    # Round-off gives a small imaginary part; a large one means near-singular inputs or not covariances.
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        imag = np.abs(covmean.imag).max()
        if not (_is_covariance(sigma1) and _is_covariance(sigma2)):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {imag:.3g}")
        warnings.warn(f"Fréchet distance: sqrtm has an imaginary component {imag:.3g} (near-singular "
                      "covariances); the trace term is computed in the symmetric form instead")
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _is_covariance(s: np.ndarray) -> bool:
    """Symmetric and positive semi-definite up to round-off (relative to its largest eigenvalue)."""
    if not np.allclose(s, s.T, rtol=1e-6, atol=1e-9 * max(np.abs(s).max(), 1e-300)):
        return False
    w = np.linalg.eigvalsh((s + s.T) / 2)
    return bool(w.min() >= -1e-6 * max(w.max(), 0.0))


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(a b) for covariances a, b: the eigenvalues of a^1/2 b a^1/2 (symmetric PSD) are those of a b."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = ra @ ((b + b.T) / 2) @ ra
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; the caller checks finiteness, as the reference code does with disp=False.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- Inception Score

def inception_score(logits: ArrayLike | None = None, *, probs: ArrayLike | None = None,
                    splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` equal consecutive parts of exp(mean KL(p(y|x) || p(y))).

    Pass classifier ``logits`` (N, C) or class probabilities ``probs`` (N, C), not both. With N = 50k
    and 10 splits the parts equal the ADM evaluator's 5000-sample splits.
    """
    if (logits is None) == (probs is None):
        raise ValueError("inception_score takes exactly one of logits or probs")
    if logits is not None:
        log_p = torch.log_softmax(_as_2d(logits, "logits").to(torch.float64), dim=1)
    else:
        p = _as_2d(probs, "probs").to(torch.float64)
        if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
            raise ValueError("probs must be non-negative rows that sum to 1")
        log_p = torch.log(p)  # -inf where p = 0; those terms are dropped below (0 log 0 = 0)
    n = log_p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N = {n}]; got {splits}")
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lp, pp = log_p[i * n // splits:(i + 1) * n // splits], p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.log(pp.mean(0, keepdim=True))
        kl = torch.where(pp > 0, pp * (lp - log_py), torch.zeros_like(pp)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall

class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _sq_distances(a: torch.Tensor, b: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) by the norm expansion, clamped at 0 (ADM's DistanceBlock)."""
    def sq(u, v):
        d = (u * u).sum(1, keepdim=True) - 2 * (u @ v.T) + (v * v).sum(1)[None]
        return d.clamp_min_(0)
    if fp16:
        # ADM quirk: distances in float16, falling back to float32 for a block that overflows.
        d = sq(a.half(), b.half())
        if torch.isfinite(d).all():
            return d.float()
    return sq(a, b)


def manifold_radii(features: ArrayLike, k: int = 3, batch_size: int = 10000, device=None,
                   fp16: bool = False) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set, (N,) float32.

    The point itself is among the k + 1 smallest distances (at 0), as in the ADM evaluator. Memory is
    O(batch_size^2) whatever N.
    """
    x = _as_2d(features).to(device=device, dtype=torch.float32)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < N; got k = {k}, N = {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, batch_size):
        rows = x[r0:r0 + batch_size]
        best = None  # running k + 1 smallest distances of each row
        for c0 in range(0, n, batch_size):
            d = _sq_distances(rows, x[c0:c0 + batch_size], fp16)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + batch_size] = best[:, k]
    return radii


def manifold_coverage(features_1: ArrayLike, radii_1: ArrayLike, features_2: ArrayLike,
                      radii_2: ArrayLike, batch_size: int = 10000, device=None,
                      fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_2, in_1): whether each point of set 1 lies in set 2's manifold, and each point of set 2 in set 1's.

    A point is inside a manifold when its squared distance to some point of that set is <= that
    point's radius. One pass over the cross distances serves both directions (ADM's evaluate_pr).
    """
    a = _as_2d(features_1, "features_1").to(device=device, dtype=torch.float32)
    b = _as_2d(features_2, "features_2").to(device=a.device, dtype=torch.float32)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    ra = torch.as_tensor(radii_1).to(a.device, torch.float32)
    rb = torch.as_tensor(radii_2).to(a.device, torch.float32)
    if ra.shape != (a.shape[0],) or rb.shape != (b.shape[0],):
        raise ValueError(f"radii must be ({a.shape[0]},) and ({b.shape[0]},); got {tuple(ra.shape)}, {tuple(rb.shape)}")
    a_in_b = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    b_in_a = torch.zeros(b.shape[0], dtype=torch.bool, device=a.device)
    for i in range(0, a.shape[0], batch_size):
        for j in range(0, b.shape[0], batch_size):
            d = _sq_distances(a[i:i + batch_size], b[j:j + batch_size], fp16)  # (ni, nj)
            a_in_b[i:i + batch_size] |= (d <= rb[j:j + batch_size][None]).any(1)
            b_in_a[j:j + batch_size] |= (d <= ra[i:i + batch_size][:, None]).any(0)
    return a_in_b, b_in_a


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                     batch_size: int = 10000, device=None, fp16: bool = False) -> PrecisionRecall:
    """Improved precision and recall with k-NN manifolds (k = 3 as in the ADM evaluator).

    Args:
        real_features: (N_real, F) reference features.
        fake_features: (N_fake, F) generated features.
        k: neighbourhood size of the manifold radii.
        batch_size: rows/columns per distance block; memory is O(batch_size^2).
        device: where to compute (a CUDA device makes 50k x 50k fast); default: the features' device.
        fp16: compute distances in float16 as the ADM evaluator does (its TensorFlow quirk).
    """
    r_real = manifold_radii(real_features, k, batch_size, device, fp16)
    r_fake = manifold_radii(fake_features, k, batch_size, device, fp16)
    real_in_fake, fake_in_real = manifold_coverage(real_features, r_real, fake_features, r_fake,
                                                   batch_size, device, fp16)
    return PrecisionRecall(precision=float(fake_in_real.double().mean()),
                           recall=float(real_in_fake.double().mean()))
