"""Sampling latency: ARD (KV-cached, S steps) vs step distillation (S steps) vs the teacher's guided DDIM.

All three use the same transformer size. ARD has history_layers = depth / 4 (mask M4) and reads its
KV cache; step distillation is the same student with history_layers = 0; the teacher runs
``teacher_steps`` DDIM steps with classifier-free guidance (each step a forward pass on a 2x batch).
Latency per image = median wall time of one sampling call / batch size. The two students are
timed interleaved so that load from other processes hits both alike. Also prints the analytic FLOPs
(ardistill.evaluation.flops) of the same three samplers.

    .venv/bin/python bench/bench_sampling.py [--depth 4] [--batch 1] [--reps 21] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ardistill.sampling.diffusion import VPProcess
from ardistill.models.dit import DiT, DiTConfig
from ardistill.evaluation.flops import gmacs, sampling_flops
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import solve
from ardistill.models.student import build_student


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _quartiles(v: list[float]) -> list[float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else v * 3
    return [q[0], statistics.median(v), q[2]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--input-size", type=int, default=16, help="latent side; 16 -> 64 tokens with patch 2")
    p.add_argument("--num-steps", type=int, default=4, help="student steps S")
    p.add_argument("--history-layers", type=int, default=None, help="ARD's N_h (default depth // 4)")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=21, help="timed calls per student")
    p.add_argument("--teacher-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="also time ARD's sampler through torch.compile (row ard_compiled), interleaved with eager")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    S, nh = args.num_steps, (args.depth // 4 if args.history_layers is None else args.history_layers)
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=args.input_size, patch_size=2, in_channels=4, hidden_size=args.width, depth=args.depth,
                    num_heads=args.heads, num_classes=1000)
    teacher = DiT(cfg).eval()
    with torch.no_grad():
        for name, q in teacher.named_parameters():
            if name != "pos_embed":
                q.normal_(std=0.02)
    times = [999 * (S - k) / S for k in range(S)]
    ard = build_student(teacher, num_steps=S, history_layers=nh, block_times=times).eval()
    sd = build_student(teacher, num_steps=S, history_layers=0, block_times=times).eval()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    model_fn = make_model_fn(teacher, args.cfg_scale)
    process = VPProcess()

    samplers = {"ard": ard.sample, "step_distillation": sd.sample}
    compile_s = None
    if args.compile:
        samplers["ard_compiled"] = torch.compile(ard.sample)
    with torch.inference_mode():
        for name, f in samplers.items():  # warm-up (compilation happens here)
            t0 = time.perf_counter()
            f(noise, y)
            if name == "ard_compiled":
                compile_s = time.perf_counter() - t0
        solve(model_fn, process, noise, y, args.teacher_steps, "ddim")
        lat = {name: [] for name in samplers}
        names = list(samplers)
        for r in range(args.reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                lat[name].append(_timed(lambda: samplers[name](noise, y)) / args.batch)
        lat["teacher"] = [_timed(lambda: solve(model_fn, process, noise, y, args.teacher_steps, "ddim")) / args.batch
                          for _ in range(args.teacher_reps)]
    med = {k: statistics.median(v) for k, v in lat.items()}
    fl = sampling_flops(cfg, args.teacher_steps, S, nh, "M4", args.cfg_scale)
    result = {
        "config": {**vars(args), "history_layers": nh, "tokens_per_block": (args.input_size // 2) ** 2},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "latency_per_image_s": {k: [round(t, 5) for t in v] for k, v in lat.items()},
        "median_latency_per_image_s": med,
        "ard_over_step_distillation": med["ard"] / med["step_distillation"],
        # the fastest call of each: the one least disturbed by other processes (timeit's convention)
        "ard_over_step_distillation_min": min(lat["ard"]) / min(lat["step_distillation"]),
        # ratio of each interleaved pair of calls: less sensitive to load that drifts during the run
        "ard_over_step_distillation_paired": _quartiles([a / b for a, b in zip(lat["ard"], lat["step_distillation"])]),
        "teacher_over_ard": med["teacher"] / med["ard"],
        "gmacs_per_image": {k: gmacs(v) for k, v in fl.as_dict().items() if k != "ard_overhead"},
        "flops_ard_overhead": fl.ard_overhead,
    }
    if "ard_compiled" in med:
        result["ard_compiled_speedup"] = med["ard"] / med["ard_compiled"]
        result["compile_seconds"] = compile_s
    print(f"depth {args.depth}, width {args.width}, {(args.input_size // 2) ** 2} tokens, S = {S}, ARD history_layers "
          f"{nh}; teacher DDIM-{args.teacher_steps} cfg {args.cfg_scale}; batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for k in ("ard", "step_distillation", "teacher"):
        print(f"  {k:18s} median {med[k] * 1e3:9.1f} ms/image  ({gmacs(getattr(fl, k)):.2f} GMACs/image)")
    q = result["ard_over_step_distillation_paired"]
    print(f"ARD / step distillation: {result['ard_over_step_distillation']:.3f} (paired calls: median {q[1]:.3f}, "
          f"quartiles {q[0]:.3f}..{q[2]:.3f}; fastest calls {result['ard_over_step_distillation_min']:.3f}) "
          f"(FLOPs: {1 + fl.ard_overhead:.4f}); teacher / ARD: {result['teacher_over_ard']:.1f}x "
          f"(FLOPs: {fl.teacher / fl.ard:.1f}x)")
    if "ard_compiled" in med:
        print(f"ARD compiled: median {med['ard_compiled'] * 1e3:.1f} ms/image, {result['ard_compiled_speedup']:.2f}x eager "
              f"(first call, with compilation: {compile_s:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
