"""Reading a sharded store: random access to its fixed-size records, each shard hashed before use.

``ShardedRecords`` is the base of every reader (``TrajectoryDataset``, ``PromptStore``,
``LatentStore``); ``verify_split`` shares the hashing of the stores between torchrun's ranks.
"""

from __future__ import annotations


import numpy as np

from ardistill.data.shard_files import CorruptRecordingError, check_shard_file, nonfinite_records, short
from ardistill.io.fileio import sha256_file


def verify_split(stores: list, rank: int, world: int, gather) -> None:
    """Hash every shard of ``stores`` once across ``world`` processes and agree on the result.

    Rank r hashes shards k with k % world == r of each store; ``gather`` (all_gather_object) hands
    every rank all the problems found, so every rank raises the same CorruptRecordingError naming
    every bad shard, or marks all shards verified. Under torchrun this replaces each rank's lazy
    check (which would hash the whole recording once per rank) by one read of it in all.
    """
    problems = [p for st in stores for p in st.verify_share(rank, world)]
    problems = sorted({p for ps in gather(problems) for p in ps})
    if problems:
        raise CorruptRecordingError(f"{len(problems)} bad shard(s), restore or record them again: " + "; ".join(problems))
    for st in stores:
        st.mark_verified()


class ShardedRecords:
    """Random access to fixed-size records in memory-mapped ``.npy`` shards (recordings, prompt and latent stores).

    A subclass sets ``root`` and ``verify_shards``, reads its manifest and calls ``_attach``, which
    checks every shard file (size, header) and opens them lazily, so the object is fork-safe and
    pickles into DataLoader workers without the mapped data. With ``verify_shards`` each shard's
    sha256 is checked against the manifest when it is first opened (one extra read of its bytes),
    so a damaged shard never reaches a batch.
    """

    kind = "record"  # in messages: "<kind> store <root>"
    what = "store"  # in the open's errors: "<what> <root>: <problems>"
    error: type[CorruptRecordingError] = CorruptRecordingError
    verify_shards = True

    def _attach(self, manifest: dict, layout, verified: bool = False, checksum: bool = False) -> None:
        """Take the manifest and layout, check every shard file (with ``checksum`` also its sha256) and open
        them lazily; ``verified``: every shard was just hashed, no lazy check is left."""
        self.manifest, self.layout, self.shards = manifest, layout, manifest["shards"]
        problems = [p for s in self.shards if (p := check_shard_file(self.root, s, layout, checksum=checksum))]
        if problems:
            raise self.error(f"{self.what} {self.root}: " + "; ".join(problems))
        self._starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self.shards)
        self._verified: set[int] = set(range(len(self.shards))) if verified else set()

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.shards)}

    def _map(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            s = self.shards[k]
            path = self.root / s["file"]
            if self.verify_shards and k not in self._verified:
                got = sha256_file(path)
                if got != s["sha256"]:
                    raise CorruptRecordingError(
                        f"{self.kind} store {self.root}: {s['file']} does not match its manifest (sha256 "
                        f"{got[:16]}..., manifest {s['sha256'][:16]}...): corrupted since it was written; "
                        f"restore the folder (or record it again) and check it with `ardistill verify-trajectories`")
                self._verified.add(k)
            self._maps[k] = np.load(path, mmap_mode="r")
        return self._maps[k]

    def verify_share(self, rank: int = 0, world: int = 1) -> list[str]:
        """Hash the shards k with k % world == rank now; returns their problems ('file: reason')."""
        problems = []
        for k in range(rank, len(self.shards), world):
            s = self.shards[k]
            path = self.root / s["file"]
            got = sha256_file(path) if path.exists() else None
            if got != s["sha256"]:
                problems.append(f"{self.kind} store {self.root}: {s['file']}: "
                                + ("missing" if got is None else
                                   f"checksum mismatch (sha256 {got[:16]}..., manifest {s['sha256'][:16]}...)"))
        return problems

    def mark_verified(self) -> None:
        """Every shard was hashed (by this process or, split, by the ranks together): no lazy check left."""
        self._verified.update(range(len(self.shards)))

    def shard_of(self, indices) -> np.ndarray:
        """Shard number of each global record index."""
        return np.searchsorted(self._starts, np.asarray(indices, dtype=np.int64), side="right") - 1

    def locate(self, indices) -> str:
        """Where records live, for error messages: 'shard-000001.npy records 3, 5 (indices 11, 13)'."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        shard_of = self.shard_of(idx)
        parts = []
        for k in np.unique(shard_of):
            glob = idx[shard_of == k]
            local = glob - self._starts[k]
            parts.append(f"{self.shards[int(k)]['file']} records {short(local)} (indices {short(glob)})")
        return f"{self.root}: " + "; ".join(parts)

    def records(self, indices) -> np.ndarray:
        """Raw structured records (numpy, storage dtype) in the order of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.kind} index out of range [0, {len(self)}): {idx[(idx < 0) | (idx >= len(self))][:5]}")
        out = np.empty(idx.size, dtype=self.layout.record_dtype())
        shard_of = self.shard_of(idx)
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            local = idx[sel] - self._starts[k]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[sel[order]] = self._map(int(k))[local[order]]
        return out

    def describe_batch(self, indices) -> str:
        """For a NaN report: where a batch's records live and which of them hold non-finite values."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[nonfinite_records(self.records(idx))]
        text = f"the batch held {self.kind} records of {self.locate(idx)}"
        if bad.size:
            text += f"; non-finite values stored in {self.locate(bad)}"
        return text
