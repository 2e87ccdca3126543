"""The trajectory record: its layout, the seed and condition of each index, the manifest and its verification.

One record per trajectory (a shard of the sharded store, data/shard_files.py):

    seed      int64                  the trajectory's noise seed
    label     int64                  its class label (class-conditional teachers), or
    prompt    int64                  its caption's row in the prompt store (text teachers, data/prompts.py)
    states    (S + 1, C, H, W)       ODE states at the student grid: noise first, final sample last
    x0_preds  (S, C, H, W)           teacher x0-predictions at grid positions 0..S-1 (optional field)

The x0-prediction at the end point is the sample itself (``states[S]``), so it is not stored twice.
Trajectory i has seed ``base_seed + i`` and condition ``assignment[i % len(assignment)]`` (the
manifest's ``labels.classes`` or ``prompts.rows``). The full specification is docs/trajectories.md.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ardistill.data.shard_files import CorruptRecordingError, nonfinite_records, read_manifest, shard_problems, short

FORMAT = "ardistill-trajectories"
VERSION = 1
DTYPES = ("float16", "float32")
CONDITIONS = ("label", "prompt")  # what a record's second field holds: a class label or a prompt-store row


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
        check_image_field("Layout", self.shape, self.dtype, "C, H, W")

    def record_dtype(self) -> np.dtype:
        """numpy structured dtype of one record (little-endian, packed; 8-byte ints first keep floats aligned)."""
        f = float_format(self.dtype)
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


def check_image_field(owner: str, shape: tuple[int, ...], dtype: str, axes: str) -> None:
    """An image-shaped float field of a record (a state, a latent): three positive sizes, a dtype of DTYPES."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{owner}: shape must be ({axes}) with positive sizes, got {shape}")
    if dtype not in DTYPES:
        raise ValueError(f"{owner}: dtype must be one of {DTYPES}, got {dtype!r}")


def float_format(dtype: str) -> str:
    """numpy format of a DTYPES storage dtype (little-endian)."""
    return "<f2" if dtype == "float16" else "<f4"


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
                             f"{int(rec['seed'][b])} ({layout.condition} {int(rec[layout.condition][b])}) is NaN "
                             f"or inf in storage dtype {layout.dtype}; {n_bad} of {len(rec)} trajectories in seeds "
                             f"{int(rec['seed'][0])}..{int(rec['seed'][-1])} are affected"
                             + ("; float16 overflows beyond 65504: record with --dtype float32"
                                if layout.dtype == "float16" else ""))
    return rec


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------------------
# Seeds and conditions: trajectory i depends only on (seed_i, condition_i)


def seeds_for(indices: np.ndarray, base_seed: int) -> np.ndarray:
    """seed_i = base_seed + i."""
    return base_seed + np.asarray(indices, dtype=np.int64)


def labels_for(indices: np.ndarray, classes: list[int]) -> np.ndarray:
    """label_i = classes[i % len(classes)]: round-robin, so every class gets count // len(classes) or one more.

    Prompt rows are assigned the same way (``classes`` = the manifest's ``prompts.rows``).
    """
    return np.asarray(classes, dtype=np.int64)[np.asarray(indices, dtype=np.int64) % len(classes)]


def assignment(manifest: dict) -> tuple[str, list[int]]:
    """The record field of a recording's condition and the values it cycles through (classes or prompt rows)."""
    if "prompts" in manifest:  # a text recording: prompt rows cycle like labels
        return "prompt", manifest["prompts"]["rows"]
    return "label", manifest["labels"]["classes"]


# ------------------------------------------------------------------------------------------------
# Manifest and verification


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and check manifest.json (format, version, shard list covering 0..count-1)."""
    return read_manifest(root, fmt=FORMAT, version=VERSION, what="trajectory manifest", unit="trajectories",
                         absent="not a trajectory recording",
                         unfinished="the recording is unfinished (recording.json present); run the same "
                                    "`ardistill record` command again")


def verify(root: str | os.PathLike, checksums: bool = True) -> dict:
    """Check every shard against the manifest; returns the manifest.

    Always: presence, size, .npy header. With ``checksums``: sha256, the seeds/labels of every record
    and that every stored state and x0-prediction is finite.

    Raises CorruptRecordingError listing every problem found.
    """
    root = Path(root)
    m = load_manifest(root)
    problems = shard_problems(root, m, Layout.from_dict(m["layout"]), checksums,
                              deep=lambda path, s: _check_ids(path, s, m) or _check_finite(path, s))
    if problems:
        raise CorruptRecordingError(f"{root}: {len(problems)} bad shard(s): " + "; ".join(problems))
    return m


def _check_ids(path: Path, s: dict, m: dict) -> str | None:
    arr = np.load(path, mmap_mode="r")
    idx = np.arange(s["start"], s["start"] + s["count"], dtype=np.int64)
    if not np.array_equal(arr["seed"], seeds_for(idx, m["seeds"]["base_seed"])):
        return f"{s['file']}: seeds do not match indices {s['start']}..{s['start'] + s['count'] - 1}"
    field, values = assignment(m)
    if not np.array_equal(arr[field], labels_for(idx, values)):
        return (f"{s['file']}: prompt rows do not match the prompt assignment" if field == "prompt"
                else f"{s['file']}: labels do not match the class assignment")
    return None


def _check_finite(path: Path, s: dict, chunk: int = 4096) -> str | None:
    arr = np.load(path, mmap_mode="r")
    bad = np.concatenate([i + nonfinite_records(arr[i:i + chunk]) for i in range(0, len(arr), chunk)] or [[]])
    if bad.size:
        bad = bad.astype(np.int64)
        return (f"{s['file']}: non-finite values (NaN or inf) in records {short(bad)} "
                f"(indices {short(bad + s['start'])}, seeds {short(arr['seed'][bad])})")
    return None


def describe(manifest: dict) -> str:
    """One-paragraph human summary of a manifest."""
    lay, grid, s = manifest["layout"], manifest["grid"], manifest["sampler"]
    return (f"{manifest['count']} trajectories in {len(manifest['shards'])} shard(s), "
            f"{lay['record_bytes']} bytes each ({lay['dtype']}, state {tuple(lay['shape'])}, S = {lay['num_steps']}, "
            f"x0_preds {'stored' if lay['x0_preds'] else 'not stored'}); teacher {s['solver']}-{grid['teacher_steps']} "
            f"cfg {s['cfg_scale']}, grid {grid['positions']} (t = {grid['times']}), "
            f"weights sha256 {manifest['teacher']['weights_sha256'][:12]}")
