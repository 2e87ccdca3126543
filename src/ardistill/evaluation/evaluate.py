"""Evaluation: the same noise and condition for every model -> images -> features -> metrics, no PNGs on disk.

The evaluation set is a held-out teacher recording (seeds disjoint from training): its initial noise
is what every student starts from, its condition is what every model is sampled under, its final states
are the teacher's samples, and its recorded states are the references for the per-step trajectory error:

- free-running error (exposure bias): the student samples from the noise on its own; step s is
  compared with the teacher's state (or x0-prediction, by the student's target) at step s;
- teacher-forced error: the student is fed the teacher's states as history, as in training.

Their gap is the exposure bias the paper measures; ARD should shrink it.

The condition is a payload, one row per trajectory: ``(labels,)`` for class-conditional students,
``(caption tokens, mask)`` for text-to-image ones. Students are called ``student.sample(noise, *cond)``
and ``student(inputs, *cond)``, so both kinds share every function here. A text set of the two-digit
benchmark (``TextEvalSet``) also knows its captions' digits: ``evaluate_samples`` reads them (prompt
adherence, evaluation/adherence.py) beside the FD of the pair features. The report is evaluation/report.py.
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

from ardistill.data.digit_pairs import split_halves
from ardistill.evaluation.adherence import prompt_adherence
from ardistill.evaluation.features import FunctionFeatures, features_and_logits, has_logits
from ardistill.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall

Sampler = Callable[..., torch.Tensor]  # (noise, *cond) -> final states


@dataclass
class EvalTrajectories:
    """Teacher trajectories on the student grid (M, S+1, C, H, W) and the condition they were sampled under.

    ``cond``: the condition payload, row i for trajectory i; ``(labels,)`` by default (class-conditional
    sets give ``labels``), ``(text, text_mask)`` for text-to-image sets. ``x0_preds``: the teacher's
    x0-predictions at the same points (M, S+1, C, H, W), for students whose target is 'x0'; a set
    without them compares ODE states only.
    """

    states: torch.Tensor
    x0_preds: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    cond: tuple[torch.Tensor, ...] = ()

    def __post_init__(self):
        if not self.cond:
            if self.labels is None:
                raise ValueError("an evaluation set needs its condition: labels, or the payload cond")
            self.cond = (self.labels,)

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
            if self.x0_preds is None:
                raise ValueError("this evaluation set compares ODE states (no x0-predictions): "
                                 "the student's target must be 'state'")
            return torch.cat([self.states[:, :1], self.x0_preds[:, 1:S]], dim=1), self.x0_preds[:, 1:]
        raise ValueError(f"unknown target {target!r}")


@dataclass(kw_only=True)
class TextEvalSet(EvalTrajectories):
    """A text set of the two-digit benchmark: ``cond`` is (caption tokens (M, T, C), mask (M, T)), and the
    captions' digits are known."""

    name: str
    left: torch.Tensor  # (M,) caption's left digit
    right: torch.Tensor
    captions: list[str]

    @property
    def text(self) -> torch.Tensor:
        return self.cond[0]

    @property
    def text_mask(self) -> torch.Tensor:
        return self.cond[1]


def load_text_eval_set(recording, name: str, left, right) -> TextEvalSet:
    """A TextEvalSet from a text recording whose trajectory i used prompt row i + 1 (one trajectory per caption)."""
    from ardistill.data.prompts import TextTrajectoryDataset
    ds = TextTrajectoryDataset(recording)
    rec = ds.records(np.arange(len(ds)))
    rows = rec["prompt"].astype(np.int64)
    text, mask = ds.store.get(rows)
    return TextEvalSet(name=name, states=torch.from_numpy(np.ascontiguousarray(rec["states"])).float(),
                       cond=(text, mask), left=torch.as_tensor(left).long()[rows - 1],
                       right=torch.as_tensor(right).long()[rows - 1],
                       captions=[ds.store.prompts[r] for r in rows])


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def _payload(cond) -> tuple[torch.Tensor, ...]:
    """A condition given as one tensor (labels) or as the payload tuple -> the tuple."""
    return (cond,) if torch.is_tensor(cond) else tuple(cond)


