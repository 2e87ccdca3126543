"""Sharded store of teacher ODE trajectories: format, writer, manifest, reader, verification.

A recording is a folder:

    manifest.json          what was recorded and how; written last (its presence = complete)
    shard-000000.npy ...   shard k holds trajectories [k * shard_size, (k + 1) * shard_size)

Each shard is a plain ``.npy`` file holding a 1-D structured array, one fixed-size record per
trajectory (so ``np.load(path, mmap_mode="r")`` reads it with numpy alone):

    seed      int64                  the trajectory's noise seed
    label     int64                  its class label (class-conditional teachers), or
    prompt    int64                  its caption's row in the prompt store (text teachers, data/prompts.py)
    states    (S + 1, C, H, W)       ODE states at the student grid: noise first, final sample last
    x0_preds  (S, C, H, W)           teacher x0-predictions at grid positions 0..S-1 (optional field)

The x0-prediction at the end point is the sample itself (``states[S]``), so it is not stored twice.
While a recording runs, ``recording.json`` (the plan) and ``progress/rank-*.json`` (shards done,
with checksums) live beside the shards; both are removed once ``manifest.json`` is written.
Shards are written to a temp file and renamed, and listed only after the rename, so a listed
shard is always complete. The full specification is docs/trajectories.md.

Glossary: S student steps, T teacher steps, positions = indices of the S + 1 student states on the
teacher's T + 1 grid points (0 = noise, T = final sample).
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ardistill.io.fileio import atomic_write, atomic_write_json, read_json, sha256_file

FORMAT = "ardistill-trajectories"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "recording.json"
PROGRESS_DIR = "progress"
DTYPES = ("float16", "float32")
TARGETS = ("state", "x0")  # student parameterisations, see StudentDataSpec
CONDITIONS = ("label", "prompt")  # what a record's second field holds: a class label or a prompt-store row


class CorruptRecordingError(ValueError):
    """A recording on disk does not match its manifest (missing, truncated or corrupted shard)."""


# ------------------------------------------------------------------------------------------------
# Record layout


@dataclass(frozen=True)
class Layout:
    """What one trajectory record holds: S, the state shape (C, H, W), the float dtype, the fields."""

    num_steps: int
    shape: tuple[int, int, int]
    dtype: str = "float16"
    x0_preds: bool = True
    condition: str = "label"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        if self.condition not in CONDITIONS:
            raise ValueError(f"Layout: condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.num_steps < 1:
            raise ValueError(f"Layout: num_steps must be >= 1, got {self.num_steps}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Layout: shape must be (C, H, W) with positive sizes, got {self.shape}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Layout: dtype must be one of {DTYPES}, got {self.dtype!r}")

    def record_dtype(self) -> np.dtype:
        """numpy structured dtype of one record (little-endian, packed; 8-byte ints first keep floats aligned)."""
        f = "<f2" if self.dtype == "float16" else "<f4"
        fields = [("seed", "<i8"), (self.condition, "<i8"), ("states", f, (self.num_steps + 1, *self.shape))]
        if self.x0_preds:
            fields.append(("x0_preds", f, (self.num_steps, *self.shape)))
        return np.dtype(fields)

    @property
    def record_bytes(self) -> int:
        return self.record_dtype().itemsize

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.condition == "label":  # class-conditional manifests stay as they were before text recordings
            del d["condition"]
        d["shape"] = list(self.shape)
        d["record_bytes"] = self.record_bytes
        d["numpy_dtype"] = self.record_dtype().descr  # informational: what np.load will report
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(num_steps=d["num_steps"], shape=tuple(d["shape"]), dtype=d["dtype"], x0_preds=d["x0_preds"],
                   condition=d.get("condition", "label"))


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npy"


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def shard_range(k: int, shard_size: int, count: int) -> range:
    """Trajectory indices held by shard k: a fixed range that depends only on k, shard_size, count."""
    return range(k * shard_size, min((k + 1) * shard_size, count))


def pack_records(layout: Layout, seeds, labels, states: torch.Tensor | np.ndarray,
                 x0_preds: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """Build the structured records (B,) of a shard; floats are cast to the layout's dtype.

    ``labels`` are class labels, or prompt-store rows for a layout whose condition is "prompt".
    """
    rec = np.empty(len(seeds), dtype=layout.record_dtype())
    rec["seed"] = np.asarray(seeds, dtype=np.int64)
    rec[layout.condition] = np.asarray(labels, dtype=np.int64)
    with np.errstate(over="ignore"):  # an overflow to inf is reported below, naming seed and step
        rec["states"] = _as_numpy(states)
        if layout.x0_preds:
            if x0_preds is None:
                raise ValueError("pack_records: the layout stores x0_preds but none were given")
            rec["x0_preds"] = _as_numpy(x0_preds)
    for name in ("states", "x0_preds") if layout.x0_preds else ("states",):
        finite = np.isfinite(rec[name].reshape(len(rec), rec[name].shape[1], -1)).all(axis=2)  # (B, steps)
        if not finite.all():
            # e.g. an fp16 overflow or a diverging teacher: fail loudly rather than store garbage
            b, step = (int(v) for v in np.argwhere(~finite)[0])
            n_bad = int((~finite.all(axis=1)).sum())
            what = "ODE state" if name == "states" else "x0-prediction"
            raise ValueError(f"refusing to write non-finite values: {what} at step {step} of seed "
                             f"{int(rec['seed'][b])} (label {int(rec['label'][b])}) is NaN or inf in storage dtype "
                             f"{layout.dtype}; {n_bad} of {len(rec)} trajectories in seeds "
                             f"{int(rec['seed'][0])}..{int(rec['seed'][-1])} are affected"
                             + ("; float16 overflows beyond 65504: record with --dtype float32"
                                if layout.dtype == "float16" else ""))
    return rec


def nonfinite_records(rec: np.ndarray) -> np.ndarray:
    """Positions (within ``rec``) of the structured records whose float fields hold NaN or inf."""
    bad = np.zeros(len(rec), dtype=bool)
    for name in rec.dtype.names:
        if rec.dtype[name].subdtype is not None and np.issubdtype(rec.dtype[name].subdtype[0], np.floating):
            bad |= ~np.isfinite(rec[name].reshape(len(rec), -1)).all(axis=1)
    return np.nonzero(bad)[0]


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------------------
# Writer


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    file: str
    index: int  # shard number k
    start: int  # first trajectory index
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
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class ShardWriter:
    """Writes a rank's shards in a background thread (overlapping compute) and lists each in its progress file.

    At most one shard is in flight: ``submit`` waits for the previous write, bounding memory to two
    shards. A shard is listed in ``progress/rank-<r>.json`` only after its rename.
    """

    def __init__(self, root: str | os.PathLike, rank: int):
        self.root = Path(root)
        self.progress_path = self.root / PROGRESS_DIR / f"rank-{rank:05d}.json"
        # keep what this rank's file listed before (an earlier run, possibly with another world size)
        self.listed: dict[int, ShardInfo] = _read_progress_file(self.progress_path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def submit(self, k: int, start: int, layout: Layout, seeds, labels, states, x0_preds) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, k, start, layout, seeds, labels, states, x0_preds)

    def _write(self, k, start, layout, seeds, labels, states, x0_preds) -> None:
        info = write_shard(self.root, k, start, pack_records(layout, seeds, labels, states, x0_preds))
        self.listed[k] = info
        atomic_write_json(self.progress_path, {"shards": {str(i): asdict(s) for i, s in sorted(self.listed.items())}})

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write

    def close(self) -> None:
        """Finish the write in flight (also when the caller failed, so finished work stays listed)."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


