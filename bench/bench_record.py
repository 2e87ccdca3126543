"""Recording throughput against the teacher's forward passes alone; storage against one .npz per sample per step.

Three timings over the same trajectories and the same micro-batches, interleaved ``--repeats``
times (best and median reported), in wall time and in CPU time of this process (all its threads,
the background shard writer included; unlike wall time it does not count other processes' load):
  (a) ``record``: the full job (seeds, noise, ODE, fp16 cast, packing, sha256, atomic shard writes,
      progress files, manifest) into a fresh folder; the wall time spent inside the teacher's forward
      passes during that same run is also summed, which gives the overhead without the run-to-run
      noise of a shared machine;
  (b) forward passes only: ``teacher_steps`` guided model calls per micro-batch, nothing else; the bound;
  (c) ``ode.solve`` without storage (noise + solver arithmetic + forward passes), for reference;
  (d) the work (a) adds beyond the ODE, timed alone on the recorded data (once): weights hash, noise
      from seeds, dtype cast, packing, sha256 and shard writes. On a shared, loaded machine (a)-(b)
      is within timing noise; (d) resolves the overhead.
Overhead = time(a) / time(b) - 1. Storage: the recording's files and bytes per trajectory next to
the public ARD layout (one np.savez file per sample per recorded step: states at the S + 1 grid
points and x0-predictions at the S - 1 intermediate ones, fp32), written for ``--npz-sample``
trajectories and measured (apparent bytes and allocated disk blocks).

The teacher is src/ardistill/assets/digits_teacher.safetensors when present, else a DiT-digits with
random weights (the cost of a forward pass does not depend on the weights).

    .venv/bin/python bench/bench_record.py [--count 1024] [--batch-size 256] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ardistill.sampling.diffusion import process_for
from ardistill.models.dit import DiT, dit_config
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import grid_times, randn_from_seeds, solve
from ardistill.data.record import RecordConfig, record
from ardistill.data.shard_files import num_shards, shard_range
from ardistill.data.trajectory_format import labels_for, load_manifest, seeds_for

ASSET = Path(__file__).resolve().parents[1] / "src" / "ardistill" / "assets" / "digits_teacher.safetensors"


def load_teacher(path: str | None) -> tuple[DiT, str]:
    path = path or (str(ASSET) if ASSET.exists() else None)
    if path:
        from ardistill.io.checkpoints import load_any_teacher
        return load_any_teacher(path), path
    torch.manual_seed(0)
    model = DiT(dit_config("DiT-digits"))
    with torch.no_grad():  # adaLN-Zero starts at zero output; make it a real computation
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), "DiT-digits, random weights (no digits_teacher.safetensors asset)"


class ForwardTimer:
    """Wraps a model's forward to add up the wall time spent inside it (the bound, measured in the same run)."""

    def __init__(self, model: DiT):
        self.model, self.seconds, self.calls = model, 0.0, 0
        self._forward = model.forward

    def __enter__(self):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = self._forward(*a, **kw)
            if out.is_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out
        self.model.forward = timed  # an instance attribute shadows the method for nn.Module.__call__
        return self

    def __exit__(self, *exc):
        del self.model.forward


def micro_batches(cfg: RecordConfig, classes: list[int]):
    """The (seeds, labels) micro-batches the recorder runs: per shard, aligned to its start."""
    for k in range(num_shards(cfg.count, cfg.shard_size)):
        idx = np.asarray(shard_range(k, cfg.shard_size, cfg.count))
        for i in range(0, len(idx), cfg.batch_size):
            j = idx[i:i + cfg.batch_size]
            yield seeds_for(j, cfg.base_seed), labels_for(j, classes)


@torch.inference_mode()
def forward_only(teacher: DiT, cfg: RecordConfig, classes: list[int]) -> None:
    """(b): the guided forward passes of every micro-batch, at the grid times, on a fixed input."""
    fn = make_model_fn(teacher, cfg.cfg_scale, cfg.guidance_channels)
    process = process_for(teacher.cfg.prediction)
    times = grid_times(process, cfg.teacher_steps)[:-1]
    shape = (teacher.cfg.in_channels, teacher.cfg.input_size, teacher.cfg.input_size)
    for seeds, labels in micro_batches(cfg, classes):
        x = torch.zeros(len(seeds), *shape)
        y = torch.from_numpy(labels)
        for t in times:
            fn(x, process.model_time(torch.full((len(seeds),), t, dtype=torch.float64)), y)


