"""One photos student training step, measured against its FLOP count and this CPU's matmul rate.

A step is what `ardistill distill` does per optimizer step on the photos benchmark: teacher-forced
forward over S = 4 blocks of 64 tokens (batch 64), per-step MSE, backward, gradient clipping, AdamW,
EMA update. The student is built from the shipped photos teacher (DiT-photos-S, or ``--model``
DiT-photos-T at random weights). Variants run interleaved, in one process, on the same batch, so
that load from other processes hits them alike; the table gives median seconds per step and the
ratio to the first (eager, the distill loop's settings before issue 23).

    .venv/bin/python bench/bench_photos_step.py --threads 1 --reps 20
    .venv/bin/python bench/bench_photos_step.py --threads 1 --variants eager,foreach,fused,compile

Variants: ``eager`` (AdamW's default implementation on CPU, which is the per-tensor loop), ``foreach``
(AdamW foreach=True), ``fused`` (AdamW fused=True: one C++ kernel), ``compile`` (fused AdamW + the
student's forward compiled with torch.compile / inductor; backward through AOTAutograd).
Every variant starts from the same weights and takes the same steps; the table's last column is the
largest relative difference of its weights from eager's after the timed steps (float32 rounding only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

VARIANTS = ("eager", "foreach", "fused", "compile")


def matmul_gflops(threads: int, n: int = 512, reps: int = 20) -> float:
    """This CPU's float32 GEMM rate (GFLOP/s) at a square size like the step's largest matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def step_flops(student, batch: int) -> dict:
    """Analytic FLOPs of one training step: forward matmuls (2 per MAC) x 3 for forward + backward."""
    cfg = student.cfg
    tc = cfg.teacher
    D, depth, S = tc.hidden_size, tc.depth, cfg.num_steps
    N = tc.num_patches
    T = batch * S * N  # tokens
    p2c = tc.patch_size ** 2 * tc.in_channels
    per_token_layer = 2 * (4 * D * D + 2 * D * int(D * tc.mlp_ratio))  # qkv + proj, MLP
    lin = depth * T * per_token_layer + 2 * T * p2c * D * 2  # + patch embed and head
    nh = cfg.history_layers if cfg.uses_history else 0
    attn = 0
    for i in range(depth):  # QK^T and AV: 2 * 2 * L_q * L_k * D per sequence
        L = S * N if i < nh else N
        seqs = batch if i < nh else batch * S
        attn += seqs * 4 * L * L * D
    adaln = depth * batch * S * 2 * D * 6 * D  # per block, not per token
    fwd = lin + attn + adaln
    return {"forward": fwd, "step": 3 * fwd}


def make_student(model: str, history_layers: int, S: int, seed: int = 0):
    from ardistill.models.dit import DiT, DiTConfig, DiT_models
    from ardistill.models.student import build_student
    if model == "shipped":
        from ardistill.assets import PHOTOS_TEACHER
        from ardistill.io.checkpoints import load_any_teacher
        teacher = load_any_teacher(PHOTOS_TEACHER)
    else:
        torch.manual_seed(seed)
        teacher = DiT(DiTConfig(**DiT_models[model]))
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name != "pos_embed":
                    p.normal_(std=0.02)
    times = [999 * (S - k) / S for k in range(S)]
    return build_student(teacher, num_steps=S, history_layers=history_layers, block_times=times).train()


class Trainer:
    """One variant: its own copy of the student, optimizer and EMA; ``step`` is one distill step."""

    def __init__(self, variant: str, student, lr: float = 3e-4):
        import copy
        from ardistill.training.ema import EMA
        from ardistill.training.distill import distill_loss
        self.variant, self.loss_fn = variant, distill_loss
        self.student = copy.deepcopy(student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        kw = {"eager": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "compile": {"fused": True}}[variant]
        self.opt = torch.optim.AdamW(self.params, lr=lr, **kw)
        self.ema = EMA(self.student, 0.999, warmup=True)
        self.forward = torch.compile(self.student) if variant == "compile" else self.student

    def step(self, x, y, target, weights) -> float:
        loss, _ = self.loss_fn(self.forward(x, y), target, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.student)
        return loss.item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shipped", help="'shipped' (photos teacher) or a DiT_models name at random weights")
    p.add_argument("--history-layers", type=int, default=1)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 with TF32 matmuls on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators over 3 steps of the first variant")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"unknown variants {sorted(bad)}; choose from {VARIANTS}")
    S = args.num_steps
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    base = make_student(args.model, args.history_layers, S).to(device)
    tc = base.cfg.teacher
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, S, tc.in_channels, tc.input_size, tc.input_size)
    x, target = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    y = torch.randint(0, tc.num_classes, (args.batch,), generator=g).to(device)
    weights = torch.ones(S, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    trainers = {v: Trainer(v, base) for v in variants}
    t_compile = {}
    for v, tr in trainers.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            tr.step(x, y, target, weights)
        t_compile[v] = time.perf_counter() - t0
    times = {v: [] for v in variants}
    for r in range(args.reps):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            sync()
            t0 = time.perf_counter()
            trainers[v].step(x, y, target, weights)
            sync()
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    ref = trainers[variants[0]].student.state_dict()
    diff = {}
    for v, tr in trainers.items():
        sd = tr.student.state_dict()
        diff[v] = max(((sd[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref)
    flops = step_flops(base, args.batch)
    rate = matmul_gflops(args.threads) if device.type == "cpu" else float("nan")
    print(f"photos student step: {args.model} (depth {tc.depth}, width {tc.hidden_size}), S = {S} x "
          f"{tc.num_patches} tokens, N_h = {base.cfg.history_layers}, batch {args.batch}, {args.threads} thread(s)")
    print(f"analytic {flops['step'] / 1e9:.1f} GFLOP per step; measured float32 GEMM (512^3) {rate:.1f} GFLOP/s "
          f"-> matmul bound {flops['step'] / 1e9 / rate:.3f} s")
    print(f"| variant | median s/step | ratio to {variants[0]} | GFLOP/s achieved | % of GEMM rate | first {args.warmup} steps (s) | max rel. weight diff vs {variants[0]} |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        ach = flops["step"] / med[v] / 1e9
        print(f"| {v} | {med[v]:.3f} | {med[variants[0]] / med[v]:.2f}x | {ach:.1f} | {100 * ach / rate:.0f}% | "
              f"{t_compile[v]:.1f} | {diff[v]:.1e} |")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"config": vars(args), "machine": {"device": card, "torch": torch.__version__},
              "flops": flops, "gemm_gflops": rate, "median_s": med, "times": times, "warmup_s": t_compile,
              "weight_rel_diff": diff}
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(3):
                trainers[variants[0]].step(x, y, target, weights)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