def _read_progress_file(path: Path) -> dict[int, ShardInfo]:
    if not path.exists():
        return {}
    return {int(k): ShardInfo(**v) for k, v in read_json(path, "progress file")["shards"].items()}


def read_progress(root: str | os.PathLike) -> dict[int, ShardInfo]:
    """Shards listed by every rank's progress file whose file exists with the listed size."""
    root = Path(root)
    listed: dict[int, ShardInfo] = {}
    for p in sorted((root / PROGRESS_DIR).glob("rank-*.json")):
        listed.update(_read_progress_file(p))
    return {k: s for k, s in listed.items()
            if (root / s.file).exists() and (root / s.file).stat().st_size == s.bytes}


def check_listed(root: str | os.PathLike) -> tuple[dict[int, ShardInfo], list[str]]:
    """Hash every shard the progress files list; unlist and delete the bad ones. Returns (good shards, problems).

    Run on one process before a resume records anything: a listed shard damaged since it was
    written (flaky disk, a copy gone wrong) is recorded again instead of being vouched for by the
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
            atomic_write_json(p, {"shards": {str(i): asdict(s) for i, s in sorted(keep.items())}})
    for name in {s.file for entries in listed.values() for k, s in entries.items() if k not in good}:
        (root / name).unlink(missing_ok=True)  # nothing vouches for it any more
    return good, problems


# ------------------------------------------------------------------------------------------------
# Plan (what is being recorded) and manifest


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
    """Check an output folder against a plan before recording; returns 'fresh', 'resume' or 'complete'.

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


