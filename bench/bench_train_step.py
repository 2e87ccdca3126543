"""Training-step throughput: ARDStudent vs the public-code-style naive student (same weights, same batch).

One training step = teacher-forced forward over the S blocks, per-step MSE, backward, AdamW step.
The naive model (ardistill.models.naive_student) computes adaLN per token and runs every layer over the
whole S*N sequence with an additive mask; ARDStudent computes adaLN once per block and runs the
layers above history_layers per block without a mask. Steps of the two models are interleaved so
that load from other processes hits both alike. Defaults: DiT-B/2 width (768, 12 heads), depth 4,
S = 4 blocks of 64 tokens (16x16x4 latents, patch 2), history_layers = depth / 4, batch 4.

    .venv/bin/python bench/bench_train_step.py [--depth 4] [--batch 4] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ardistill.models.dit import DiT, DiTConfig
from ardistill.models.naive_student import NaiveARDStudent
from ardistill.models.student import build_student
from ardistill.training.distill import distill_loss


def make_models(depth: int, history_layers: int, S: int, width: int, heads: int, input_size: int, seed: int = 0):
    """ARDStudent and the naive student with the same (random, non-trivial) weights."""
    torch.manual_seed(seed)
    teacher = DiT(DiTConfig(input_size=input_size, patch_size=2, in_channels=4, hidden_size=width, depth=depth,
                            num_heads=heads, num_classes=1000))
    with torch.no_grad():  # adaLN-Zero init zeroes the gates; random weights make the check meaningful
        for name, p in teacher.named_parameters():
            if name != "pos_embed":
                p.normal_(std=0.02)
    ard = build_student(teacher, num_steps=S, history_layers=history_layers,
                        block_times=[999 * (S - k) / S for k in range(S)]).train()
    naive = NaiveARDStudent(ard.cfg).train()
    naive.load_state_dict(ard.state_dict(), strict=True)
    return ard, naive


def train_step(model, opt, x, y, target, weights) -> float:
    loss, _ = distill_loss(model(x, y), target, weights)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--history-layers", type=int, default=None, help="default depth // 4")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--num-steps", type=int, default=4, help="S blocks")
    p.add_argument("--input-size", type=int, default=16, help="latent side; 16 -> 64 tokens with patch 2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nh = args.depth // 4 if args.history_layers is None else args.history_layers
    S = args.num_steps
    ard, naive = make_models(args.depth, nh, S, args.width, args.heads, args.input_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, S, 4, args.input_size, args.input_size, generator=g)
    target = torch.randn(x.shape, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    weights = torch.ones(S)

    # identical loss (and gradients) before any update: same weights, same batch
    losses, grads = {}, {}
    for name, m in (("ard", ard), ("naive", naive)):
        loss, _ = distill_loss(m(x, y), target, weights)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {k: v.grad.clone() for k, v in m.named_parameters() if v.grad is not None}
        m.zero_grad(set_to_none=True)
    loss_diff = abs(losses["ard"] - losses["naive"])
    grad_rel = max(((grads["ard"][k] - grads["naive"][k]).norm() / grads["ard"][k].norm().clamp_min(1e-30)).item()
                   for k in grads["ard"])

    opts = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            for n, m in (("ard", ard), ("naive", naive))}
    times = {"ard": [], "naive": []}
    step_losses = {"ard": [], "naive": []}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.reps):
        order = (("ard", ard), ("naive", naive)) if r % 2 == 0 else (("naive", naive), ("ard", ard))
        for name, m in order:
            t0 = time.perf_counter()
            step_losses[name].append(train_step(m, opts[name], x, y, target, weights))
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {**vars(args), "history_layers": nh, "tokens_per_block": (args.input_size // 2) ** 2},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_step_seconds": med,
        "trajectories_per_second": {k: args.batch / v for k, v in med.items()},
        "speedup": med["naive"] / med["ard"],
        "loss_first_step": losses, "loss_abs_diff": loss_diff, "grad_max_rel_diff": grad_rel,
        "loss_after_steps": {k: v[-1] for k, v in step_losses.items()},
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(f"depth {args.depth} (history_layers {nh}), width {args.width}, S = {S} x {(args.input_size // 2) ** 2} "
          f"tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"median step: ARDStudent {med['ard']:.3f} s, naive {med['naive']:.3f} s -> speed-up {result['speedup']:.2f}x")
    print(f"loss at the same weights: ARD {losses['ard']:.8f}, naive {losses['naive']:.8f} (|diff| {loss_diff:.2e}); "
          f"max relative gradient difference {grad_rel:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
