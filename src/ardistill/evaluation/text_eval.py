"""Evaluation of text-to-image students on the two-digit benchmark: same captions and noise for every model.

An evaluation set is a text recording (``record_text``) of captions whose digits are known: its
initial noise is what every student starts from, its final states are the teacher's samples, and its
states on the student grid are the references of the per-step trajectory error (free-running: the
student samples on its own; teacher-forced: it reads the teacher's states as history).

Image metrics read each 8x8 half with the shipped digits classifier: prompt adherence (both digits
right, in order; evaluation/adherence.py), and FD / precision / recall of the pair features (the two
halves' feature vectors side by side, so the pair's composition counts) against real held-out pairs,
and FD to the teacher's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ardistill.data.digit_pairs import split_halves


@dataclass
class TextEvalSet:
    """Teacher trajectories (M, S+1, C, H, W) of captioned prompts and the captions' digits."""

    name: str
    states: torch.Tensor
    text: torch.Tensor  # (M, T, C)
    text_mask: torch.Tensor  # (M, T)
    left: torch.Tensor  # (M,) caption's left digit
    right: torch.Tensor
    captions: list[str]

    @property
    def noise(self) -> torch.Tensor:
        return self.states[:, 0]

    @property
    def teacher_samples(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1


def load_text_eval_set(recording, name: str, left, right) -> TextEvalSet:
    """A TextEvalSet from a text recording whose trajectory i used prompt row i + 1 (one trajectory per caption)."""
    from ardistill.data.prompts import TextTrajectoryDataset
    ds = TextTrajectoryDataset(recording)
    rec = ds.records(np.arange(len(ds)))
    rows = rec["prompt"].astype(np.int64)
    text, mask = ds.store.get(rows)
    return TextEvalSet(name=name, states=torch.from_numpy(np.ascontiguousarray(rec["states"])).float(),
                       text=text, text_mask=mask, left=torch.as_tensor(left).long()[rows - 1],
                       right=torch.as_tensor(right).long()[rows - 1],
                       captions=[ds.store.prompts[r] for r in rows])


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


@torch.no_grad()
def sample_text_student(student, ev: TextEvalSet, batch_size: int = 256, device=None) -> torch.Tensor:
    """The student's final samples from the set's noise and captions (CPU)."""
    student.eval()
    return torch.cat([student.sample(ev.noise[sl].to(device), ev.text[sl].to(device), ev.text_mask[sl].to(device))
                      .float().cpu() for sl in _batches(len(ev.noise), batch_size)])


@torch.no_grad()
def text_trajectory_errors(student, ev: TextEvalSet, batch_size: int = 256, device=None) -> dict:
    """Per-step MSE to the teacher's states: free-running (own history) and teacher-forced (teacher's history)."""
    if ev.num_steps != student.cfg.num_steps:
        raise ValueError(f"evaluation recording has {ev.num_steps} steps, the student {student.cfg.num_steps}")
    if student.cfg.target != "state":
        raise ValueError("text_trajectory_errors compares ODE states: the student's target must be 'state'")
    S = ev.num_steps
    free = torch.zeros(S, dtype=torch.float64)
    forced = torch.zeros(S, dtype=torch.float64)
    student.eval()
    for sl in _batches(len(ev.noise), batch_size):
        text, mask = ev.text[sl].to(device), ev.text_mask[sl].to(device)
        tgt = ev.states[sl, 1:].to(device)
        outs = student.sample(ev.noise[sl].to(device), text, mask, return_all=True).float()
        tf = student(ev.states[sl, :S].to(device), text, mask).float()
        free += (outs - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
        forced += (tf - tgt).square().flatten(2).mean(-1).sum(0).double().cpu()
    n = len(ev.noise)
    return {"free_running": (free / n).tolist(), "teacher_forced": (forced / n).tolist()}


@torch.no_grad()
def pair_features(images: torch.Tensor, classifier, batch_size: int = 1024) -> torch.Tensor:
    """Images (N, 1, 8, 16) -> the digits classifier's features of the left and right halves side by side (N, 2F)."""
    left, right = split_halves(images.float().clamp(-1, 1))
    device = next(classifier.parameters()).device
    classifier.eval()

    def feats(x):
        return torch.cat([classifier.features(x[sl].to(device)).float().cpu() for sl in _batches(len(x), batch_size)])

    return torch.cat([feats(left), feats(right)], dim=1)


def pair_metrics(features: torch.Tensor, real_features: torch.Tensor, teacher_features: torch.Tensor | None = None,
                 k: int = 3) -> dict:
    """FD, k-NN precision / recall against real pair features, and FD to the teacher's samples."""
    from ardistill.evaluation.metrics import FeatureStats, frechet_distance, precision_recall
    mu, sigma = FeatureStats().update(features).mu_sigma()
    pr = precision_recall(real_features, features, k=k)
    out = {"fd": frechet_distance(mu, sigma, *FeatureStats().update(real_features).mu_sigma()),
           "precision": float(pr.precision), "recall": float(pr.recall), "fd_teacher": float("nan")}
    if teacher_features is not None:
        out["fd_teacher"] = frechet_distance(mu, sigma, *FeatureStats().update(teacher_features).mu_sigma())
    return out


def evaluate_samples(samples: torch.Tensor, ev: TextEvalSet, classifier, real_features: torch.Tensor,
                     teacher_features: torch.Tensor | None) -> dict:
    """Adherence (with per-half accuracies and swaps) and the pair metrics of one model's samples on one set."""
    from ardistill.evaluation.adherence import prompt_adherence
    adh = prompt_adherence(samples, ev.left, ev.right, classifier)
    return {**adh.to_dict(), **pair_metrics(pair_features(samples, classifier), real_features, teacher_features)}
