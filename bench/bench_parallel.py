"""Training-step time of DDP vs FSDP2 (``--parallel ddp|fsdp``) at 2 processes on the CPU (gloo).

One step = what ``distill`` does per optimizer step: teacher-forced forward over the S blocks, per-step
MSE, backward (DDP all-reduces the gradients; FSDP2 all-gathers each block's weights for its forward
and backward and reduce-scatters the gradients), gradient clipping, AdamW (foreach), EMA update (on
the local shards under FSDP2). Random weights and inputs; the same seeds in both modes. The launcher
runs each mode under torchrun in turn, ``--rounds`` times alternating, so that load from other
processes hits both alike, and prints the median step time per mode, the ratio FSDP2 / DDP, and the
bytes of weights + gradients + AdamW moments + EMA each rank holds.

    .venv/bin/python bench/bench_parallel.py [--nproc 2] [--sizes tiny,small] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # depth, width, heads, micro-batch per process
    "tiny": dict(depth=2, width=32, heads=4, micro_batch=2),  # the tests' size (tests/test_fsdp.py)
    "small": dict(depth=6, width=256, heads=4, micro_batch=4),
}


def worker(args) -> None:
    from ardistill.io import distributed as dist
    from ardistill.models.dit import DiT, DiTConfig
    from ardistill.models.student import build_student
    from ardistill.training.distill import distill_loss
    from ardistill.training.ema import EMA
    from ardistill.training.parallel import sync_gradients
    from ardistill.training.parallel import full, local, wrap_parallel

    torch.set_num_threads(1)
    device = dist.init("cpu")
    size = SIZES[args.size]
    S = 4
    torch.manual_seed(0)
    teacher = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=size["width"], depth=size["depth"],
                            num_heads=size["heads"], num_classes=10))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name != "pos_embed":
                p.normal_(std=0.02)
    student = build_student(teacher, num_steps=S, history_layers=max(1, size["depth"] // 4),
                            block_times=[999 * (S - k) / S for k in range(S)]).train()
    n_params = sum(p.numel() for p in student.parameters())
    ema = EMA(student, 0.999)
    model = wrap_parallel(student, device, args.parallel, None, ("sample",), (ema.module,))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(1 + dist.rank())
    B = size["micro_batch"]
    x = torch.randn(B, S, 4, 8, 8, generator=g)
    target = torch.randn(B, S, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    weights = torch.ones(S)

    def step():
        with sync_gradients(model, True):
            loss, _ = distill_loss(model(x, y), target, weights)
            loss.backward()
        norm = full(torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(student)
        return float(norm)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):  # every step ends in collectives (reduction, clipping norm): ranks stay in step
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # what each rank holds: weights, gradients (same size, during the step), two AdamW moments, EMA
    held = sum(local(p).numel() * local(p).element_size() for p in params) * 4
    held += sum(local(t).numel() * local(t).element_size() for t in ema.module.state_dict().values())
    # the slowest rank sets the pace; a tensor collective (gloo can abort at exit after an object collective)
    worst = torch.tensor([statistics.median(times), float(held)], dtype=torch.float64)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    if dist.is_main():
        print("RESULT " + json.dumps({"parallel": args.parallel, "size": args.size, "world": dist.world_size(),
                                      "step_s": worst[0].item(), "bytes_per_rank": int(worst[1].item()),
                                      "params": n_params}), flush=True)
    dist.cleanup()


def launch(args, parallel: str, size: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--worker", "--parallel", parallel, "--size", size, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    if out.returncode != 0:  # measured, then failed at exit: the numbers stand, say so
        print(f"note: {parallel} {size} exited with status {out.returncode} after reporting", file=sys.stderr)
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--sizes", default="tiny,small", help=f"comma-separated of {sorted(SIZES)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="launches per mode, alternating ddp and fsdp")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    results = {}
    for size in args.sizes.split(","):
        runs = {"ddp": [], "fsdp": []}
        for _ in range(args.rounds):
            for parallel in ("ddp", "fsdp"):
                runs[parallel].append(launch(args, parallel, size))
        results[size] = {k: {"step_s": statistics.median(r["step_s"] for r in v), "bytes_per_rank": v[0]["bytes_per_rank"],
                             "params": v[0]["params"]} for k, v in runs.items()}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.nproc} processes (gloo, "
          f"1 thread each), median of {args.steps} steps x {args.rounds} launches per mode")
    print("| size (depth, width, micro-batch/process) | params | DDP step | FSDP2 step | FSDP2 / DDP | "
          "state per rank DDP | FSDP2 |")
    print("|---|---|---|---|---|---|---|")
    for size, r in results.items():
        s = SIZES[size]
        d, f = r["ddp"], r["fsdp"]
        print(f"| {size} ({s['depth']}, {s['width']}, {s['micro_batch']}) | {d['params'] / 1e6:.2f} M | "
              f"{d['step_s'] * 1e3:.1f} ms | {f['step_s'] * 1e3:.1f} ms | {f['step_s'] / d['step_s']:.2f} | "
              f"{d['bytes_per_rank'] / 2**20:.1f} MiB | {f['bytes_per_rank'] / 2**20:.1f} MiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
