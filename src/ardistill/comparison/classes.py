"""The class-conditional comparison (``ardistill demo``): teacher vs step distillation vs ARD on a benchmark.

``compare()`` records the teacher's trajectories (a training and a held-out evaluation recording with
disjoint seeds), distils every variant with the same budget for every training seed, optionally adds
the GAN stage's rows (ARD (R+G) and its regression-only control), evaluates every model from the same
noise and labels on the benchmark's feature network, and writes the report. Every stage resumes:
rerunning the same command skips finished work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ardistill.comparison.benchmarks import BENCHMARKS
from ardistill.comparison.config import CompareConfig
from ardistill.comparison.gan import GAN_CONTROL_ROW, GAN_ROW, gan_note, gan_rows
from ardistill.comparison.report import write_class_report
from ardistill.comparison.stages import (Clock, RecordingSpec, evaluate_variants, latency_ms, record_trajectories,
                                         train_variants)
from ardistill.io.fileio import atomic_write_json


def recording_specs(cfg: CompareConfig) -> list[RecordingSpec]:
    """The training and the evaluation recording (seeds from 0 and from 1e9)."""
    out = Path(cfg.out) / "recordings"
    return [RecordingSpec(name, cfg.num_steps, count, base_seed, out / name, shard_size=1024)
            for name, count, base_seed in (("train", cfg.train_count, 0), ("eval", cfg.eval_count, 1_000_000_000))]


def record_sets(cfg: CompareConfig, teacher) -> tuple[Path, Path]:
    """Train and evaluation recordings of the (loaded) teacher; resumable, skipped when complete."""
    paths = record_trajectories(cfg, teacher, recording_specs(cfg))
    return paths[("train", cfg.num_steps)], paths[("eval", cfg.num_steps)]


def load_eval_set(path: Path, count: int | None = None, verify_shards: bool = True):
    """The evaluation recording (or its first ``count`` records) as EvalTrajectories (S + 1 points)."""
    from ardistill.data.trajectory_dataset import TrajectoryDataset
    from ardistill.evaluation.evaluate import EvalTrajectories

    ds = TrajectoryDataset(path, verify_shards=verify_shards)
    n = len(ds) if count is None else min(int(count), len(ds))
    rec = ds.records(np.arange(n))
    states = torch.from_numpy(np.ascontiguousarray(rec["states"])).float()
    if "x0_preds" in rec.dtype.names:
        x0 = torch.from_numpy(np.ascontiguousarray(rec["x0_preds"])).float()
        x0 = torch.cat([x0, states[:, -1:]], dim=1)  # the end point's "x0-prediction" is the sample
    else:
        x0 = states.clone()
    return EvalTrajectories(states=states, x0_preds=x0, labels=torch.from_numpy(rec["label"].astype(np.int64)),
                            seeds=torch.from_numpy(rec["seed"].astype(np.int64))), ds.manifest


def check_teacher_fits(tcfg, bench, teacher_path: Path) -> None:
    """The benchmark's metrics need the teacher's samples to have the shape of its real images."""
    real = tuple(bench.real_images("heldout").shape[1:])
    got = (tcfg.in_channels, tcfg.input_size, tcfg.input_size)
    if got != real:
        raise ValueError(f"teacher {teacher_path} makes {got} samples but the {bench.name} benchmark's feature "
                         f"network and held-out images are {real}; pick the matching --benchmark "
                         f"({', '.join(BENCHMARKS)}) or evaluate with your own feature network")


# ------------------------------------------------------------------------------------ the comparison

def compare(cfg: CompareConfig, variants: dict[str, dict], title: str = "Teacher vs step distillation vs ARD",
            gan: bool = False, gan_variant: str | None = None, teacher=None) -> Path:
    """Record, distil every variant for every seed, evaluate all from the same noise, write the report.

    Args:
        cfg: recording, training budget and evaluation settings.
        variants: report name -> DistillConfig overrides (e.g. {"history_layers": 0}). The first two
            are the pair whose FD-degradation ratio is reported (step distillation first).
        gan: also fine-tune an ARD variant with the GAN stage and report it as "ARD (R+G)", next
            to "ARD (R, control)": the same fine-tuning with GAN weight 0.
        gan_variant: the variant that is fine-tuned (default: the last one).
        teacher: the teacher of ``cfg.teacher_path``, already loaded (the demo and the sweep load it once);
            None loads it here.
    Returns the path of report.md.
    """
    from ardistill.evaluation.evaluate import (ImageMetrics, ModelResult, history_dependence, image_features,
                                               image_metrics, run_sampler, trajectory_errors)
    from ardistill.evaluation.flops import sampling_flops
    from ardistill.io.checkpoints import load_any_teacher
    from ardistill.sampling.diffusion import process_for
    from ardistill.sampling.guidance import make_model_fn
    from ardistill.sampling.ode import solve

    if gan_variant is not None and gan_variant not in variants:
        raise ValueError(f"compare: gan_variant {gan_variant!r} is not one of the variants {list(variants)}")
    clock = Clock()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"compare": cfg.to_dict(), "variants": variants})
    bench, teacher_path = cfg.bench, cfg.teacher_path
    device = torch.device(cfg.device or "cpu")
    teacher = load_any_teacher(teacher_path) if teacher is None else teacher
    check_teacher_fits(teacher.cfg, bench, teacher_path)

    recordings = record_trajectories(cfg, teacher, recording_specs(cfg))
    train_rec, eval_rec = recordings[("train", cfg.num_steps)], recordings[("eval", cfg.num_steps)]
    clock.lap("record")
    runs = train_variants(cfg, variants, recordings, teacher_path, teacher)
    extra_rows = [GAN_CONTROL_ROW, GAN_ROW] if gan else []
    if gan:
        ard_name = list(variants)[-1] if gan_variant is None else gan_variant
        runs.update(gan_rows(cfg, runs, ard_name, train_rec, teacher_path))
    clock.lap("train")

    # ---- evaluation: same noise and labels for every model
    ev, manifest = load_eval_set(eval_rec, verify_shards=cfg.student.get("verify_shards", True))
    teacher = teacher.to(device).eval()
    net = bench.feature_network(device=device)
    real = net.features(bench.real_images("heldout").to(device)).float().cpu()
    process = process_for(teacher.cfg)
    model_fn = make_model_fn(teacher, cfg.cfg_scale)
    lat_inputs = (ev.noise[:cfg.latency_batch].to(device), ev.labels[:cfg.latency_batch].to(device))

    def teacher_sampler(noise, y):
        return solve(model_fn, process, noise, y, cfg.teacher_steps, cfg.solver).sample

    flops = lambda nh: sampling_flops(teacher.cfg, cfg.teacher_steps, cfg.num_steps, nh, cfg_scale=cfg.cfg_scale)
    t_metrics = image_metrics(ev.teacher_samples, real, net)
    t_feats = image_features(ev.teacher_samples, net)
    teacher_row = ModelResult(name=f"teacher ({cfg.solver.upper()}, cfg {cfg.cfg_scale})", steps=cfg.teacher_steps,
                              metrics=t_metrics, flops=flops(0).teacher,
                              latency_ms=latency_ms(teacher_sampler, *lat_inputs, cfg.latency_repeats))
    real_row = ModelResult(name=f"held-out real {bench.name} (vs train split)", steps=0,
                           metrics=image_metrics(bench.real_images("train"), real, net))
    rows, results, grids = [], [real_row, teacher_row], {"teacher": ev.teacher_samples[:cfg.grid_columns]}

    def measure(name, seed, student):
        samples = run_sampler(student.sample, ev.noise, ev.labels, desc=f"sample {name} seed {seed}"
                              if cfg.progress else None, device=device)
        m = image_metrics(samples, real, net, teacher_features=t_feats)
        errs = trajectory_errors(student, ev, device=device)
        rows.append({"variant": name, "seed": seed, **m.__dict__, "trajectory_errors": errs})
        if student.cfg.uses_history:  # the history-cut ablation: how much does the student use it?
            hd = history_dependence(student, ev, samples=samples, device=device)
            cut = image_metrics(hd.pop("samples_history_cut"), real, net, teacher_features=t_feats)
            rows[-1]["history_cut"] = {**hd, "fd": cut.fd, "fd_teacher": cut.fd_teacher}
        return (m, errs), samples

    names = list(variants) + extra_rows
    for name, per_seed, lat in evaluate_variants(cfg, names, runs, measure, lat_inputs, device):
        student, (m, errs) = per_seed[0].student, per_seed[0].result
        nh = student.cfg.history_layers if student.cfg.uses_history else 0
        mean = {k: float(np.mean([getattr(p.result[0], k) for p in per_seed])) for k in m.__dict__}
        mean_errs = {k: np.mean([p.result[1][k] for p in per_seed], axis=0).tolist() for k in errs}
        label = name if len(cfg.seeds) == 1 else f"{name} (mean of {len(cfg.seeds)} seeds)"
        results.append(ModelResult(name=label, steps=student.cfg.num_steps, metrics=ImageMetrics(**mean),
                                   latency_ms=lat, flops=flops(nh).ard, errors=mean_errs))
        grids[name] = per_seed[0].samples[:cfg.grid_columns]

    recording = {"train": str(train_rec), "eval": str(eval_rec), "grid": manifest["grid"]}
    return write_class_report(out / "report", cfg, title, names, rows, results, grids, t_metrics.fd, recording,
                              clock, extra_notes=[gan_note(cfg)] if gan else [])
