"""Prompt adherence on the two-digit benchmark: does the image show the caption's digits, in its order?

The shipped digits classifier (evaluation/classifier.py) reads each 8x8 half of an 8x16 sample; a
sample adheres when the left half is classified as the caption's left digit and the right half as
its right digit. The score is the fraction of samples that adhere (the paper's "prompt adherence",
here with an exact reader instead of a human or VQA judge). Samples are clamped to [-1, 1] first, as
when they are written to image files. Per-half accuracies and the rate of swapped digits (right
digits, wrong order) are reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ardistill.data.digit_pairs import split_halves


@dataclass(frozen=True)
class Adherence:
    """Prompt adherence of N samples: the fraction with both digits right, per-half accuracies, swaps."""

    adherence: float  # both halves match the caption, in order
    left_accuracy: float
    right_accuracy: float
    swapped: float  # left reads as the caption's right digit and right as its left (pairs a != b only)
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def read_digit_pairs(images: torch.Tensor, classifier: nn.Module, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 16) -> the classifier's reading of the left and right halves, each (N,) int64."""
    left, right = split_halves(images.float().clamp(-1, 1))
    device = next(classifier.parameters()).device
    classifier.eval()

    def classify(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([classifier(x[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)

    return classify(left), classify(right)


def prompt_adherence(images: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                     classifier: nn.Module) -> Adherence:
    """Adherence of samples ``images`` (N, 1, 8, 16) to captions naming digits ``left`` and ``right`` (N,)."""
    left, right = torch.as_tensor(left).long().cpu(), torch.as_tensor(right).long().cpu()
    if left.shape != (images.shape[0],) or right.shape != left.shape:
        raise ValueError(f"prompt_adherence: {images.shape[0]} images but digits of shapes "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    if images.shape[0] == 0:
        raise ValueError("prompt_adherence: no samples")
    got_l, got_r = read_digit_pairs(images, classifier)
    ok_l, ok_r = got_l == left, got_r == right
    distinct = left != right
    swapped = (got_l == right) & (got_r == left) & distinct
    return Adherence(adherence=float((ok_l & ok_r).float().mean()), left_accuracy=float(ok_l.float().mean()),
                     right_accuracy=float(ok_r.float().mean()),
                     swapped=float(swapped.sum()) / max(1, int(distinct.sum())), num_samples=int(images.shape[0]))