def reopen_damaged(root: str | os.PathLike, plan: dict) -> list[str]:
    """Hash every shard of a finished recording; if any is damaged, reopen the recording so that a rerun
    records exactly those shards again. Returns the problems found ([] = the recording is intact).

    Reopening writes the plan and a progress file listing the intact shards, deletes the damaged
    shard files, and removes the manifest last: a run killed half-way finds the manifest (or the
    plan) and repeats the check. Costs one read of the recording (about 1 GB/s, see benchmarks.md);
    run on one process.
    """
    root = Path(root)
    m = load_manifest(root)
    layout = Layout.from_dict(m["layout"])
    bad = {s["index"]: (problem, s["file"]) for s in m["shards"]
           if (problem := check_shard_file(root, s, layout, checksum=True)) is not None}
    if not bad:
        return []
    good = {s["index"]: ShardInfo(**s) for s in m["shards"] if s["index"] not in bad}
    atomic_write_json(root / PLAN, plan)
    atomic_write_json(root / PROGRESS_DIR / f"rank-{0:05d}.json",  # the file rank 0's ShardWriter extends
                      {"shards": {str(k): asdict(v) for k, v in sorted(good.items())}})
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
    """Delete the plan, the progress files and temp files of a recording whose manifest is written."""
    _remove_temp_files(root)
    for p in (root / PROGRESS_DIR).glob("rank-*.json"):
        p.unlink()
    if (root / PROGRESS_DIR).exists():
        (root / PROGRESS_DIR).rmdir()
    (root / PLAN).unlink(missing_ok=True)


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and check manifest.json (format, version, shard list covering 0..count-1)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        hint = (f"the recording is unfinished ({PLAN} present); run the same `ardistill record` command again"
                if (root / PLAN).exists() else "not a trajectory recording")
        raise FileNotFoundError(f"{path} not found: {hint}")
    m = read_json(path, "trajectory manifest")
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"{path}: format version {m.get('version')} is not supported (this reader: {VERSION})")
    expect_start = 0
    for s in m["shards"]:
        if s["start"] != expect_start:
            raise CorruptRecordingError(f"{path}: shard list has a gap or overlap at {s['file']} "
                                        f"(start {s['start']}, expected {expect_start})")
        expect_start += s["count"]
    if expect_start != m["count"]:
        raise CorruptRecordingError(f"{path}: shards hold {expect_start} trajectories, manifest count is {m['count']}")
    return m


# ------------------------------------------------------------------------------------------------
# Verification


def verify(root: str | os.PathLike, checksums: bool = True) -> dict:
    """Check every shard against the manifest; returns the manifest.

    Always: presence, size, .npy header. With ``checksums``: sha256, the seeds/labels of every record
    and that every stored state and x0-prediction is finite.

    Raises CorruptRecordingError listing every problem found.
    """
    root = Path(root)
    m = load_manifest(root)
    layout = Layout.from_dict(m["layout"])
    problems = []
    for s in m["shards"]:
        problem = check_shard_file(root, s, layout, checksum=checksums)
        if problem is None and checksums:  # reads every record's ids: part of the deep check only
            problem = _check_ids(root / s["file"], s, m) or _check_finite(root / s["file"], s)
        if problem:
            problems.append(problem)
    if problems:
        raise CorruptRecordingError(f"{root}: {len(problems)} bad shard(s): " + "; ".join(problems))
    return m