@torch.no_grad()
def run_sampler(sampler: Sampler, noise: torch.Tensor, cond, batch_size: int = 256,
                desc: str | None = None, device=None) -> torch.Tensor:
    """Run a sampler over all noise in batches (progress bar); returns final states on CPU.

    ``cond``: the condition, sliced with the noise: labels, or a payload tuple such as (text, text_mask).
    """
    cond = _payload(cond)
    out = []
    for sl in tqdm(list(_batches(len(noise), batch_size)), desc=desc, leave=False, disable=desc is None):
        out.append(sampler(noise[sl].to(device), *(c[sl].to(device) for c in cond)).float().cpu())
    return torch.cat(out)


def sample_student(student, ev: EvalTrajectories, batch_size: int = 256, device=None,
                   desc: str | None = None) -> torch.Tensor:
    """The student's final samples from the set's noise under its condition (CPU)."""
    student.eval()
    return run_sampler(student.sample, ev.noise, ev.cond, batch_size, desc=desc, device=device)


def _teacher_trajectory(student, ev: EvalTrajectories) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The set's teacher-forced inputs and targets for ``student``'s parameterisation, and S (checked)."""
    if ev.num_steps != student.cfg.num_steps:
        raise ValueError(f"evaluation recording has {ev.num_steps} steps, the student {student.cfg.num_steps}")
    return (*ev.inputs_targets(student.cfg.target), ev.num_steps)


def _rollouts(student, ev: EvalTrajectories, targets: torch.Tensor, batch_size: int, device):
    """Per batch of the set (student in eval mode): its slice, its condition and targets on ``device``, and
    the student's free-running outputs of every step (B, S, C, H, W)."""
    student.eval()
    for sl in _batches(len(targets), batch_size):
        cond = [c[sl].to(device) for c in ev.cond]
        outs = student.sample(ev.noise[sl].to(device), *cond, return_all=True).float()
        yield sl, cond, targets[sl].to(device).float(), outs


