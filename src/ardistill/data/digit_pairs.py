"""The embedded text-to-image data: two scikit-learn digits side by side (8x16), with a generated caption.

An example is an ordered pair (left, right) of digit classes, one 8x8 digit image of each class
placed side by side (left half, right half), and a caption from a small grammar that varies the
wording, the digits' spelling ("3" or "three") and the order in which the two are named:

    "a 3 and a 7"                          "three then seven"
    "seven on the right, three on the left" "7 to the right of 3"

so a model has to read the words and their roles, not a class id in disguise: "7 after 3" and
"3 then 7" are the same image, "3 then 7" and "7 then 3" are not.

Compositional generalisation: ``HELDOUT_PAIRS`` (10 of the 100 ordered pairs, each digit once on
each side) never occur in teacher training (``pairs="seen"``); ``pairs="heldout"`` draws only them.
Images come from data/digits.py's deterministic split: ``split="train"`` uses its training images
(teacher training), ``split="heldout"`` its held-out images (the real reference for FD). Everything
is drawn from ``numpy.random.default_rng(seed)``, so a set is bit-for-bit reproducible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ardistill.data.digits import DIGITS_CLASSES, DIGITS_RESOLUTION, load_digits_split

PAIR_HEIGHT, PAIR_WIDTH = DIGITS_RESOLUTION, 2 * DIGITS_RESOLUTION  # 8 x 16
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Each digit on each side once; no doubles, so every digit stays seen on both sides in training.
HELDOUT_PAIRS: tuple[tuple[int, int], ...] = tuple((a, (3 * a + 1) % 10) for a in range(10))
PAIR_SETS = ("seen", "heldout", "all")
# The grammar: {L} is the left digit, {R} the right one; {aL}/{aR} the same with an article.
TEMPLATES: tuple[str, ...] = (
    "{aL} and {aR}",
    "{L} and {R}",
    "{L} then {R}",
    "{L} followed by {R}",
    "{R} after {L}",
    "{L} before {R}",
    "{L} on the left, {R} on the right",
    "{R} on the right, {L} on the left",
    "{aL} on the left and {aR} on the right",
    "{L} to the left of {R}",
    "{R} to the right of {L}",
)
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {w for t in TEMPLATES for w in re.sub(r"\{\w+\}", " ", t).replace(",", " , ").split()}
    | {"a", "an"} | set(NUMBER_WORDS) | {str(d) for d in range(10)}))


def all_pairs(which: str = "all") -> list[tuple[int, int]]:
    """The ordered (left, right) pairs of a set: 'seen' (90, teacher training), 'heldout' (10) or 'all' (100)."""
    if which not in PAIR_SETS:
        raise ValueError(f"unknown pair set {which!r}; choose from {PAIR_SETS}")
    pairs = [(a, b) for a in range(DIGITS_CLASSES) for b in range(DIGITS_CLASSES)]
    held = set(HELDOUT_PAIRS)
    if which == "seen":
        return [p for p in pairs if p not in held]
    if which == "heldout":
        return [p for p in pairs if p in held]
    return pairs


def _digit(d: int, as_word: bool) -> str:
    return NUMBER_WORDS[d] if as_word else str(d)


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou8" else "a ") + word  # "an eight", "an 8", "a 3"


def caption(left: int, right: int, template: int, left_word: bool, right_word: bool) -> str:
    """The caption of (left, right) in one template, each digit spelled as a word or a numeral."""
    if not (0 <= left < 10 and 0 <= right < 10):
        raise ValueError(f"digits must be in 0..9, got ({left}, {right})")
    L, R = _digit(left, left_word), _digit(right, right_word)
    return TEMPLATES[template].format(L=L, R=R, aL=_with_article(L), aR=_with_article(R))


_DIGIT = r"(\d|" + "|".join(NUMBER_WORDS) + r")"


def _template_regex(t: str) -> tuple[re.Pattern, tuple[str, str]]:
    order = tuple(re.findall(r"\{a?([LR])\}", t))
    body = re.escape(t).replace(r"\{aL\}", r"an?\ " + _DIGIT).replace(r"\{aR\}", r"an?\ " + _DIGIT)
    body = body.replace(r"\{L\}", _DIGIT).replace(r"\{R\}", _DIGIT)
    return re.compile("^" + body + "$"), order


_PARSERS = [_template_regex(t) for t in TEMPLATES]


def _value(s: str) -> int:
    return int(s) if s.isdigit() else NUMBER_WORDS.index(s)


def parse_caption(text: str) -> tuple[int, int]:
    """(left, right) that a caption of the grammar describes; ValueError for any other text."""
    norm = " ".join(text.lower().replace(",", " , ").split()).replace(" ,", ",")
    for pattern, order in _PARSERS:
        m = pattern.match(norm)
        if m:
            got = dict(zip(order, (_value(g) for g in m.groups())))
            return got["L"], got["R"]
    raise ValueError(f"caption {text!r} is not in the digit-pairs grammar; examples: "
                     f"{caption(3, 7, 0, False, False)!r}, {caption(3, 7, 7, True, True)!r}")


@dataclass(frozen=True)
class DigitPairs:
    """Examples of the two-digit benchmark: images (N, 1, 8, 16) in [-1, 1], digits, captions."""

    images: torch.Tensor
    left: torch.Tensor  # (N,) int64 class of the left half
    right: torch.Tensor  # (N,) int64 class of the right half
    captions: tuple[str, ...]
    split: str  # which digits images: "train" or "heldout" (data/digits.py's split)
    pairs: str  # which pair set: "seen", "heldout" or "all"
    seed: int

    def __post_init__(self):
        N = self.images.shape[0]
        if self.images.shape[1:] != (1, PAIR_HEIGHT, PAIR_WIDTH):
            raise ValueError(f"DigitPairs: images must be (N, 1, 8, 16), got {tuple(self.images.shape)}")
        if self.left.shape != (N,) or self.right.shape != (N,) or len(self.captions) != N:
            raise ValueError(f"DigitPairs: {N} images but {tuple(self.left.shape)} left, "
                             f"{tuple(self.right.shape)} right and {len(self.captions)} captions")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def draw_captions(left: np.ndarray, right: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A random template and spelling per example."""
    n = len(left)
    tmpl = rng.integers(0, len(TEMPLATES), n)
    words = rng.random((n, 2)) < 0.5
    return [caption(int(a), int(b), int(t), bool(w[0]), bool(w[1])) for a, b, t, w in zip(left, right, tmpl, words)]


