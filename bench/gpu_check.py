"""GPU check at real scale: DiT-XL/2 teacher and ARD student (random weights) on 256 px latents (4 x 32 x 32).

Measures, on one GPU, within a few minutes:
1. training step time and peak memory (bf16 autocast + TF32, AdamW, grad clip, EMA; S = 4,
   history_layers = 6, 4 x 256 tokens) at micro-batch 8 and 32, for the public-code-style
   reference (``NaiveARDStudent``: per-token adaLN, full-sequence additive mask in every layer)
   and for ``ARDStudent`` (per-block adaLN, masks only in the history layers), with and without
   activation checkpointing;
2. sampling latency per image at batch 64: ARD 4-step (KV cache), step distillation 4-step, and
   the teacher's DDIM-25 with guidance 1.5;
3. achieved FLOP/s (analytic model FLOPs, evaluation/flops.py) against the card's dense bf16 matmul peak
   (spec sheet) and against a measured bf16 GEMM;
4. cached sampling == teacher-forced forward fed the sampler's own outputs, in fp32 and bf16,
   and ARDStudent == NaiveARDStudent (fp32);
5. the text-to-image student of PixArt-XL-2 at 256 px (``TextARDStudent``, 28 blocks, width 1152,
   cross-attention to 120 T5-width tokens of mixed lengths, 4 x 256 image tokens): training step time
   and peak memory, sampling latency (KV cache, caption K/V once per sample), cached == teacher-forced
   in fp32 and bf16 (docs/t2i.md's recipe; ``--skip-pixart`` leaves it out).

Usage:
    python bench/gpu_check.py                      # full size on CUDA; updates docs/benchmarks.md
    python bench/gpu_check.py --tiny               # tiny sizes, runs on CPU in seconds (a smoke test)
    python bench/gpu_check.py --out results.json --markdown none
Random weights: the numbers are speed, memory and numerics, never sample quality.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ardistill.sampling.diffusion import VPProcess  # noqa: E402
from ardistill.models.dit import DiT, dit_config  # noqa: E402
from ardistill.training.ema import EMA  # noqa: E402
from ardistill.evaluation.flops import forward_flops, history_attention_flops, sampling_flops  # noqa: E402
from ardistill.sampling.guidance import make_model_fn  # noqa: E402
from ardistill.models.naive_student import NaiveARDStudent  # noqa: E402
from ardistill.sampling.ode import solve  # noqa: E402
from ardistill.models.student import ARDStudent, StudentConfig  # noqa: E402
from ardistill.models.text_dit import TextDiT, TextDiTConfig, text_dit_config  # noqa: E402
from ardistill.models.student import TextARDStudent, TextStudentConfig  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's spec sheets, FLOP/s; matched on the device name.
SPEC_PEAK_BF16 = [
    (r"H200", 989.4e12),
    (r"H100.*PCIe", 756.0e12),
    (r"H100.*NVL", 835.5e12),
    (r"H100", 989.4e12),  # SXM
    (r"A100", 312.0e12),
    (r"L40S", 362.1e12),
]
MARK = "<!-- gpu_check: {} -->"


@dataclass(frozen=True)
class Sizes:
    """What is measured; ``FULL`` is the paper's ImageNet-256 setting, ``TINY`` a CPU smoke test."""

    arch: str
    input_size: int
    num_classes: int
    num_steps: int
    history_layers: int
    train_batches: tuple[int, ...]
    sample_batch: int
    teacher_steps: int
    cfg_scale: float
    warmup: int
    iters: int
    equiv_batch: int
    gemm_size: int


FULL = Sizes("DiT-XL/2", 32, 1000, 4, 6, (8, 32), 64, 25, 1.5, warmup=2, iters=5, equiv_batch=4, gemm_size=8192)
TINY = Sizes("DiT-T/2", 8, 10, 4, 1, (2, 4), 4, 25, 1.5, warmup=1, iters=1, equiv_batch=2, gemm_size=256)