@torch.no_grad()
def trajectory_errors(student, ev: EvalTrajectories, batch_size: int = 256, device=None) -> dict:
    """Per-step MSE of the free-running and teacher-forced student against the teacher's trajectory."""
    inputs, targets, S = _teacher_trajectory(student, ev)
    free = torch.zeros(S, dtype=torch.float64)
    forced = torch.zeros(S, dtype=torch.float64)
    for sl, cond, tgt, outs in _rollouts(student, ev, targets, batch_size, device):
        tf = student(inputs[sl].to(device), *cond).float()
        free += (outs - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
        forced += (tf - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
    n = len(inputs)
    return {"free_running": (free / n).tolist(), "teacher_forced": (forced / n).tolist()}


@torch.no_grad()
def history_dependence(student, ev: EvalTrajectories, samples: torch.Tensor | None = None,
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
        noise, cond = ev.noise[sl].to(device), [c[sl].to(device) for c in ev.cond]
        t = ev.teacher_samples[sl].to(device).float()
        a = (student.sample(noise, *cond) if samples is None else samples[sl].to(device)).float()
        b = student.sample(noise, *cond, history=False).float()
        full_err += float((a - t).square().sum())
        cut_err += float((b - t).square().sum())
        gap += float((a - b).square().sum())
        cut.append(b.cpu())
    n = ev.teacher_samples.numel()
    return {"mse_to_teacher": full_err / n, "mse_to_teacher_history_cut": cut_err / n,
            "mse_with_vs_cut": gap / n, "samples_history_cut": torch.cat(cut)}


HISTORY_SWAPS = ("teacher", "other")


@torch.no_grad()
def history_swap_errors(student, ev: EvalTrajectories, history: str = "teacher", batch_size: int = 256,
                        device=None) -> list[float]:
    """Per-step MSE to the teacher's trajectory when each step's *current* input is the student's own
    (free-running) state but its *history* is swapped for the teacher's states:

    - ``history="teacher"``: of the same trajectory, what the history could correct if it were perfect;
    - ``history="other"``: of another trajectory (the next one of the set, another image and label), so
      whether the history's content matters at all.

    Step k is one teacher-forced pass over the history's inputs with block k replaced by the student's
    own input there (blocks after k do not reach it: the mask is causal); the condition stays the
    trajectory's own. Step 0's input is the noise, so it is the teacher-forced error; with the teacher's
    history step 1 is the free-running error (its history is the same noise); for a student without
    history every step is the free-running error. Compare with ``trajectory_errors``."""
    if history not in HISTORY_SWAPS:
        raise ValueError(f"history must be one of {HISTORY_SWAPS}, got {history!r}")
    inputs, targets, S = _teacher_trajectory(student, ev)
    hist = inputs if history == "teacher" else inputs.roll(1, dims=0)
    err = torch.zeros(S, dtype=torch.float64)
    for sl, cond, tgt, outs in _rollouts(student, ev, targets, batch_size, device):
        own = torch.cat([inputs[sl, :1].to(device).float(), outs[:, :-1]], dim=1)  # each block's own input
        for k in range(S):
            mixed = hist[sl].to(device).float().clone()
            mixed[:, k] = own[:, k]
            out = student(mixed, *cond)[:, k].float()
            err[k] += float((out - tgt[:, k]).square().flatten(1).mean(-1).sum())
    return (err / len(inputs)).tolist()


@torch.no_grad()
def median_latency(sampler: Sampler, noise: torch.Tensor, cond, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time per image (seconds) of one batched call ``sampler(noise, *cond)``, after warm-up."""
    cond = _payload(cond)

    def sync():
        if noise.is_cuda:
            torch.cuda.synchronize()
    for _ in range(warmup):
        sampler(noise, *cond)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        sampler(noise, *cond)
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
    feats, logits = _features_logits(images, feature_net, batch_size, need_logits=has_logits(feature_net))
    return feature_metrics(feats, real_features, k, teacher_features, logits)


def feature_metrics(features: torch.Tensor, real_features: torch.Tensor, k: int = 3,
                    teacher_features: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> ImageMetrics:
    """FD and k-NN precision/recall of features (N, F) against real features, IS from ``logits`` when
    given (NaN otherwise), and FD to ``teacher_features`` when given."""
    mu, sigma = FeatureStats().update(features).mu_sigma()
    mu_r, sigma_r = FeatureStats().update(real_features).mu_sigma()
    is_mean = is_std = float("nan")
    if logits is not None:
        is_mean, is_std = inception_score(logits, splits=min(10, max(1, len(features) // 100)))
    pr = precision_recall(real_features, features, k=k)
    fd_teacher = float("nan")
    if teacher_features is not None:
        fd_teacher = frechet_distance(mu, sigma, *FeatureStats().update(teacher_features).mu_sigma())
    return ImageMetrics(fd=frechet_distance(mu, sigma, mu_r, sigma_r), inception_score=is_mean,
                        inception_score_std=is_std, precision=float(pr.precision), recall=float(pr.recall),
                        fd_teacher=fd_teacher)


@torch.no_grad()
def pair_features(images: torch.Tensor, classifier, batch_size: int = 1024) -> torch.Tensor:
    """Images (N, 1, 8, 16) -> the digits classifier's features of the left and right halves side by side (N, 2F)."""
    left, right = split_halves(images.float().clamp(-1, 1))
    device = next(classifier.parameters()).device
    classifier.eval()
    net = FunctionFeatures("digit pairs", lambda x: classifier.features(x.to(device)))
    return torch.cat([image_features(left, net, batch_size), image_features(right, net, batch_size)], dim=1)


def pair_metrics(features: torch.Tensor, real_features: torch.Tensor, teacher_features: torch.Tensor | None = None,
                 k: int = 3) -> dict:
    """FD, k-NN precision / recall against real pair features, and FD to the teacher's samples (NaN without)."""
    m = feature_metrics(features, real_features, k, teacher_features)
    return {"fd": m.fd, "precision": m.precision, "recall": m.recall, "fd_teacher": m.fd_teacher}


def evaluate_samples(samples: torch.Tensor, ev: TextEvalSet, classifier, real_features: torch.Tensor,
                     teacher_features: torch.Tensor | None) -> dict:
    """Adherence (with per-half accuracies and swaps) and the pair metrics of one model's samples on one set."""
    adh = prompt_adherence(samples, ev.left, ev.right, classifier)
    return {**adh.to_dict(), **pair_metrics(pair_features(samples, classifier), real_features, teacher_features)}


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
