"""Reading a recording for training: what a student needs from it (StudentDataSpec) and TrajectoryDataset.

A text recording's captions come from its prompt store: ``prompts.TextTrajectoryDataset`` adds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ardistill.data.sharded_records import ShardedRecords
from ardistill.data.trajectory_format import Layout, load_manifest, verify

TARGETS = ("state", "x0")  # student parameterisations, see StudentDataSpec


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
    what = "recording"

    def __init__(self, root: str | os.PathLike, expect: StudentDataSpec | None = None, verify_checksums: bool = False,
                 verify_shards: bool = True):
        self.root = Path(root)
        self.verify_shards = verify_shards
        manifest = verify(self.root) if verify_checksums else load_manifest(self.root)
        if expect is not None:
            expect.check(manifest, where=f"recording {self.root}")
        self.target = expect.target if expect is not None else "state"
        self.positions: list[int] = list(manifest["grid"]["positions"])
        self.times: list[float] = list(manifest["grid"]["times"])  # true teacher times at the positions
        self._attach(manifest, Layout.from_dict(manifest["layout"]), verified=verify_checksums)  # verify() hashed them
        self.num_steps = self.layout.num_steps

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
                self.layout.condition: torch.from_numpy(rec[self.layout.condition].copy()),
                "seed": torch.from_numpy(rec["seed"].copy()), "index": torch.from_numpy(idx.copy())}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.batch([int(i)])
        return {k: v[0] for k, v in b.items()}

    def verify(self) -> None:
        """Hash every shard against the manifest (reads all data)."""
        verify(self.root, checksums=True)
