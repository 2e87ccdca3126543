"""History attention: dense-mask SDPA vs block-sparse FlexAttention, at the photos and DiT-S/2 sizes.

For each configuration, in one process and interleaved (so that load from other processes hits all
variants alike), the median seconds of

- ``attention op``: one history-layer attention call, q/k/v (B, H, S*N, hd), mask M4 (or ``--mask``);
- ``student forward``: the ARD student's teacher-forced forward (``ARDStudent.forward``) under
  ``torch.no_grad()``, all layers (history layers with the mask, the others per block);

with ``sdpa`` (F.scaled_dot_product_attention + the dense (S*N, S*N) bool mask), ``flex``
(torch.compile'd flex_attention + BlockMask, tile = ardistill.models.attention.flex_block_size) and,
where the tile differs from torch's default, ``flex-128`` (BlockMask at the default 128-token tile).
The ratios are flex / sdpa (< 1: flex faster), of the median wall time and of the median CPU time
of this process (``time.process_time``; with one thread it excludes the time other processes held
the core, which makes it steadier on a shared machine). ``max |diff|`` is the largest absolute difference of the
flex output from the SDPA one (float32 rounding). FlexAttention has no backward on the CPU
(pytorch/pytorch#148752), so forward + backward cannot be compared here; on CUDA pass ``--grad`` to
time the training forward + backward as well.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attention.py --threads 1 --reps 7
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attention.py --configs photos-nh1 --reps 3   # quick

Weights are random (speed and numerics only). Compile time (first call, seconds on the CPU) is
excluded from the medians and printed separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

CONFIGS = {  # name: (DiT size overrides, S, history_layers, batch)
    "photos-nh1": (dict(depth=4, hidden_size=96, num_heads=4, patch_size=2, input_size=16, in_channels=3,
                        num_classes=10, learn_sigma=False), 4, 1, 64),
    "photos-nh4": (dict(depth=4, hidden_size=96, num_heads=4, patch_size=2, input_size=16, in_channels=3,
                        num_classes=10, learn_sigma=False), 4, 4, 64),
    "dit-s2": (dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, input_size=32, in_channels=4,
                    num_classes=1000), 4, 3, 8),
    # a smoke test of the script itself (bench/gpu_run.sh --tiny): seconds on a CPU
    "tiny": (dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=3,
                  num_classes=10, learn_sigma=False), 2, 1, 4),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_student(over: dict, S: int, nh: int, mask: str, device, seed: int = 0):
    from ardistill.models.dit import DiT, DiTConfig
    from ardistill.models.student import build_student
    torch.manual_seed(seed)
    teacher = DiT(DiTConfig(**over))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name != "pos_embed":  # adaLN-Zero init would zero every block
                p.normal_(std=0.02)
    return build_student(teacher, num_steps=S, history_layers=nh, mask=mask,
                         block_times=[999 * (S - k) / S for k in range(S)]).to(device).eval()


def run_config(name: str, mask: str, reps: int, device, grad: bool) -> list[dict]:
    from ardistill.models import attention as A
    from ardistill.models.masks import token_mask
    over, S, nh, B = CONFIGS[name]
    student = make_student(over, S, nh, mask, device)
    tc = student.cfg.teacher
    N, H = tc.num_patches, tc.num_heads
    hd = tc.hidden_size // H
    L = S * N
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, tc.in_channels, tc.input_size, tc.input_size, generator=g).to(device)
    y = torch.randint(0, tc.num_classes, (B,), generator=g).to(device)
    qkv = torch.randn(B, L, 3, H, hd, generator=g).to(device).permute(2, 0, 3, 1, 4)  # the model's layout
    q, k, v = qkv.unbind(0)

    bs = A.flex_block_size(N, device)
    masks = {"sdpa": token_mask(mask, S, N, device=device), "flex": A.flex_block_mask(mask, S, N, device)}
    if bs != 128:
        masks["flex-128"] = A.flex_block_mask(mask, S, N, device, block_size=128)
    variants = list(masks)

    def op(v_name):
        return A.attend(q, k, v, masks[v_name])

    def fwd(v_name):
        student.attention = "sdpa" if v_name == "sdpa" else "flex"
        student._mask_cache[(student.attention, S, N, str(device))] = masks[v_name]
        return student(x, y)

    def fwd_bwd(v_name):
        student.zero_grad(set_to_none=True)
        with torch.enable_grad():
            student.train()
            out = fwd(v_name)
            out.square().mean().backward()
            student.eval()
        return out.detach()

    benches = [("attention op", op), ("student forward", fwd)]
    if grad:
        benches.append(("student forward+backward", fwd_bwd))
    rows = []
    for what, fn in benches:
        outs, compile_s = {}, {}
        with torch.no_grad():
            for vn in variants:  # warm-up: compiles flex (excluded from the medians)
                _sync(device)
                t0 = time.perf_counter()
                outs[vn] = fn(vn).float()
                _sync(device)
                compile_s[vn] = time.perf_counter() - t0
            times = {vn: [] for vn in variants}
            cpu = {vn: [] for vn in variants}
            for _ in range(reps):
                for vn in variants:
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(vn)
                    _sync(device)
                    times[vn].append(time.perf_counter() - t0)
                    cpu[vn].append(time.process_time() - c0)
        med = {vn: statistics.median(t) for vn, t in times.items()}
        med_cpu = {vn: statistics.median(t) for vn, t in cpu.items()}
        for vn in variants:
            rows.append(dict(config=name, what=what, variant=vn, S=S, N=N, history_layers=nh, batch=B,
                             heads=H, width=tc.hidden_size, depth=tc.depth, mask=mask,
                             block_size=None if vn == "sdpa" else (bs if vn == "flex" else 128),
                             median_s=med[vn], ratio=med[vn] / med["sdpa"], first_call_s=compile_s[vn],
                             median_cpu_s=med_cpu[vn], cpu_ratio=med_cpu[vn] / med_cpu["sdpa"], cpu_times=cpu[vn],
                             max_abs_diff=float((outs[vn] - outs["sdpa"]).abs().max()),
                             out_scale=float(outs["sdpa"].abs().max()), times=times[vn]))
        print(f"  {name} {what}: " + ", ".join(f"{vn} {med[vn] * 1e3:.1f} ms" for vn in variants), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| config | S x N | N_h | batch | measured | kernel (tile) | median wall ms | ratio | "
             "median CPU ms | ratio | max abs diff | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kern = r["variant"] if r["block_size"] is None else f"flex ({r['block_size']})"
        diff = "-" if r["variant"] == "sdpa" else f"{r['max_abs_diff']:.1e}"
        lines.append(f"| {r['config']} | {r['S']} x {r['N']} | {r['history_layers']} | {r['batch']} | {r['what']} | "
                     f"{kern} | {r['median_s'] * 1e3:.1f} | {r['ratio']:.2f} | "
                     f"{r['median_cpu_s'] * 1e3:.1f} | {r['cpu_ratio']:.2f} | "
                     f"{diff} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--mask", default="M4")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad", action="store_true", help="also forward+backward (not on the CPU: no flex backward)")
    ap.add_argument("--json", help="write the raw rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.grad and device.type == "cpu":
        ap.error("--grad needs a device where FlexAttention has a backward (CUDA); the CPU has none")
    from ardistill.models import attention as A
    if device.type == "cpu" and not A.flex_cpu_supported():
        msg = (f"FlexAttention cannot run here: PyTorch runs {torch.backends.cpu.get_cpu_capability()} kernels "
               "(inductor's CPU FlexAttention needs AVX2 or AVX-512); nothing to compare")
        print(f"# {msg}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(torch=torch.__version__, device=str(device), skipped=msg, rows=[]), f, indent=1)
        return
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), device {device}, mask {args.mask}, {args.reps} reps", flush=True)
    rows = []
    for name in args.configs.split(","):
        rows += run_config(name, args.mask, args.reps, device, args.grad)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                           mask=args.mask, reps=args.reps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