def pixart_config(tiny: bool) -> TextDiTConfig:
    """PixArt-Sigma-XL-2-256x256's transformer (32x32x4 latents, T5-XXL width, position scale 0.5), or a tiny one."""
    if tiny:
        return TextDiTConfig(input_size=(8, 8), sample_size=8, in_channels=4, hidden_size=96, depth=2, num_heads=4,
                             caption_channels=32, learn_sigma=True)
    return text_dit_config("PixArt-XL/2", input_size=(32, 32), sample_size=32, interpolation_scale=0.5)


PIXART_TEXT_TOKENS = 120  # captions padded to 120 tokens, real lengths spread over 10..120


# ------------------------------------------------------------------------------------------------
# helpers


def card_peak(name: str) -> float | None:
    for pattern, peak in SPEC_PEAK_BF16:
        if re.search(pattern, name):
            return peak
    return None


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights at a trainable scale: N(0, 1/fan_in) matrices, small biases, unit embeddings.

    DiT's own init zeroes adaLN and the output layer, which would make every comparison trivial.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue  # fixed sin-cos, part of the architecture
        if p.dim() >= 2:
            fan_in = p[0].numel()
            std = 1.0 if "embedding_table" in name else fan_in ** -0.5
        else:
            std = 0.02
        p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------------
# measurements


