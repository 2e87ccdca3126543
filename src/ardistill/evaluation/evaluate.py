"""Evaluation: same noise and labels for every model -> images -> features -> metrics, no PNGs on disk.

The evaluation set is a held-out teacher recording (seeds disjoint from training): its initial noise
is what every student starts from, its final states are the teacher's samples, and its recorded
states are the references for the per-step trajectory error:

- free-running error (exposure bias): the student samples from the noise on its own; step s is
  compared with the teacher's state (or x0-prediction, by the student's target) at step s;
- teacher-forced error: the student is fed the teacher's states as history, as in training.

Their gap is the exposure bias the paper measures; ARD should shrink it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ardistill.io.fileio import atomic_write_bytes, atomic_write_json
from ardistill.models.student import ARDStudent

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, labels) -> final states


@dataclass
class EvalTrajectories:
    """Teacher trajectories on the student grid: states and x0-predictions (M, S+1, C, H, W)."""

    states: torch.Tensor
    x0_preds: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor | None = None

    @property
    def noise(self) -> torch.Tensor:
        return self.states[:, 0]

    @property
    def teacher_samples(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1

    def inputs_targets(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced inputs (blocks 0..S-1) and targets (states 1..S) for a parameterisation."""
        S = self.num_steps
        if target == "state":
            return self.states[:, :S], self.states[:, 1:]
        if target == "x0":  # public code: x0-predictions between, final sample last (x0_preds[:, S] is it)
            return torch.cat([self.states[:, :1], self.x0_preds[:, 1:S]], dim=1), self.x0_preds[:, 1:]
        raise ValueError(f"unknown target {target!r}")


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