@torch.inference_mode()
def ode_only(teacher: DiT, cfg: RecordConfig, classes: list[int]) -> None:
    """(c): noise from seeds + the solver, nothing kept."""
    fn = make_model_fn(teacher, cfg.cfg_scale, cfg.guidance_channels)
    process = process_for(teacher.cfg.prediction)
    shape = (teacher.cfg.in_channels, teacher.cfg.input_size, teacher.cfg.input_size)
    for seeds, labels in micro_batches(cfg, classes):
        solve(fn, process, randn_from_seeds(seeds.tolist(), shape), torch.from_numpy(labels), cfg.teacher_steps,
              cfg.solver)


def storage_alone(teacher: DiT, cfg: RecordConfig, classes: list[int], rec_root: Path, out: Path) -> float:
    """(d): everything (a) adds to (c), timed alone: weights hash, noise from seeds, fp16 cast, pack, sha256, write."""
    from ardistill.data.record import weights_sha256
    from ardistill.data.shard_files import write_shard
    from ardistill.data.trajectory_dataset import TrajectoryDataset
    from ardistill.data.trajectory_format import Layout, pack_records

    m = load_manifest(rec_root)
    layout = Layout.from_dict(m["layout"])
    ds = TrajectoryDataset(rec_root)
    shards = [ds.records(shard_range(k, cfg.shard_size, cfg.count)) for k in range(num_shards(cfg.count, cfg.shard_size))]
    states = [torch.from_numpy(r["states"].astype(np.float32)) for r in shards]  # what the ODE hands over
    x0s = [torch.from_numpy(r["x0_preds"].astype(np.float32)) for r in shards]
    shape = tuple(layout.shape)
    t0 = time.perf_counter()
    weights_sha256(teacher)
    for seeds, _ in micro_batches(cfg, classes):
        randn_from_seeds(seeds.tolist(), shape)
    for k, (r, st, x0) in enumerate(zip(shards, states, x0s)):
        dt = torch.float16 if cfg.dtype == "float16" else torch.float32
        write_shard(out, k, int(r["seed"][0]) - cfg.base_seed,
                    pack_records(layout, r["seed"], r["label"], st.to(dt), x0.to(dt)))
    return time.perf_counter() - t0


def npz_layout(root: Path, rec_root: Path, n: int) -> dict:
    """Write n recorded trajectories as the public code does (np.savez per sample per step, fp32); measure."""
    m = load_manifest(rec_root)
    from ardistill.data.trajectory_dataset import TrajectoryDataset
    r = TrajectoryDataset(rec_root).records(range(n))
    positions, S = m["grid"]["positions"], m["layout"]["num_steps"]
    files = 0
    for i in range(n):
        y = int(r["label"][i])
        for s, p in enumerate(positions):  # states at the S + 1 grid points
            d = root / "zt" / str(p) / str(y)
            d.mkdir(parents=True, exist_ok=True)
            np.savez(d / f"0_{i:06d}.npz", zt=r["states"][i, s].astype(np.float32))
            files += 1
        for s, p in list(enumerate(positions))[1:S]:  # x0-predictions at the intermediate points
            d = root / "pred_z0" / str(p) / str(y)
            d.mkdir(parents=True, exist_ok=True)
            np.savez(d / f"0_{i:06d}.npz", pred_z0=r["x0_preds"][i, s].astype(np.float32))
            files += 1
    return {"files_per_trajectory": files / n, **_sizes(root, n)}


