"""The folder ``ardistill generate --prompts`` writes, and its evaluation (``ardistill evaluate --prompts``).

The folder holds the images as an ADM batch (``samples.npz``, read incrementally) and one index row per
image (``samples.jsonl``: index, prompt id, prompt, seed). Its evaluation is the CLIP score of every
(image, prompt) pair (evaluation/clip_score.py) and, against a reference ADM batch of real images, FD /
precision / recall in CLIP space or Inception's (evaluation/evaluate.py's ``evaluate_npz``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ardistill.evaluation.clip_score import CLIPScorer, CLIPScoreStats

SAMPLES_NPZ = "samples.npz"  # ADM layout: arr_0 uint8 (N, H, W, 3)
SAMPLES_INDEX = "samples.jsonl"  # one line per image: index, prompt id, prompt, seed


def read_prompt_samples(folder: str | os.PathLike):
    """The images (an ADM batch, read incrementally) and their index rows of a ``generate --prompts`` folder."""
    from ardistill.evaluation.adm import read_adm_npz
    folder = Path(folder)
    for name in (SAMPLES_NPZ, SAMPLES_INDEX):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not a folder written by ardistill generate --prompts")
    images = read_adm_npz(folder / SAMPLES_NPZ, require_images=True)
    rows = []
    with open(folder / SAMPLES_INDEX, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{folder / SAMPLES_INDEX}:{n}: not valid JSON ({e})") from e
    if len(rows) != images.num_images:
        raise ValueError(f"{folder}: {images.num_images} images in {SAMPLES_NPZ} but {len(rows)} rows in {SAMPLES_INDEX}")
    return images, rows


def evaluate_prompt_samples(samples: str | os.PathLike, clip: str | os.PathLike, reference: str | os.PathLike | None = None,
                            features: str = "clip", batch_size: int = 64, device=None, **feature_kw) -> dict:
    """``ardistill evaluate --prompts``: CLIP score of a ``generate --prompts`` folder, and FD / precision /
    recall against a reference ADM ``.npz`` of real images when given (in CLIP space, or Inception's)."""
    images, rows = read_prompt_samples(samples)
    scorer = CLIPScorer(clip, device=device)
    stats = CLIPScoreStats()
    for i, x in enumerate(images.iter_tensors(batch_size)):  # streamed: memory holds one batch of images
        stats.update(scorer.scores(x, [r["prompt"] for r in rows[i * batch_size:(i + 1) * batch_size]]))
    out = {"clip_score": stats.mean, "clip_score_std": stats.std, "num_samples": stats.count,
           "num_prompts": len({r["id"] for r in rows}), "clip": str(clip)}
    if reference is not None:
        from ardistill.evaluation.evaluate import evaluate_npz
        from ardistill.evaluation.features import get_feature_network
        net = scorer if features == "clip" else get_feature_network(features, device=device, **feature_kw)
        fd = evaluate_npz(Path(samples) / SAMPLES_NPZ, reference, net, batch_size=batch_size, device=device)
        out.update({k: fd[k] for k in ("fd", "precision", "recall", "num_reference", "feature_network")})
    return out