def check_shard_file(root: Path, s: dict, layout, checksum: bool = False) -> str | None:
    """The problem with one shard of a manifest (``file``, ``bytes``, ``count``, ``sha256``), or None.

    Presence, size and ``.npy`` header against ``layout.record_dtype()``; with ``checksum`` also the
    sha256 (reads the whole file). Shared by recordings and latent stores.
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


def _check_ids(path: Path, s: dict, m: dict) -> str | None:
    arr = np.load(path, mmap_mode="r")
    idx = np.arange(s["start"], s["start"] + s["count"], dtype=np.int64)
    if not np.array_equal(arr["seed"], seeds_for(idx, m["seeds"]["base_seed"])):
        return f"{s['file']}: seeds do not match indices {s['start']}..{s['start'] + s['count'] - 1}"
    if "prompts" in m:  # a text recording: prompt rows cycle like labels
        if not np.array_equal(arr["prompt"], labels_for(idx, m["prompts"]["rows"])):
            return f"{s['file']}: prompt rows do not match the prompt assignment"
    elif not np.array_equal(arr["label"], labels_for(idx, m["labels"]["classes"])):
        return f"{s['file']}: labels do not match the class assignment"
    return None


def _check_finite(path: Path, s: dict, chunk: int = 4096) -> str | None:
    arr = np.load(path, mmap_mode="r")
    bad = np.concatenate([i + nonfinite_records(arr[i:i + chunk]) for i in range(0, len(arr), chunk)] or [[]])
    if bad.size:
        bad = bad.astype(np.int64)
        return (f"{s['file']}: non-finite values (NaN or inf) in records {_short(bad)} "
                f"(indices {_short(bad + s['start'])}, seeds {_short(arr['seed'][bad])})")
    return None


# ------------------------------------------------------------------------------------------------
# Seeds and labels: trajectory i depends only on (seed_i, label_i)


def seeds_for(indices: np.ndarray, base_seed: int) -> np.ndarray:
    """seed_i = base_seed + i."""
    return base_seed + np.asarray(indices, dtype=np.int64)


def labels_for(indices: np.ndarray, classes: list[int]) -> np.ndarray:
    """label_i = classes[i % len(classes)]: round-robin, so every class gets count // len(classes) or one more."""
    return np.asarray(classes, dtype=np.int64)[np.asarray(indices, dtype=np.int64) % len(classes)]


# ------------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class StudentDataSpec:
    """What a student needs from a recording; built by the training code from its config.

    ``target``: "state" (paper figure: inputs = states 0..S-1, targets = states 1..S) or "x0" (public
    ARD code: inputs = [noise, x0-preds at 1..S-1], targets = [x0-preds at 1..S-1, final sample]).
    Fields left None are not checked.
    """

    num_steps: int
    target: str = "state"
    positions: tuple[int, ...] | None = None
    teacher_steps: int | None = None
    shape: tuple[int, int, int] | None = None  # (C, H, W) of a state (the latent shape)
    num_classes: int | None = None
    teacher_sha256: str | None = None

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"StudentDataSpec: target must be one of {TARGETS}, got {self.target!r}")
        if self.num_steps < 1:
            raise ValueError(f"StudentDataSpec: num_steps must be >= 1, got {self.num_steps}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    def check(self, manifest: dict, where: str = "recording") -> None:
        """Raise ValueError naming the first field where the recording does not fit this student."""
        lay, grid = manifest["layout"], manifest["grid"]
        recorded = {
            "num_steps": lay["num_steps"],
            "positions": tuple(grid["positions"]),
            "teacher_steps": grid["teacher_steps"],
            "shape": tuple(lay["shape"]),
            "num_classes": manifest["teacher"]["config"].get("num_classes"),  # absent for text teachers
            "teacher_sha256": manifest["teacher"]["weights_sha256"],
        }
        for name, got in recorded.items():
            want = getattr(self, name)
            if want is not None and want != got:
                raise ValueError(f"{where} does not fit the student: {name} is {got!r} in the recording, "
                                 f"the student expects {want!r}")
        if self.target == "x0" and not lay["x0_preds"]:
            raise ValueError(f"{where} does not fit the student: target 'x0' needs x0_preds, "
                             f"but the recording stored states only (recorded without x0-predictions)")


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
    """Random access to fixed-size records in memory-mapped ``.npy`` shards (recordings, latent stores).

    Subclasses set ``root``, ``shards`` (manifest entries with ``file``, ``start`` and ``sha256``),
    ``layout`` (with ``record_dtype()``), ``verify_shards`` and call ``_open_shards()``. Shards are
    opened lazily, so the object is fork-safe and pickles into DataLoader workers without the mapped
    data. With ``verify_shards`` each shard's sha256 is checked against the manifest when it is
    first opened (one extra read of its bytes), so a damaged shard never reaches a batch.
    """

    kind = "record"
    verify_shards = True

    def _open_shards(self) -> None:
        self._starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self.shards)
        self._verified: set[int] = set()

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
            parts.append(f"{self.shards[int(k)]['file']} records {_short(local)} (indices {_short(glob)})")
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