def measure_gemm(device: torch.device, n: int, iters: int = 10) -> float:
    """Achieved bf16 (GPU) / fp32 (CPU) GEMM FLOP/s on n x n x n."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, warmup=3, iters=iters)
    return 2 * n ** 3 / s


def train_flops_per_sample(scfg: StudentConfig) -> int:
    """Model FLOPs of one teacher-forced training sample: 3 x forward (forward + backward)."""
    tc = scfg.teacher
    fwd = scfg.num_steps * forward_flops(tc, out_channels=tc.in_channels)
    fwd += history_attention_flops(tc, scfg.num_steps, scfg.history_layers, scfg.mask)
    return 3 * fwd


def bench_train(name: str, model: torch.nn.Module, batch: int, scfg: StudentConfig, device: torch.device,
                sizes: Sizes, peak: float | None) -> dict:
    """One configuration: AdamW step with bf16 autocast, grad clip 1, EMA; step time and peak memory."""
    tc = scfg.teacher
    row = {"model": name, "batch": batch, "tokens": scfg.num_steps * tc.num_patches}
    reset_memory(device)
    opt = ema = None
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        ema = EMA(model, 0.9999)
        g = torch.Generator().manual_seed(batch)
        shape = (batch, scfg.num_steps, tc.in_channels, tc.input_size, tc.input_size)
        x = torch.randn(shape, generator=g).to(device)
        target = torch.randn(shape, generator=g).to(device)
        y = torch.randint(0, tc.num_classes, (batch,), generator=g).to(device)

        def step():
            with autocast(device, "bf16"):
                pred = model(x, y)
            loss = (pred.float() - target).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)

        s = timed(step, device, sizes.warmup, sizes.iters)
        flops = train_flops_per_sample(scfg) * batch / s
        row.update(step_s=s, samples_per_s=batch / s, peak_gib=peak_gib(device), tflops=flops / 1e12,
                   mfu=flops / peak if peak else None)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        row.update(error="out of memory")
    finally:
        opt = ema = None  # free the optimizer state and EMA copy before the next configuration
        model.zero_grad(set_to_none=True)
        reset_memory(device)
    return row


@torch.no_grad()
def bench_sampling(student: ARDStudent, teacher: DiT, sizes: Sizes, device: torch.device, peak: float | None) -> list[dict]:
    """Latency per image at batch ``sample_batch``: ARD (KV cache), step distillation, teacher DDIM + CFG."""
    tc = teacher.cfg
    B = sizes.sample_batch
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, tc.in_channels, tc.input_size, tc.input_size, generator=g).to(device)
    y = torch.randint(0, tc.num_classes, (B,), generator=g).to(device)
    fl = sampling_flops(tc, sizes.teacher_steps, sizes.num_steps, student.cfg.history_layers, student.cfg.mask,
                        sizes.cfg_scale)
    rows = []
    student.eval()
    ard_cfg = student.cfg
    for label, cfg, flops in ((f"ARD {sizes.num_steps}-step (N_h = {ard_cfg.history_layers}, KV cache)", ard_cfg, fl.ard),
                              (f"step distillation {sizes.num_steps}-step (N_h = 0)",
                               replace(ard_cfg, history_layers=0), fl.step_distillation)):
        student.cfg = cfg
        try:
            with autocast(device, "bf16"):
                s = timed(lambda: student.sample(noise, y), device, 1, sizes.iters)
        finally:
            student.cfg = ard_cfg
        rows.append({"sampler": label, "batch": B, "ms_per_image": 1e3 * s / B, "tflops": flops * B / s / 1e12,
                     "mfu": flops * B / s / peak if peak else None})
    model_fn = make_model_fn(teacher.eval(), sizes.cfg_scale)
    with autocast(device, "bf16"):
        s = timed(lambda: solve(model_fn, VPProcess(), noise, y, sizes.teacher_steps, "ddim"), device, 1,
                  max(1, sizes.iters // 2))
    rows.append({"sampler": f"teacher DDIM-{sizes.teacher_steps}, CFG {sizes.cfg_scale}", "batch": B,
                 "ms_per_image": 1e3 * s / B, "tflops": fl.teacher * B / s / 1e12,
                 "mfu": fl.teacher * B / s / peak if peak else None})
    return rows


@torch.no_grad()
def check_equivalence(student: ARDStudent, naive: NaiveARDStudent, sizes: Sizes, device: torch.device) -> list[dict]:
    """max |cached - teacher-forced| / max |teacher-forced| over all S predictions, per precision."""
    tc = student.cfg.teacher
    g = torch.Generator().manual_seed(1)
    B = sizes.equiv_batch
    noise = torch.randn(B, tc.in_channels, tc.input_size, tc.input_size, generator=g).to(device)
    y = torch.randint(0, tc.num_classes, (B,), generator=g).to(device)
    student.eval()
    naive.eval()
    rows = []
    for precision in ("fp32", "bf16"):
        with autocast(device, precision):
            cached = student.sample(noise, y, return_all=True).float()  # (B, S, C, H, W)
            inputs = torch.cat([noise.unsqueeze(1), cached[:, :-1]], dim=1)
            forced = student(inputs, y).float()
        err = (cached - forced).abs().max() / forced.abs().max()
        rows.append({"check": f"cached sampler vs teacher-forced ({precision})", "rel_max_err": float(err)})
    ours = student(inputs, y).float()
    ref = naive(inputs, y).float()
    rows.append({"check": "ARDStudent vs NaiveARDStudent teacher-forced (fp32)",
                 "rel_max_err": float((ours - ref).abs().max() / ref.abs().max())})
    return rows


def _captions(B: int, T: int, C: int, device: torch.device, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(max(T // 12, 1), T, B).round().long()
    mask = torch.arange(T)[None] < lengths[:, None]
    return (torch.randn(B, T, C, generator=g) * mask[..., None]).to(device), mask.to(device)


def bench_pixart(sizes: Sizes, device: torch.device, tiny: bool) -> dict:
    """The PixArt-XL-2 256 text student: equivalence, training steps, sampling latency (random weights)."""
    tcfg = pixart_config(tiny)
    T = 16 if tiny else PIXART_TEXT_TOKENS
    S, Nh = sizes.num_steps, sizes.history_layers
    times = [float(t) for t in VPProcess().timesteps(sizes.teacher_steps)]
    block_times = tuple(times[0] * (S - k) / S for k in range(S))
    scfg = TextStudentConfig(teacher=tcfg, num_steps=S, history_layers=Nh, block_times=block_times)
    with torch.device(device):
        teacher = randomize_(TextDiT(tcfg), seed=3).eval()
        student = TextARDStudent.from_teacher(teacher, scfg)
    del teacher
    n_params = sum(p.numel() for p in student.parameters())
    out = {"arch": "PixArt-XL/2 (256 px)" if not tiny else "tiny PixArt", "params": n_params, "text_tokens": T,
           "tokens": S * tcfg.num_patches, "equivalence": [], "train": [], "sampling": []}
    shape = (tcfg.in_channels, *tcfg.input_size)
    # equivalence: cached sampling == teacher-forced forward fed the sampler's outputs (captions of mixed lengths)
    B = sizes.equiv_batch
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, *shape, generator=g).to(device)
    text, mask = _captions(B, T, tcfg.caption_channels, device)
    student.eval()
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with autocast(device, precision):
                cached = student.sample(noise, text, mask, return_all=True).float()
                forced = student(torch.cat([noise.unsqueeze(1), cached[:, :-1]], dim=1), text, mask).float()
            err = (cached - forced).abs().max() / forced.abs().max()
            out["equivalence"].append({"check": f"PixArt student: cached vs teacher-forced ({precision})",
                                       "rel_max_err": float(err)})
    # training: AdamW step with bf16 autocast, grad clip, EMA
    for batch in sizes.train_batches:
        for ckpt in (False, True):
            student.cfg = replace(scfg, grad_checkpointing=ckpt)
            row = {"model": "TextARDStudent" + (" + activation checkpointing" if ckpt else ""), "batch": batch,
                   "tokens": out["tokens"]}
            reset_memory(device)
            opt = ema = None
            try:
                student.train()
                params = [p for p in student.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)
                ema = EMA(student, 0.9999)
                g = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, S, *shape, generator=g).to(device)
                target = torch.randn(batch, S, *shape, generator=g).to(device)
                tx, tm = _captions(batch, T, tcfg.caption_channels, device, seed=batch)

                def step():
                    with autocast(device, "bf16"):
                        pred = student(x, tx, tm)
                    (pred.float() - target).pow(2).mean().backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    ema.update(student)

                s = timed(step, device, sizes.warmup, sizes.iters)
                row.update(step_s=s, samples_per_s=batch / s, peak_gib=peak_gib(device))
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                row.update(error="out of memory")
            finally:
                opt = ema = None
                student.zero_grad(set_to_none=True)
                reset_memory(device)
            out["train"].append(row)
            print(f"[gpu_check] pixart {row}", flush=True)
    student.cfg = scfg
    # sampling latency per image (latents only; T5 and the VAE decoder are not included)
    student.eval()
    B = sizes.sample_batch
    noise = torch.randn(B, *shape, generator=torch.Generator().manual_seed(4)).to(device)
    text, mask = _captions(B, T, tcfg.caption_channels, device, seed=5)
    with torch.no_grad():
        for label, cfg in ((f"ARD {S}-step (N_h = {Nh}, KV cache)", scfg),
                           (f"step distillation {S}-step (N_h = 0)", replace(scfg, history_layers=0))):
            student.cfg = cfg
            try:
                with autocast(device, "bf16"):
                    s = timed(lambda: student.sample(noise, text, mask), device, 1, sizes.iters)
            finally:
                student.cfg = scfg
            out["sampling"].append({"sampler": label, "batch": B, "ms_per_image": 1e3 * s / B})
    student.to("cpu")
    del student
    reset_memory(device)
    return out


# ------------------------------------------------------------------------------------------------
# report


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def to_markdown(r: dict) -> str:
    """The results as the markdown section docs/benchmarks.md holds per card."""
    lines = [MARK.format(r["card"]), f"### {r['card']}", "",
             f"`python bench/gpu_check.py{' --tiny' if r['tiny'] else ''}` on {r['date']}; torch {r['torch']}, "
             f"CUDA {r['cuda']}; {r['sizes']['arch']} with random weights, latents {r['latent_shape']}, "
             f"S = {r['sizes']['num_steps']}, history_layers = {r['sizes']['history_layers']}; bf16 autocast"
             f"{' + TF32' if r['cuda'] else ''}. Spec dense bf16 peak: {_f(r['spec_peak_tflops'], '.0f')} TFLOP/s; "
             f"measured {'bf16' if r['cuda'] else 'fp32'} GEMM ({r['sizes']['gemm_size']}^3): "
             f"{r['gemm_tflops']:.3g} TFLOP/s. MFU = model FLOPs (evaluation/flops.py) / spec peak.",
             "", "Training step (AdamW, grad clip 1, EMA; median of "
             f"{r['sizes']['iters']} steps after {r['sizes']['warmup']} warm-up):", "",
             "| model | micro-batch | tokens/sample | step (ms) | samples/s | peak memory (GiB) | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for t in r["train"]:
        if "error" in t:
            lines.append(f"| {t['model']} | {t['batch']} | {t['tokens']} | {t['error']} | | | | |")
        else:
            lines.append(f"| {t['model']} | {t['batch']} | {t['tokens']} | {1e3 * t['step_s']:.1f} | "
                         f"{t['samples_per_s']:.1f} | {_f(t['peak_gib'], '.1f')} | {t['tflops']:.3g} | "
                         f"{_f(t['mfu'], '.1%')} |")
    lines += ["", f"Sampling (bf16 autocast, batch {r['sizes']['sample_batch']}, latents only, no VAE decode):", "",
              "| sampler | ms / image | TFLOP/s | MFU |", "|---|---|---|---|"]
    for s in r["sampling"]:
        lines.append(f"| {s['sampler']} | {s['ms_per_image']:.3g} | {s['tflops']:.3g} | {_f(s['mfu'], '.1%')} |")
    lines += ["", "Equivalence (relative max error over all S predictions):", "", "| check | rel. max error |",
              "|---|---|"]
    for e in r["equivalence"]:
        lines.append(f"| {e['check']} | {e['rel_max_err']:.2e} |")
    if r.get("pixart"):
        px = r["pixart"]
        lines += ["", f"Text-to-image student of {px['arch']} ({px['params'] / 1e6:.3g}M parameters, {px['tokens']} "
                      f"image tokens per sample, captions padded to {px['text_tokens']} tokens), bf16 autocast:", "",
                  "| model | micro-batch | step (ms) | samples/s | peak memory (GiB) |", "|---|---|---|---|---|"]
        for t in px["train"]:
            if "error" in t:
                lines.append(f"| {t['model']} | {t['batch']} | {t['error']} | | |")
            else:
                lines.append(f"| {t['model']} | {t['batch']} | {1e3 * t['step_s']:.1f} | {t['samples_per_s']:.1f} | "
                             f"{_f(t['peak_gib'], '.1f')} |")
        lines += ["", "| sampler (latents only, no T5, no VAE) | batch | ms / image |", "|---|---|---|"]
        for s in px["sampling"]:
            lines.append(f"| {s['sampler']} | {s['batch']} | {s['ms_per_image']:.3g} |")
        lines += ["", "| check | rel. max error |", "|---|---|"]
        for e in px["equivalence"]:
            lines.append(f"| {e['check']} | {e['rel_max_err']:.2e} |")
    lines.append(f"\nWall time of the whole check: {r['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, card: str, section: str) -> None:
    """Replace this card's section in ``path`` (between its marker and the next one), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    mark = MARK.format(card)
    if mark in text:
        start = text.index(mark)
        nxt = text.find("<!-- gpu_check: ", start + len(mark))
        text = text[:start] + section + (("\n" + text[nxt:]) if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------


def run(sizes: Sizes, device: torch.device, tiny: bool, out: str | None = None, pixart: bool = True) -> dict:
    t_start = time.perf_counter()

    def save_partial(results: dict) -> None:  # a run cut short by a time limit still leaves its numbers
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
    else:
        card = "CPU"
    peak = card_peak(card) if device.type == "cuda" else None
    tcfg = dit_config(sizes.arch, input_size=sizes.input_size, in_channels=4, num_classes=sizes.num_classes)
    with torch.device(device):  # build on the device: no 2.7 GB host copies
        teacher = randomize_(DiT(tcfg), seed=0).eval()
    times = [float(t) for t in VPProcess().timesteps(sizes.teacher_steps)]
    # block times of the public code's k/S labels (values do not change the cost)
    block_times = tuple(times[0] * (sizes.num_steps - k) / sizes.num_steps for k in range(sizes.num_steps))
    scfg = StudentConfig(teacher=tcfg, num_steps=sizes.num_steps, history_layers=sizes.history_layers,
                         block_times=block_times)
    with torch.device(device):
        student = ARDStudent.from_teacher(teacher, scfg)
    results = {"card": card, "tiny": tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": time.strftime("%Y-%m-%d"), "sizes": {k: v for k, v in sizes.__dict__.items()},
               "latent_shape": [tcfg.in_channels, tcfg.input_size, tcfg.input_size],
               "spec_peak_tflops": peak / 1e12 if peak else None}
    print(f"[gpu_check] {card}: {sizes.arch}, latents {results['latent_shape']}", flush=True)
    results["gemm_tflops"] = measure_gemm(device, sizes.gemm_size) / 1e12
    print(f"[gpu_check] GEMM {results['gemm_tflops']:.1f} TFLOP/s", flush=True)

    # equivalence first (fp32 weights, no optimizer state on the device)
    teacher.to("cpu")  # the training benchmarks hold only the student, as training/distill.py does
    with torch.device(device):
        naive = NaiveARDStudent(scfg)
    naive.load_state_dict(student.state_dict())
    results["equivalence"] = check_equivalence(student, naive, sizes, device)
    save_partial(results)
    for e in results["equivalence"]:
        print(f"[gpu_check] {e['check']}: {e['rel_max_err']:.2e}", flush=True)

    results["train"] = []
    for batch in sizes.train_batches:
        results["train"].append(bench_train("naive reference (full mask, per-token adaLN)", naive, batch, scfg,
                                            device, sizes, peak))
        print(f"[gpu_check] {results['train'][-1]}", flush=True)
    save_partial(results)
    naive.to("cpu")
    del naive
    reset_memory(device)
    for batch in sizes.train_batches:
        for ckpt in (False, True):
            student.cfg = replace(scfg, grad_checkpointing=ckpt)
            name = "ARDStudent" + (" + activation checkpointing" if ckpt else "")
            results["train"].append(bench_train(name, student, batch, student.cfg, device, sizes, peak))
            print(f"[gpu_check] {results['train'][-1]}", flush=True)
    student.cfg = scfg
    save_partial(results)

    teacher.to(device)
    results["sampling"] = bench_sampling(student, teacher, sizes, device, peak)
    for s in results["sampling"]:
        print(f"[gpu_check] {s}", flush=True)
    save_partial(results)
    if pixart:
        teacher.to("cpu")
        student.to("cpu")
        del teacher, student
        reset_memory(device)
        results["pixart"] = bench_pixart(sizes, device, tiny)
        for e in results["pixart"]["equivalence"]:
            print(f"[gpu_check] {e['check']}: {e['rel_max_err']:.2e}", flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (DiT-T/2 on 8x8 latents): a CPU smoke test")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-pixart", action="store_true", help="leave out the PixArt-XL-2 256 text student")
    ap.add_argument("--markdown", default=None,
                    help="markdown file to update with this card's section ('none' to skip; default "
                         "docs/benchmarks.md at full size, none with --tiny)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if device.type != "cuda" and not args.tiny:
        ap.error("the full-size check needs a GPU; use --tiny on CPU")
    sizes = TINY if args.tiny else FULL
    torch.manual_seed(0)
    results = run(sizes, device, args.tiny, args.out, pixart=not args.skip_pixart)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    md = args.markdown or ("none" if args.tiny else str(ROOT / "docs" / "benchmarks.md"))
    section = to_markdown(results)
    print(section)
    if md != "none":
        write_markdown(Path(md), results["card"], section)
        print(f"[gpu_check] updated {md}")
    checks = results["equivalence"] + (results.get("pixart") or {}).get("equivalence", [])
    bad = [e for e in checks if not math.isfinite(e["rel_max_err"])
           or e["rel_max_err"] > (5e-2 if "bf16" in e["check"] else 1e-4)]
    if bad:
        print(f"[gpu_check] equivalence FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
