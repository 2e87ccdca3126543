"""A resumable run that writes a sharded store: one machinery for recordings, prompt stores and latent stores.

While a run is under way, ``recording.json`` (the plan: every setting that determines the bytes) and
``progress/rank-*.json`` (the shards each rank has written, with checksums) live beside the shards;
both are removed once ``manifest.json`` is written. Shards are written to a temp file and renamed,
and listed only after the rename, so a listed shard is always complete. A rerun with the same plan
resumes (the listed shards are hashed again and damaged ones written again), a rerun with another
plan is refused, and a rerun of a finished recording rehashes its shards and writes the damaged
ones again (``ShardRun``'s ``repair``).

Under torchrun rank 0 checks and prepares the folder (``on_main``) and every rank writes the shards
k with k % world_size == rank.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ardistill.data.shard_files import (MANIFEST, PLAN, PROGRESS_DIR, CorruptRecordingError, ShardInfo,
                                        check_shard_file, num_shards, shard_range, write_shard)
from ardistill.io import distributed as dist
from ardistill.io.fileio import DiskFullError, atomic_write_json, read_json, sha256_file


def on_main(fn):
    """Run fn on rank 0 and hand its result, or its error, to every rank (so no rank waits forever)."""
    result = None
    if dist.is_main():
        try:
            result = fn()
        except (ValueError, FileNotFoundError, DiskFullError) as e:
            result = e
    result = dist.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


# ------------------------------------------------------------------------------------------------
# Progress files and the background writer


def _read_progress_file(path: Path) -> dict[int, ShardInfo]:
    if not path.exists():
        return {}
    return {int(k): ShardInfo(**v) for k, v in read_json(path, "progress file")["shards"].items()}


def _write_progress_file(path: Path, listed: dict[int, ShardInfo]) -> None:
    atomic_write_json(path, {"shards": {str(i): asdict(s) for i, s in sorted(listed.items())}})


def read_progress(root: str | os.PathLike) -> dict[int, ShardInfo]:
    """Shards listed by every rank's progress file whose file exists with the listed size."""
    root = Path(root)
    listed: dict[int, ShardInfo] = {}
    for p in sorted((root / PROGRESS_DIR).glob("rank-*.json")):
        listed.update(_read_progress_file(p))
    return {k: s for k, s in listed.items()
            if (root / s.file).exists() and (root / s.file).stat().st_size == s.bytes}


