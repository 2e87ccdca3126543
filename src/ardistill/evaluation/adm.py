"""The ADM evaluator's .npz batches (guided-diffusion ``evaluations/evaluator.py``), read and written.

A sample batch holds ``arr_0``: uint8 images (N, H, W, C), C = 3 for the evaluator (we also accept
C = 1 for grey-scale toy data), optionally ``arr_1``: class labels (N,). A reference batch adds the
statistics of its Inception features: ``mu``/``sigma`` (pool_3, for FID) and ``mu_s``/``sigma_s``
(spatial mixed_6/conv features, for sFID). Images are streamed from the zip member in batches, as
the evaluator does, so a 50k x 256 x 256 x 3 batch never has to fit in memory.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
import torch

from ardistill.io.fileio import atomic_write

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounded as DiT's sample_ddp.py does.

    clamp(127.5 x + 128, 0, 255) truncated = round-half-up of 127.5 (x + 1). (guided-diffusion's own
    sample script truncates 127.5 (x + 1) instead; the two differ by at most one level.)
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True, eq=False)
class ADMBatch:
    """What an ADM .npz holds: the images' header (streamed on demand), labels, reference statistics."""

    path: Path
    keys: tuple[str, ...]
    image_shape: tuple[int, int, int, int] | None = None  # (N, H, W, C) of arr_0, when present
    labels: np.ndarray | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s present

    @property
    def num_images(self) -> int:
        return 0 if self.image_shape is None else self.image_shape[0]

    @property
    def mu(self) -> np.ndarray | None:
        return self.stats.get("mu")

    @property
    def sigma(self) -> np.ndarray | None:
        return self.stats.get("sigma")

    def iter_images(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """Yield uint8 (n, H, W, C) batches of arr_0 in order, reading the file incrementally."""
        if self.image_shape is None:
            raise ValueError(f"{self.path}: no '{IMAGES_KEY}' (images) in this .npz; keys: {list(self.keys)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        n, *rest = self.image_shape
        per_image = int(np.prod(rest))
        with zipfile.ZipFile(self.path) as zf, zf.open(IMAGES_KEY + ".npy") as f:
            _read_npy_header(f, self.path)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                data = _read_exact(f, b * per_image, self.path)
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, *rest)

    def iter_tensors(self, batch_size: int = 64, device=None) -> Iterator[torch.Tensor]:
        """Yield arr_0 as uint8 (n, C, H, W) tensors, the layout the feature networks take."""
        for batch in self.iter_images(batch_size):
            yield torch.from_numpy(batch.copy()).to(device).permute(0, 3, 1, 2)

    def images(self) -> np.ndarray:
        """All of arr_0 as one uint8 (N, H, W, C) array."""
        if self.image_shape is None:
            raise ValueError(f"{self.path}: no '{IMAGES_KEY}' (images) in this .npz; keys: {list(self.keys)}")
        out = np.empty(self.image_shape, dtype=np.uint8)
        i = 0
        for batch in self.iter_images(1024):
            out[i:i + len(batch)] = batch
            i += len(batch)
        return out


def read_adm_npz(path: str | Path, require_images: bool = False) -> ADMBatch:
    """Open an ADM sample or reference batch: validate arr_0's header, load labels and statistics."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ADM batch not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            image_shape = None
            if IMAGES_KEY + ".npy" in names:
                with zf.open(IMAGES_KEY + ".npy") as f:
                    shape, fortran, dtype = _read_npy_header(f, path)
                image_shape = _check_images_header(path, shape, fortran, dtype)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz (zip) file: {e}") from e
    keys = tuple(n[:-4] for n in names if n.endswith(".npy"))
    if image_shape is None and (require_images or not any(k in keys for k, _ in STAT_PAIRS)):
        raise ValueError(f"{path}: missing '{IMAGES_KEY}' (uint8 images N x H x W x C); keys: {list(keys)}")
    with np.load(path, allow_pickle=False) as npz:
        labels = None
        if LABELS_KEY in keys:
            labels = npz[LABELS_KEY]
            n = labels.shape[0] if image_shape is None else image_shape[0]
            if labels.shape != (n,):
                raise ValueError(f"{path}: '{LABELS_KEY}' (labels) must have shape ({n},); got {labels.shape}")
        stats = {}
        for mu_key, sigma_key in STAT_PAIRS:
            if (mu_key in keys) != (sigma_key in keys):
                raise ValueError(f"{path}: '{mu_key}' and '{sigma_key}' must come together; "
                                 f"found only '{mu_key if mu_key in keys else sigma_key}'")
            if mu_key in keys:
                stats[mu_key], stats[sigma_key] = _check_stats(path, mu_key, npz[mu_key], sigma_key, npz[sigma_key])
    return ADMBatch(path=path, keys=keys, image_shape=image_shape, labels=labels, stats=stats)


def write_adm_npz(path: str | Path, images: np.ndarray | Iterable[np.ndarray], *,
                  num_images: int | None = None, labels: np.ndarray | None = None,
                  stats: dict[str, np.ndarray] | None = None) -> Path:
    """Write an ADM batch atomically: ``arr_0`` uint8 NHWC images, optional ``arr_1`` labels and stats.

    Args:
        path: output .npz path.
        images: one uint8 (N, H, W, C) array, or an iterable of such batches (then ``num_images`` is
            required, since the .npy header comes first); batches are written as they come.
        num_images: total count when ``images`` is an iterable; checked.
        labels: optional (N,) integer class labels, written as arr_1 (ADM's class-conditional samples).
        stats: optional reference statistics {"mu", "sigma"[, "mu_s", "sigma_s"]}.
    """
    path = Path(path)
    if isinstance(images, np.ndarray):
        num_images = images.shape[0] if images.ndim == 4 else num_images
        batches: Iterator[np.ndarray] = iter([images])
    else:
        if num_images is None:
            raise ValueError(f"{path}: num_images is required when images is an iterable of batches")
        batches = iter(images)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{path}: no images to write")
    first = np.asarray(first)
    _check_images_header(path, (num_images, *first.shape[1:]), False, first.dtype, what="images to write")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: labels must be integers of shape ({num_images},); "
                             f"got {labels.dtype} {labels.shape}")
    checked = {}
    for mu_key, sigma_key in STAT_PAIRS:
        if stats and (mu_key in stats or sigma_key in stats):
            if mu_key not in stats or sigma_key not in stats:
                raise ValueError(f"{path}: stats need both '{mu_key}' and '{sigma_key}'")
            checked[mu_key], checked[sigma_key] = _check_stats(path, mu_key, np.asarray(stats[mu_key]),
                                                               sigma_key, np.asarray(stats[sigma_key]))
    if stats and set(stats) - set(checked):
        raise ValueError(f"{path}: unknown stats keys {sorted(set(stats) - set(checked))}")
    shape = (num_images, *first.shape[1:])

    def write(tmp: str) -> None:
        # ZIP_STORED like np.savez, so the ADM evaluator can stream arr_0 straight from the file.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(IMAGES_KEY + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                written = 0
                for batch in _chain(first, batches):
                    batch = np.asarray(batch)
                    if batch.dtype != np.uint8 or batch.shape[1:] != shape[1:]:
                        raise ValueError(f"{path}: batch of {batch.dtype} {batch.shape} does not match "
                                         f"uint8 (n, {', '.join(map(str, shape[1:]))})")
                    written += batch.shape[0]
                    if written > num_images:
                        raise ValueError(f"{path}: more than num_images = {num_images} images were given")
                    f.write(np.ascontiguousarray(batch).tobytes())
                if written != num_images:
                    raise ValueError(f"{path}: num_images = {num_images} but {written} images were given")
            arrays = dict(checked)
            if labels is not None:
                arrays[LABELS_KEY] = labels
            for key, arr in arrays.items():
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    return atomic_write(path, write)


def write_adm_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write reference statistics only (mu, sigma), e.g. a cached reference for FD."""
    path = Path(path)
    mu, sigma = _check_stats(path, "mu", np.asarray(mu), "sigma", np.asarray(sigma))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- helpers

def _chain(first, rest):
    yield first
    yield from rest


def _read_npy_header(f: IO[bytes], path: Path):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{path}: '{IMAGES_KEY}' has unsupported .npy format version {version}")


def _check_images_header(path: Path, shape, fortran: bool, dtype, what: str = f"'{IMAGES_KEY}'"):
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{path}: {what} must be uint8 images (N, H, W, C); got dtype {np.dtype(dtype)}")
    if len(shape) != 4:
        raise ValueError(f"{path}: {what} must have rank 4 (N, H, W, C); got shape {tuple(shape)}")
    if shape[3] not in (1, 3):
        raise ValueError(f"{path}: {what} must be channels-last with C = 3 (or 1); got shape {tuple(shape)}")
    if fortran:
        raise ValueError(f"{path}: {what} is stored in Fortran order; write it C-contiguous")
    return tuple(int(s) for s in shape)


def _check_stats(path: Path, mu_key: str, mu: np.ndarray, sigma_key: str, sigma: np.ndarray):
    if mu.ndim != 1 or not np.issubdtype(mu.dtype, np.floating):
        raise ValueError(f"{path}: '{mu_key}' must be a 1-D float array; got {mu.dtype} {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]) or not np.issubdtype(sigma.dtype, np.floating):
        raise ValueError(f"{path}: '{sigma_key}' must be a float ({mu.shape[0]}, {mu.shape[0]}) matrix "
                         f"to match '{mu_key}'; got {sigma.dtype} {sigma.shape}")
    return mu, sigma


def _read_exact(f: IO[bytes], size: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < size:
        b = f.read(size - got)
        if not b:
            raise ValueError(f"{path}: '{IMAGES_KEY}' ends early: expected {size - got} more bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)