@torch.no_grad()
def run_sampler(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                desc: str | None = None, device=None) -> torch.Tensor:
    """Run a sampler over all noise in batches (progress bar); returns final states on CPU."""
    out = []
    for sl in tqdm(list(_batches(len(noise), batch_size)), desc=desc, leave=False, disable=desc is None):
        out.append(sampler(noise[sl].to(device), labels[sl].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def trajectory_errors(student: ARDStudent, ev: EvalTrajectories, batch_size: int = 256, device=None) -> dict:
    """Per-step MSE of the free-running and teacher-forced student against the teacher's trajectory."""
    if ev.num_steps != student.cfg.num_steps:
        raise ValueError(f"evaluation recording has {ev.num_steps} steps, the student {student.cfg.num_steps}")
    inputs, targets = ev.inputs_targets(student.cfg.target)
    S = ev.num_steps
    free = torch.zeros(S, dtype=torch.float64)
    forced = torch.zeros(S, dtype=torch.float64)
    student.eval()
    for sl in _batches(len(inputs), batch_size):
        y = ev.labels[sl].to(device)
        tgt = targets[sl].to(device).float()
        outs = student.sample(ev.noise[sl].to(device), y, return_all=True).float()
        tf = student(inputs[sl].to(device), y).float()
        free += (outs - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
        forced += (tf - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
    n = len(inputs)
    return {"free_running": (free / n).tolist(), "teacher_forced": (forced / n).tolist()}


@torch.no_grad()
def history_dependence(student: ARDStudent, ev: EvalTrajectories, samples: torch.Tensor | None = None,
                       batch_size: int = 256, device=None) -> dict:
    """How much a history student relies on its history: its free-running samples with the history and
    with the history cut at sampling time (``sample(history=False)``), each against the teacher's
    sample from the same noise, and against each other (mean squared error per pixel).

    ``samples``: the student's samples from ``ev.noise`` with its history, when the caller already has
    them (they are not drawn again). Also returns the history-cut samples, for their FD.
    """
    full_err = cut_err = gap = 0.0
    cut = []
    student.eval()
    for sl in _batches(len(ev.noise), batch_size):
        noise, y = ev.noise[sl].to(device), ev.labels[sl].to(device)
        t = ev.teacher_samples[sl].to(device).float()
        a = (student.sample(noise, y) if samples is None else samples[sl].to(device)).float()
        b = student.sample(noise, y, history=False).float()
        full_err += float((a - t).square().sum())
        cut_err += float((b - t).square().sum())
        gap += float((a - b).square().sum())
        cut.append(b.cpu())
    n = ev.teacher_samples.numel()
    return {"mse_to_teacher": full_err / n, "mse_to_teacher_history_cut": cut_err / n,
            "mse_with_vs_cut": gap / n, "samples_history_cut": torch.cat(cut)}


@torch.no_grad()
def median_latency(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, repeats: int = 5,
                   warmup: int = 1) -> float:
    """Median wall time per image (seconds) of one batched call, after warm-up."""
    def sync():
        if noise.is_cuda:
            torch.cuda.synchronize()
    for _ in range(warmup):
        sampler(noise, labels)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        sampler(noise, labels)
        sync()
        times.append((time.perf_counter() - t0) / len(noise))
    return statistics.median(times)


@dataclass
class ImageMetrics:
    """Sample-quality metrics against a real reference set, in some feature space."""

    fd: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    # FD against the teacher's own samples from the same noise and labels: the student's degradation
    # measured directly (the teacher's is 0 by definition); NaN when not computed
    fd_teacher: float = float("nan")


@torch.no_grad()
def _features_logits(images: torch.Tensor, feature_net, batch_size: int,
                     need_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features and (optionally) logits in batches, on the CPU. Images are clamped to [-1, 1] first, as
    writing them to uint8 would (ADM's evaluator sees PNGs)."""
    from ardistill.evaluation.features import features_and_logits
    images = images.clamp(-1, 1)
    feats, logits = [], []
    for sl in _batches(len(images), batch_size):
        f, lg = features_and_logits(feature_net, images[sl], need_logits=need_logits)
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def image_features(images: torch.Tensor, feature_net, batch_size: int = 512) -> torch.Tensor:
    """Features of images (N, C, H, W) in [-1, 1], as ``image_metrics`` computes them."""
    return _features_logits(images, feature_net, batch_size, need_logits=False)[0]


@torch.no_grad()
def image_metrics(images: torch.Tensor, real_features: torch.Tensor, feature_net, batch_size: int = 512,
                  k: int = 3, teacher_features: torch.Tensor | None = None) -> ImageMetrics:
    """FD, IS and k-NN precision/recall of images (N, C, H, W) in [-1, 1] against real features.

    Images are clamped to [-1, 1] first, as writing them to uint8 would (ADM's evaluator sees PNGs).
    ``teacher_features`` (features of the teacher's samples, ``image_features``) adds ``fd_teacher``.
    """
    from ardistill.evaluation.features import has_logits
    from ardistill.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall

    feats_t, logits = _features_logits(images, feature_net, batch_size, need_logits=has_logits(feature_net))
    mu, sigma = FeatureStats().update(feats_t).mu_sigma()
    mu_r, sigma_r = FeatureStats().update(real_features).mu_sigma()
    is_mean = is_std = float("nan")
    if logits is not None:
        is_mean, is_std = inception_score(logits, splits=min(10, max(1, len(images) // 100)))
    pr = precision_recall(real_features, feats_t, k=k)
    fd_teacher = float("nan")
    if teacher_features is not None:
        fd_teacher = frechet_distance(mu, sigma, *FeatureStats().update(teacher_features).mu_sigma())
    return ImageMetrics(fd=frechet_distance(mu, sigma, mu_r, sigma_r), inception_score=is_mean,
                        inception_score_std=is_std, precision=float(pr.precision), recall=float(pr.recall),
                        fd_teacher=fd_teacher)


@dataclass
class ModelResult:
    """One row of the report."""

    name: str
    steps: int
    metrics: ImageMetrics | None = None
    latency_ms: float | None = None
    flops: int | None = None
    errors: dict | None = None  # trajectory_errors()
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"name": self.name, "steps": self.steps, "latency_ms_per_image": self.latency_ms, "flops": self.flops,
             "trajectory_errors": self.errors, **self.extra}
        if self.metrics is not None:
            d.update(self.metrics.__dict__)
        return d


def fd_degradation_ratio(teacher_fd: float, step_distill_fd: float, ard_fd: float) -> float:
    """(FD_SD - FD_teacher) / (FD_ARD - FD_teacher): the paper's "5x less FID degradation"."""
    denom = ard_fd - teacher_fd
    return float("inf") if denom <= 0 else (step_distill_fd - teacher_fd) / denom


# ------------------------------------------------------------------------------------------- report

def plot_trajectory_errors(results: list[ModelResult], path: Path) -> None:
    """Per-step MSE, free-running (solid) vs teacher-forced (dashed), log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for i, r in enumerate(x for x in results if x.errors):
        steps = np.arange(1, len(r.errors["free_running"]) + 1)
        color = f"C{i}"
        ax.plot(steps, r.errors["free_running"], "-o", color=color, label=f"{r.name} free-running")
        ax.plot(steps, r.errors["teacher_forced"], "--", color=color, alpha=0.7, label=f"{r.name} teacher-forced")
    ax.set_yscale("log")
    ax.set_xlabel("student step s")
    ax.set_ylabel("MSE to teacher trajectory")
    ax.set_title("Exposure bias: per-step trajectory error")
    ax.legend(fontsize=7)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png")
    from ardistill.io.fileio import atomic_write
    atomic_write(path, write)
    plt.close(fig)


def side_by_side_grid(rows: dict[str, torch.Tensor], path: Path, scale: int = 6) -> None:
    """One row per model, same noise in each column (the paper's Figure 5 layout)."""
    from ardistill.io.images import save_image_grid
    names = list(rows)
    n = min(len(v) for v in rows.values())
    imgs = torch.cat([rows[k][:n] for k in names])
    save_image_grid(imgs, path, nrow=n, scale=scale)


def _fmt(v, nd=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 1e-2 or v == 0 else f"{v:.2e}"
    return str(v)


def report_markdown(results: list[ModelResult], title: str, notes: list[str] | None = None,
                    feature_name: str = "digits classifier", sections: list[str] | None = None) -> str:
    """The report's tables as markdown."""
    lines = [f"# {title}", ""]
    to_teacher = any(r.metrics is not None and not math.isnan(r.metrics.fd_teacher) for r in results)
    lines += [f"| model | steps | FD ({feature_name}) |" + (" FD to teacher |" if to_teacher else "")
              + " IS | precision | recall | latency ms/img | GFLOPs/img |",
              "|---|---|---|" + ("---|" if to_teacher else "") + "---|---|---|---|---|"]
    for r in results:
        m = r.metrics
        lines.append(f"| {r.name} | {r.steps} | {_fmt(m.fd if m else None)} | "
                     + (f"{_fmt(m.fd_teacher if m else None)} | " if to_teacher else "") +
                     f"{_fmt(m.inception_score if m else None)} | {_fmt(m.precision if m else None, 3)} | "
                     f"{_fmt(m.recall if m else None, 3)} | {_fmt(r.latency_ms, 3)} | "
                     f"{_fmt(r.flops / 1e9 if r.flops else None, 4)} |")
    with_err = [r for r in results if r.errors]
    if with_err:
        S = max(len(r.errors["free_running"]) for r in with_err)
        lines += ["", "Per-step MSE to the teacher's trajectory (free-running / teacher-forced):", "",
                  "| model | " + " | ".join(f"step {s}" for s in range(1, S + 1)) + " |",
                  "|---|" + "---|" * S]
        for r in with_err:
            cells = [f"{a:.4f} / {b:.4f}" for a, b in zip(r.errors["free_running"], r.errors["teacher_forced"])]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    for sec in sections or []:
        lines += ["", sec.rstrip("\n")]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, results: list[ModelResult], title: str, summary: dict | None = None,
                 notes: list[str] | None = None, grids: dict[str, torch.Tensor] | None = None,
                 feature_name: str = "digits classifier", sections: list[str] | None = None) -> Path:
    """report.md, metrics.json, trajectory_errors.png and grid.png in ``out_dir``.

    ``sections``: extra markdown blocks, placed after the tables and before the notes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(r.errors for r in results):
        plot_trajectory_errors(results, out / "trajectory_errors.png")
    if grids:
        side_by_side_grid(grids, out / "grid.png")
    md = report_markdown(results, title, notes, feature_name, sections)
    if grids:
        md += "\n![same noise, one row per model: " + ", ".join(grids) + "](grid.png)\n"
    if any(r.errors for r in results):
        md += "\n![per-step trajectory error](trajectory_errors.png)\n"
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_json(out / "metrics.json", {"models": [r.as_dict() for r in results], "summary": summary or {}})
    return out / "report.md"


# ----------------------------------------------------------------------------- ADM sample batches

@torch.no_grad()
def evaluate_npz(samples: str | Path, reference: str | Path, feature_net, batch_size: int = 250,
                 reference_stats: str = "recompute", k: int = 3, device=None) -> dict:
    """FD, IS and precision/recall of an ADM sample .npz against an ADM reference batch.

    Args:
        samples, reference: ADM .npz files (uint8 NHWC ``arr_0``).
        feature_net: e.g. ``get_feature_network("inception", weights_path=...)``.
        reference_stats: "recompute" (features of the reference images through ``feature_net``, so both
            sides see the same network) or "file" (the batch's stored ``mu``/``sigma``, which the ADM
            evaluator computed with TensorFlow's Inception: only comparable when ``feature_net`` is it).
    """
    from ardistill.evaluation.adm import read_adm_npz
    from ardistill.evaluation.features import features_and_logits, has_logits
    from ardistill.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall

    if reference_stats not in ("recompute", "file"):
        raise ValueError(f"reference_stats must be 'recompute' or 'file', got {reference_stats!r}")

    def feats(path, need_logits):
        batch = read_adm_npz(path, require_images=True)
        fs, ls = [], []
        for x in tqdm(batch.iter_tensors(batch_size, device), desc=f"features {Path(path).name}", leave=False,
                      total=math.ceil(batch.num_images / batch_size)):
            f, lg = features_and_logits(feature_net, x, need_logits=need_logits)
            fs.append(f.float().cpu())
            if lg is not None:
                ls.append(lg.float().cpu())
        return torch.cat(fs), (torch.cat(ls) if ls else None)

    need_logits = has_logits(feature_net)
    f_fake, logits = feats(samples, need_logits)
    f_real, _ = feats(reference, False)
    mu, sigma = FeatureStats().update(f_fake).mu_sigma()
    if reference_stats == "file":
        ref = read_adm_npz(reference)
        if ref.mu is None:
            raise ValueError(f"{reference}: no 'mu'/'sigma' statistics stored; use reference_stats='recompute'")
        mu_r, sigma_r = ref.mu, ref.sigma
    else:
        mu_r, sigma_r = FeatureStats().update(f_real).mu_sigma()
    out = {"fd": frechet_distance(mu, sigma, mu_r, sigma_r), "num_samples": len(f_fake), "num_reference": len(f_real),
           "feature_network": getattr(feature_net, "name", type(feature_net).__name__),
           "reference_stats": reference_stats}
    if logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(logits)
    pr = precision_recall(f_real, f_fake, k=k)
    out["precision"], out["recall"] = float(pr.precision), float(pr.recall)
    return out