class ShardWriter:
    """Writes a rank's shards in a background thread (overlapping compute) and lists each in its progress file.

    At most one shard is in flight: ``submit`` waits for the previous write, bounding memory to two
    shards. A shard is listed in ``progress/rank-<r>.json`` only after its rename. With
    ``background=False`` each shard is written before ``submit`` returns (no thread: a caller that
    forks DataLoader workers keeps a single-threaded process).
    """

    def __init__(self, root: str | os.PathLike, rank: int, background: bool = True):
        self.root = Path(root)
        self.progress_path = self.root / PROGRESS_DIR / f"rank-{rank:05d}.json"
        # keep what this rank's file listed before (an earlier run, possibly with another world size)
        self.listed: dict[int, ShardInfo] = _read_progress_file(self.progress_path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if background else None
        self._pending: Future | None = None

    def submit(self, k: int, start: int, records: np.ndarray | Callable[[], np.ndarray]) -> None:
        """Write shard k; ``records`` is the structured array, or a function that packs it (in the writer thread)."""
        self._wait()
        if self._pool is None:
            self._write(k, start, records)
        else:
            self._pending = self._pool.submit(self._write, k, start, records)

    def _write(self, k: int, start: int, records) -> None:
        info = write_shard(self.root, k, start, records() if callable(records) else records)
        self.listed[k] = info
        _write_progress_file(self.progress_path, self.listed)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write

    def close(self) -> None:
        """Finish the write in flight (also when the caller failed, so finished work stays listed)."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def check_listed(root: str | os.PathLike) -> tuple[dict[int, ShardInfo], list[str]]:
    """Hash every shard the progress files list; unlist and delete the bad ones. Returns (good shards, problems).

    Run on one process before a resume writes anything: a listed shard damaged since it was
    written (flaky disk, a copy gone wrong) is written again instead of being vouched for by the
    manifest. Costs one read of the listed shards.
    """
    root = Path(root)
    files = sorted((root / PROGRESS_DIR).glob("rank-*.json"))
    listed = {p: _read_progress_file(p) for p in files}
    found: dict[str, tuple[int, str] | None] = {}  # file -> (size, sha256) on disk, each hashed once
    for entries in listed.values():
        for s in entries.values():
            if s.file not in found:
                path = root / s.file
                found[s.file] = (path.stat().st_size, sha256_file(path)) if path.exists() else None

    def problem(s: ShardInfo) -> str | None:
        got = found[s.file]
        if got is None:
            return "missing"
        if got[0] != s.bytes:
            return f"{got[0]} bytes, listed with {s.bytes}"
        if got[1] != s.sha256:
            return f"checksum mismatch (sha256 {got[1][:16]}..., listed {s.sha256[:16]}...)"
        return None

    good = {k: s for entries in listed.values() for k, s in entries.items() if problem(s) is None}
    problems = sorted({f"{s.file}: {problem(s)}" for entries in listed.values() for k, s in entries.items()
                       if k not in good})
    for p, entries in listed.items():
        keep = {k: s for k, s in entries.items() if problem(s) is None}
        if keep != entries:  # stale entries of a rewritten shard are dropped silently
            _write_progress_file(p, keep)
    for name in {s.file for entries in listed.values() for k, s in entries.items() if k not in good}:
        (root / name).unlink(missing_ok=True)  # nothing vouches for it any more
    return good, problems


# ------------------------------------------------------------------------------------------------
# The folder's life: plan check, repair, manifest


def plan_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plans, as 'key: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += plan_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def prepare_output(root: str | os.PathLike, plan: dict) -> str:
    """Check an output folder against a plan before writing; returns 'fresh', 'resume' or 'complete'.

    Call on one process before any shard is written: it also deletes temp files of killed writers.
    """
    root = Path(root)
    for path, what in ((root / MANIFEST, "finished recording"), (root / PLAN, "unfinished recording")):
        if path.exists():
            old = read_json(path, what)
            old = {k: v for k, v in old.items() if k in plan}
            if isinstance(old.get("sampler"), dict) and old["sampler"].get("solver") == "heun":
                # written before Heun recordings named their last interval: it was an Euler step
                old["sampler"] = {"heun_last_step": "euler", **old["sampler"]}
            diff = plan_differences(old, plan)
            if diff:
                raise ValueError(f"{root} holds a{'n' if what[0] == 'u' else ''} {what} with other settings "
                                 f"({'; '.join(diff[:6])}); use another --out folder or the same settings")
            if path.name == MANIFEST:
                _remove_run_files(root)  # left behind if a run was killed right after writing the manifest
                return "complete"
            _remove_temp_files(root)
            return "resume"
    if root.exists() and any(root.glob("shard-*.npy")):
        raise ValueError(f"{root} holds shard files but no {PLAN} or {MANIFEST}; refusing to mix recordings")
    root.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(root)
    atomic_write_json(root / PLAN, plan)
    return "fresh"


def reopen_damaged(root: str | os.PathLike, plan: dict, layout, load_manifest: Callable[[Path], dict]) -> list[str]:
    """Hash every shard of a finished store; if any is damaged, reopen the store so that a rerun
    writes exactly those shards again. Returns the problems found ([] = the store is intact).

    ``layout`` gives the records' dtype and ``load_manifest`` reads the store's manifest. Reopening
    writes the plan and a progress file listing the intact shards, deletes the damaged shard files,
    and removes the manifest last: a run killed half-way finds the manifest (or the plan) and
    repeats the check. Costs one read of the store (about 1 GB/s, see benchmarks.md); run on one
    process.
    """
    root = Path(root)
    m = load_manifest(root)
    bad = {s["index"]: (problem, s["file"]) for s in m["shards"]
           if (problem := check_shard_file(root, s, layout, checksum=True)) is not None}
    if not bad:
        return []
    good = {s["index"]: ShardInfo(**s) for s in m["shards"] if s["index"] not in bad}
    atomic_write_json(root / PLAN, plan)
    _write_progress_file(root / PROGRESS_DIR / f"rank-{0:05d}.json", good)  # the file rank 0's ShardWriter extends
    for _, name in bad.values():
        (root / name).unlink(missing_ok=True)  # nothing vouches for it any more
    (root / MANIFEST).unlink()
    return [bad[k][0] for k in sorted(bad)]


def _remove_temp_files(root: Path) -> None:
    # atomic_write's temp files are ".<name>.<random>.tmp"; a SIGKILLed writer leaves one behind
    for p in list(root.glob(".*.tmp")) + list((root / PROGRESS_DIR).glob(".*.tmp")):
        p.unlink(missing_ok=True)


def finalize(root: str | os.PathLike, plan: dict) -> dict:
    """Merge the ranks' progress into manifest.json (atomically), then remove the plan and progress files."""
    root = Path(root)
    count, shard_size = plan["count"], plan["shard_size"]
    done = read_progress(root)
    missing = [k for k in range(num_shards(count, shard_size)) if k not in done]
    if missing:
        raise CorruptRecordingError(f"{root}: shards {missing[:10]} are missing after recording "
                                    f"({len(missing)} in all); run the same command again to finish")
    shards = [asdict(done[k]) for k in sorted(done)]
    manifest = dict(plan, shards=shards, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    total_bytes=sum(s["bytes"] for s in shards))
    atomic_write_json(root / MANIFEST, manifest)
    _remove_run_files(root)
    return manifest


def _remove_run_files(root: Path) -> None:
    """Delete the plan, the progress files and temp files of a store whose manifest is written."""
    _remove_temp_files(root)
    for p in (root / PROGRESS_DIR).glob("rank-*.json"):
        p.unlink()
    if (root / PROGRESS_DIR).exists():
        (root / PROGRESS_DIR).rmdir()
    (root / PLAN).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# One run


class ShardRun:
    """This process's share of a run that writes the store ``out`` of ``plan`` (its ``count`` and ``shard_size``).

    Opening checks the folder on rank 0 (``prepare_output``; its error reaches every rank) and finds
    the shards already done. ``status`` is "fresh", "resume", "complete", or "repair" when
    ``repair`` (the store's manifest reader) is given and a finished store had damaged shards
    (``damaged`` names them; they are deleted and written again). On a resume the listed shards are
    hashed again (``hash_listed``; else only their sizes are checked): ``problems`` names the bad
    ones, written again. ``todo`` holds this rank's shards still to write, ``remaining`` the
    records still to write over all ranks. ``submit`` hands a shard to the writer (a background
    thread unless ``background=False``), ``close`` waits for it (use the run as a context manager),
    ``finish`` writes the manifest.
    """

    def __init__(self, out: str | os.PathLike, plan: dict, layout, *, hash_listed: bool = True,
                 repair: Callable[[Path], dict] | None = None, background: bool = True):
        self.out, self.plan, self.background = Path(out), plan, background
        self.count, self.shard_size = plan["count"], plan["shard_size"]
        self.rank, world = dist.rank(), dist.world_size()
        self.status = on_main(lambda: prepare_output(self.out, plan))  # rank 0 checks/creates the folder
        self.damaged: list[str] = []
        self.problems: list[str] = []
        self.done: dict[int, ShardInfo] = {}
        self.todo: list[int] = []
        self.remaining = 0
        self._writer: ShardWriter | None = None
        if self.status == "complete" and repair is not None:
            # a rerun is how a user makes sure a store is complete: rank 0 hashes every shard of the
            # manifest, and damaged ones are written again (the run is deterministic)
            self.damaged = on_main(lambda: reopen_damaged(self.out, plan, layout, repair))
            if self.damaged:
                self.status = "repair"
        if self.status == "complete":
            return
        # rank 0 hashes the shards listed before; damaged ones are unlisted, deleted and written again
        if self.status == "resume" and hash_listed:
            self.done, self.problems = on_main(lambda: check_listed(self.out))
        elif self.status != "fresh":  # a resume without hashing, or a repair whose intact shards were just hashed
            self.done = on_main(lambda: read_progress(self.out))
        self.todo = [k for k in range(num_shards(self.count, self.shard_size))
                     if k % world == self.rank and k not in self.done]
        # what this run writes over all ranks (rank 0 checked the progress before anything was written)
        self.remaining = self.count - sum(s.count for s in self.done.values())

    def indices(self, k: int) -> np.ndarray:
        """Record indices of shard k (int64)."""
        return np.asarray(shard_range(k, self.shard_size, self.count), dtype=np.int64)

    def mine(self) -> int:
        """Records this rank writes."""
        return sum(len(shard_range(k, self.shard_size, self.count)) for k in self.todo)

    def submit(self, k: int, records: np.ndarray | Callable[[], np.ndarray]) -> None:
        """Write shard k in the background (see ShardWriter.submit) and list it in this rank's progress file."""
        if self._writer is None:
            self._writer = ShardWriter(self.out, self.rank, self.background)
        self._writer.submit(k, k * self.shard_size, records)

    def close(self) -> None:
        """Finish the write in flight."""
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "ShardRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self) -> None:
        """Wait for every rank's shards; rank 0 merges the progress into the manifest (unless it was complete)."""
        # Only barriers from here on: a gloo object collective as the last call can abort the process at
        # exit (its work object, freed late on gloo's thread, needs the GIL during interpreter shutdown).
        dist.barrier()  # every shard is written and listed
        if dist.is_main() and self.status != "complete":
            finalize(self.out, self.plan)
        dist.barrier()  # the manifest is written (an error on rank 0 ends the job through torchrun)
