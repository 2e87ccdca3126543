"""The sharded store on disk, shared by trajectory recordings, prompt stores and latent stores.

A store is a folder:

    manifest.json          what the store holds and how it was made; written last (its presence = complete)
    shard-000000.npy ...   shard k holds records [k * shard_size, (k + 1) * shard_size)

Each shard is a plain ``.npy`` file holding a 1-D structured array, one fixed-size record per item
(so ``np.load(path, mmap_mode="r")`` reads it with numpy alone); the store's layout class names the
fields (``record_dtype()``). The manifest lists every shard with its size and sha256.

Here: shard names and index ranges, the atomic shard write with its checksum, the check of one shard
file against its manifest entry, and the reading of a manifest. A run that writes a store (resume,
repair, the final manifest) is ``shard_runs.py``; reading records back is ``sharded_records.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ardistill.io.fileio import atomic_write, read_json, sha256_file

MANIFEST = "manifest.json"
PLAN = "recording.json"
PROGRESS_DIR = "progress"


class CorruptRecordingError(ValueError):
    """A store on disk does not match its manifest (missing, truncated or corrupted shard)."""


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npy"


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def shard_range(k: int, shard_size: int, count: int) -> range:
    """Record indices held by shard k: a fixed range that depends only on k, shard_size, count."""
    return range(k * shard_size, min((k + 1) * shard_size, count))


# ------------------------------------------------------------------------------------------------
# Writing one shard


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    file: str
    index: int  # shard number k
    start: int  # first record index
    count: int
    bytes: int
    sha256: str


def write_shard(root: str | os.PathLike, k: int, start: int, records: np.ndarray) -> ShardInfo:
    """Write shard k atomically as a .npy file; the checksum is of the bytes written."""
    header = _npy_header(records)
    data = memoryview(np.ascontiguousarray(records)).cast("B")
    h = hashlib.sha256(header)
    h.update(data)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)

    path = atomic_write(Path(root) / shard_name(k), write)
    return ShardInfo(file=path.name, index=k, start=start, count=len(records),
                     bytes=len(header) + data.nbytes, sha256=h.hexdigest())


def _npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Checking shards and reading a manifest


def check_shard_file(root: Path, s: dict, layout, checksum: bool = False) -> str | None:
    """The problem with one shard of a manifest (``file``, ``bytes``, ``count``, ``sha256``), or None.

    Presence, size and ``.npy`` header against ``layout.record_dtype()``; with ``checksum`` also the
    sha256 (reads the whole file). Shared by every store.
    """
    path = root / s["file"]
    if not path.exists():
        return f"{s['file']}: missing"
    size = path.stat().st_size
    if size != s["bytes"]:
        kind = "truncated" if size < s["bytes"] else "too long"
        return f"{s['file']}: {kind} ({size} bytes, manifest says {s['bytes']})"
    try:
        arr = np.load(path, mmap_mode="r")
    except ValueError as e:
        return f"{s['file']}: unreadable .npy header ({e})"
    if arr.dtype != layout.record_dtype() or arr.shape != (s["count"],):
        return (f"{s['file']}: holds {arr.shape} records of {arr.dtype}, "
                f"manifest says ({s['count']},) of {layout.record_dtype()}")
    if checksum:
        got = sha256_file(path)
        if got != s["sha256"]:
            return f"{s['file']}: checksum mismatch (sha256 {got[:16]}..., manifest {s['sha256'][:16]}...): corrupted"
    return None


def shard_problems(root: Path, manifest: dict, layout, checksums: bool, deep=None) -> list[str]:
    """The problems of every shard of a manifest: ``check_shard_file`` (with ``checksums`` also the sha256),
    then, for a shard that passed and with ``checksums``, ``deep(path, entry)`` (a store's check of its records)."""
    problems = []
    for s in manifest["shards"]:
        problem = check_shard_file(root, s, layout, checksum=checksums)
        if problem is None and checksums and deep is not None:  # reads every record: part of the deep check only
            problem = deep(root / s["file"], s)
        if problem:
            problems.append(problem)
    return problems


def read_manifest(root: str | os.PathLike, *, fmt: str, version: int, what: str, unit: str, absent: str,
                  unfinished: str | None = None, error: type[ValueError] = CorruptRecordingError) -> dict:
    """Read and check a store's manifest.json: format, version, a shard list covering 0..count-1.

    ``what`` names the manifest in errors, ``unit`` what its records are ("trajectories"); a missing
    manifest is a FileNotFoundError whose hint is ``unfinished`` when a run's plan is there, else
    ``absent``. A broken shard list raises ``error``.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        hint = unfinished if unfinished is not None and (root / PLAN).exists() else absent
        raise FileNotFoundError(f"{path} not found: {hint}")
    m = read_json(path, what)
    if m.get("format") != fmt:
        raise ValueError(f"{path}: format is {m.get('format')!r}, expected {fmt!r}")
    if m.get("version") != version:
        raise ValueError(f"{path}: format version {m.get('version')} is not supported (this reader: {version})")
    expect_start = 0
    for s in m["shards"]:
        if s["start"] != expect_start:
            raise error(f"{path}: shard list has a gap or overlap at {s['file']} "
                        f"(start {s['start']}, expected {expect_start})")
        expect_start += s["count"]
    if expect_start != m["count"]:
        raise error(f"{path}: shards hold {expect_start} {unit}, manifest count is {m['count']}")
    return m


def nonfinite_records(rec: np.ndarray) -> np.ndarray:
    """Positions (within ``rec``) of the structured records whose float fields hold NaN or inf."""
    bad = np.zeros(len(rec), dtype=bool)
    for name in rec.dtype.names:
        if rec.dtype[name].subdtype is not None and np.issubdtype(rec.dtype[name].subdtype[0], np.floating):
            bad |= ~np.isfinite(rec[name].reshape(len(rec), -1)).all(axis=1)
    return np.nonzero(bad)[0]


def short(values, limit: int = 12) -> str:
    """At most ``limit`` integers for a message: '3, 5, 7, ... (40 in all)'."""
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values)} in all)" if len(values) > limit else "")
