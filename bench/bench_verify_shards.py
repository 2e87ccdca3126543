"""Cost of the readers' per-shard sha256 check: one epoch of batches with and without it.

A synthetic recording (random finite values, the real file format and manifest) is written to a
temp folder; then, interleaved ``--repeats`` times (best and median reported):
  (a) ``sha256``: hashing every shard once (what the check adds), in MB/s;
  (b) ``epoch, checked``: a fresh ``TrajectoryDataset`` (``verify_shards=True``, the default) and one
      epoch of ``batch(indices)`` calls in a seeded random order, as a training loop reads;
  (c) ``epoch, unchecked``: the same with ``verify_shards=False`` (``--no-verify-shards``).
Each is timed in wall time and in CPU time of this process (which other processes' load does not
inflate). The files were just written, so both epochs read from the page cache: this is the CPU
cost of the check. From a cold disk, the hash reads each shard once and the memory map then finds
it cached.
The default record is ImageNet-256's latent layout (4 x 32 x 32, S = 4, fp16, x0-predictions).

    .venv/bin/python bench/bench_verify_shards.py [--shards 4] [--shard-size 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ardistill.data.shard_files import MANIFEST, write_shard
from ardistill.data.trajectory_dataset import TrajectoryDataset
from ardistill.data.trajectory_format import FORMAT, VERSION, Layout, pack_records
from ardistill.io.fileio import atomic_write_json, sha256_file


def make_recording(root: Path, layout: Layout, shards: int, shard_size: int) -> dict:
    """A recording in the real format with random values; returns its manifest."""
    rng = np.random.default_rng(0)
    S, shape = layout.num_steps, layout.shape
    infos = []
    for k in range(shards):
        idx = np.arange(k * shard_size, (k + 1) * shard_size)
        states = rng.standard_normal((shard_size, S + 1, *shape), dtype=np.float32)
        x0 = rng.standard_normal((shard_size, S, *shape), dtype=np.float32) if layout.x0_preds else None
        infos.append(asdict(write_shard(root, k, int(idx[0]), pack_records(layout, idx, idx % 1000, states, x0))))
    manifest = {"format": FORMAT, "version": VERSION, "count": shards * shard_size, "shard_size": shard_size,
                "layout": layout.to_dict(), "shards": infos, "total_bytes": sum(s["bytes"] for s in infos),
                "grid": {"positions": list(range(S + 1)), "times": [float(999 - 999 * i / S) for i in range(S + 1)],
                         "teacher_steps": S}}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def epoch(root: Path, verify_shards: bool, batch: int, seed: int) -> None:
    ds = TrajectoryDataset(root, verify_shards=verify_shards)
    order = np.random.default_rng(seed).permutation(len(ds))
    for i in range(0, len(order), batch):
        ds.batch(order[i:i + batch])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--shape", default="4,32,32", help="C,H,W of a state")
    ap.add_argument("--num-steps", type=int, default=4)
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layout = Layout(num_steps=args.num_steps, shape=tuple(int(v) for v in args.shape.split(",")), dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        m = make_recording(root, layout, args.shards, args.shard_size)
        mb = m["total_bytes"] / 1e6
        times: dict[str, list[tuple[float, float]]] = {"sha256": [], "checked": [], "unchecked": []}
        for r in range(args.repeats):
            times["sha256"].append(timed(lambda: [sha256_file(root / s["file"]) for s in m["shards"]]))
            times["checked"].append(timed(lambda: epoch(root, True, args.batch, r)))
            times["unchecked"].append(timed(lambda: epoch(root, False, args.batch, r)))
    out = {"records": m["count"], "record_bytes": layout.record_bytes, "MB": round(mb, 1), "threads": args.threads,
           "repeats": args.repeats}
    for j, clock in enumerate(("wall", "cpu")):
        best = {k: min(t[j] for t in v) for k, v in times.items()}
        med = {k: statistics.median(t[j] for t in v) for k, v in times.items()}
        out[clock] = {"sha256_MB_per_s": round(mb / best["sha256"], 1),
                      "epoch_checked_s": {"best": round(best["checked"], 3), "median": round(med["checked"], 3)},
                      "epoch_unchecked_s": {"best": round(best["unchecked"], 3), "median": round(med["unchecked"], 3)},
                      "overhead_best": round(best["checked"] / best["unchecked"] - 1, 3),
                      "overhead_median": round(med["checked"] / med["unchecked"] - 1, 3)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