def _short(values, limit: int = 12) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class TrajectoryDataset(ShardedRecords):
    """Random access to a recording (memory-mapped shards), in the layout the student trains on.

    ``ds[i]`` and ``ds.batch(indices)`` return ``inputs`` (S, C, H, W) and ``targets`` (S, C, H, W)
    as float32 per the spec's target ("state" when no spec), plus ``label`` (or ``prompt``, the
    prompt-store row, for a text recording), ``seed``, ``index``.
    Sizes and headers are checked on open; each shard's sha256 when it is first read
    (``verify_shards=False`` skips that); ``verify_checksums=True`` hashes every shard and checks
    every record's seed and label and finite values up front.
    """

    kind = "trajectory"

    def __init__(self, root: str | os.PathLike, expect: StudentDataSpec | None = None, verify_checksums: bool = False,
                 verify_shards: bool = True):
        self.root = Path(root)
        self.verify_shards = verify_shards
        self.manifest = verify(self.root) if verify_checksums else load_manifest(self.root)
        if expect is not None:
            expect.check(self.manifest, where=f"recording {self.root}")
        self.layout = Layout.from_dict(self.manifest["layout"])
        self.target = expect.target if expect is not None else "state"
        self.num_steps = self.layout.num_steps
        self.positions: list[int] = list(self.manifest["grid"]["positions"])
        self.times: list[float] = list(self.manifest["grid"]["times"])  # true teacher times at the positions
        self.shards = self.manifest["shards"]
        problems = [p for s in self.shards if (p := check_shard_file(self.root, s, self.layout))]
        if problems:
            raise CorruptRecordingError(f"recording {self.root}: " + "; ".join(problems))
        self._open_shards()
        if verify_checksums:
            self._verified.update(range(len(self.shards)))  # verify() just hashed them all

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Student batch: inputs, targets (B, S, C, H, W) float32; label (or prompt), seed, index (B,) int64."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rec = self.records(idx)
        states = torch.from_numpy(np.ascontiguousarray(rec["states"])).float()  # (B, S+1, C, H, W)
        S = self.num_steps
        if self.target == "state":
            inputs, targets = states[:, :S], states[:, 1:]
        else:
            x0 = torch.from_numpy(np.ascontiguousarray(rec["x0_preds"])).float()  # (B, S, C, H, W)
            inputs = torch.cat([states[:, :1], x0[:, 1:S]], dim=1)
            targets = torch.cat([x0[:, 1:S], states[:, S:]], dim=1)
        return {"inputs": inputs.contiguous(), "targets": targets.contiguous(),
                self.layout.condition: torch.from_numpy(rec[self.layout.condition].copy()), "seed": torch.from_numpy(rec["seed"].copy()),
                "index": torch.from_numpy(idx.copy())}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.batch([int(i)])
        return {k: v[0] for k, v in b.items()}

    def verify(self) -> None:
        """Hash every shard against the manifest (reads all data)."""
        verify(self.root, checksums=True)


def describe(manifest: dict) -> str:
    """One-paragraph human summary of a manifest."""
    lay, grid, s = manifest["layout"], manifest["grid"], manifest["sampler"]
    return (f"{manifest['count']} trajectories in {len(manifest['shards'])} shard(s), "
            f"{lay['record_bytes']} bytes each ({lay['dtype']}, state {tuple(lay['shape'])}, S = {lay['num_steps']}, "
            f"x0_preds {'stored' if lay['x0_preds'] else 'not stored'}); teacher {s['solver']}-{grid['teacher_steps']} "
            f"cfg {s['cfg_scale']}, grid {grid['positions']} (t = {grid['times']}), "
            f"weights sha256 {manifest['teacher']['weights_sha256'][:12]}")