def make_digit_pairs(n: int, split: str = "train", pairs: str = "seen", seed: int = 0,
                     data_seed: int = 0, heldout_fraction: float = 0.2) -> DigitPairs:
    """``n`` examples, reproducible from ``seed``: pairs uniform over the set, digit images from the split.

    Args:
        n: number of examples.
        split: digit images from data/digits.py's "train" or "heldout" split.
        pairs: "seen" (teacher training), "heldout" (compositional test) or "all".
        seed: draws of pairs, images and captions.
        data_seed, heldout_fraction: the digits split (data/digits.py).
    """
    if n < 1:
        raise ValueError(f"make_digit_pairs: n must be >= 1, got {n}")
    if split not in ("train", "heldout"):
        raise ValueError(f"make_digit_pairs: split must be 'train' or 'heldout', got {split!r}")
    digits = load_digits_split(split, seed=data_seed, heldout_fraction=heldout_fraction)
    labels = digits.labels.numpy()
    by_class = [np.flatnonzero(labels == c) for c in range(DIGITS_CLASSES)]
    rng = np.random.default_rng(seed)
    choice = np.asarray(all_pairs(pairs))[rng.integers(0, len(all_pairs(pairs)), n)]  # (n, 2)
    left, right = choice[:, 0], choice[:, 1]
    li = np.array([by_class[c][rng.integers(0, len(by_class[c]))] for c in left])
    ri = np.array([by_class[c][rng.integers(0, len(by_class[c]))] for c in right])
    images = torch.cat([digits.images[torch.from_numpy(li)], digits.images[torch.from_numpy(ri)]], dim=3)
    return DigitPairs(images=images.contiguous(), left=torch.from_numpy(left).long(),
                      right=torch.from_numpy(right).long(), captions=tuple(draw_captions(left, right, rng)),
                      split=split, pairs=pairs, seed=seed)


def split_halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, 8, 16) -> the left and right 8x8 halves, each (N, C, 8, 8)."""
    if images.dim() != 4 or images.shape[-2:] != (PAIR_HEIGHT, PAIR_WIDTH):
        raise ValueError(f"expected (N, C, 8, 16) digit pairs, got {tuple(images.shape)}")
    return images[..., :DIGITS_RESOLUTION].contiguous(), images[..., DIGITS_RESOLUTION:].contiguous()