def _sizes(root: Path, n: int) -> dict:
    paths = [p for p in root.rglob("*") if p.is_file()]
    apparent = sum(p.stat().st_size for p in paths)
    blocks = sum(p.stat().st_blocks * 512 for p in paths)  # what the file system allocates
    return {"files": len(paths), "bytes_per_trajectory": apparent / n, "disk_bytes_per_trajectory": blocks / n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the digits teacher asset)")
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings of each mode")
    p.add_argument("--npz-sample", type=int, default=64, help="trajectories written in the .npz layout")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, source = load_teacher(args.teacher)
    cfg = RecordConfig(count=args.count, num_steps=args.num_steps, teacher_steps=args.teacher_steps,
                       cfg_scale=args.cfg_scale, batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype)
    classes = list(range(teacher.cfg.num_classes))
    work = Path(tempfile.mkdtemp(prefix="bench_record_", dir=args.dir))
    try:
        # warm-up: one small recording and forward pass (allocator, first-call overheads)
        small = RecordConfig(**{**cfg.__dict__, "count": min(cfg.batch_size, cfg.count)})
        record(teacher, work / "warm", small, progress=False)
        forward_only(teacher, small, classes)

        inside = []  # wall seconds inside the teacher's forward during each (a)
        times = {"record": [], "forward": [], "ode": []}  # wall seconds
        cpu = {"record": [], "forward": [], "ode": []}  # CPU seconds of this process, all its threads
        def record_job(r):
            with ForwardTimer(teacher) as timer:
                record(teacher, work / f"rec{r}", cfg, progress=False)
            inside.append(timer.seconds)

        jobs = {"record": record_job,
                "forward": lambda r: forward_only(teacher, cfg, classes),
                "ode": lambda r: ode_only(teacher, cfg, classes)}
        for r in range(args.repeats):
            for k, job in jobs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                job(r)
                times[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
            print(f"repeat {r}: inside forward {inside[-1]:.2f} s; " + ", ".join(f"{k} {times[k][-1]:.2f} s wall / {cpu[k][-1]:.2f} s cpu" for k in jobs),
                  flush=True)
        t_store = storage_alone(teacher, cfg, classes, work / "rec0", work / "restore")
        ours = _sizes(work / "rec0", cfg.count)
        raw = load_manifest(work / "rec0")["layout"]["record_bytes"]
        npz = npz_layout(work / "npz", work / "rec0", min(args.npz_sample, cfg.count))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    same_run = [w / f - 1 for w, f in zip(times["record"], inside)]  # (a) over its own forward passes
    cbest = {k: min(v) for k, v in cpu.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    S = cfg.num_steps
    result = {
        "teacher": source, "count": cfg.count, "num_steps": S, "teacher_steps": cfg.teacher_steps,
        "cfg_scale": cfg.cfg_scale, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size, "dtype": cfg.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": times, "cpu_seconds": cpu,
        "overhead_best": best["record"] / best["forward"] - 1, "overhead_median": med["record"] / med["forward"] - 1,
        "same_run_overhead": same_run, "inside_forward_seconds": inside,
        "cpu_overhead_best": cbest["record"] / cbest["forward"] - 1,
        "cpu_overhead_median": cmed["record"] / cmed["forward"] - 1,
        "storage_alone_seconds": t_store, "store": {**ours, "record_bytes": raw}, "npz": npz,
    }
    print(f"\nteacher: {source}; {cfg.count} trajectories, S = {S} of DDIM-{cfg.teacher_steps}, cfg {cfg.cfg_scale}, "
          f"batch {cfg.batch_size}, shards of {cfg.shard_size}, {cfg.dtype}, {torch.get_num_threads()} thread(s)\n")
    print("| mode | wall s, best / median | trajectories/s (best wall) | CPU s, best / median | "
          "trajectories per CPU-s (best) | vs forward passes (CPU, best) |")
    print("|---|---|---|---|---|---|")
    for k, name in (("forward", "(b) forward passes only (bound)"), ("ode", "(c) ODE, no storage"),
                    ("record", "(a) `record`, full job")):
        print(f"| {name} | {best[k]:.2f} / {med[k]:.2f} | {cfg.count / best[k]:.1f} | {cbest[k]:.2f} / {cmed[k]:.2f} | "
              f"{cfg.count / cbest[k]:.1f} | {cbest['forward'] / cbest[k]:.3f} |")
    print(f"\noverhead of (a) over the forward passes inside the same run: median "
          f"{100 * statistics.median(same_run):+.2f}% (runs: {', '.join(f'{100 * v:+.2f}%' for v in same_run)})")
    print(f"overhead of (a) over (b): CPU time {100 * result['cpu_overhead_best']:+.1f}% (best), "
          f"{100 * result['cpu_overhead_median']:+.1f}% (median); wall time {100 * result['overhead_best']:+.1f}% (best), "
          f"{100 * result['overhead_median']:+.1f}% (median)")
    print(f"(d) the work (a) adds, timed alone (weights hash, noise, cast, pack, sha256, write): {t_store:.3f} s "
          f"= {100 * t_store / best['forward']:.2f}% of (b)\n")
    print("| layout | files for these trajectories | bytes/trajectory | disk bytes/trajectory |")
    print("|---|---|---|---|")
    print(f"| ardistill shards ({cfg.dtype}) | {ours['files']} (manifest + {ours['files'] - 1} shards) | "
          f"{ours['bytes_per_trajectory']:.0f} (record {raw}) | {ours['disk_bytes_per_trajectory']:.0f} |")
    per = npz["files_per_trajectory"]
    print(f"| .npz per sample per step (fp32, public code) | {per * cfg.count:.0f} ({per:.0f} per trajectory) | "
          f"{npz['bytes_per_trajectory']:.0f} | {npz['disk_bytes_per_trajectory']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
