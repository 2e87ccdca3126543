"""CLIP score (prompt adherence at scale) from a local CLIP folder, streamed like the Frechet statistics.

CLIP score = 100 * max(cos(E_image, E_text), 0) per (image, prompt) pair, averaged over pairs (Hessel
et al. 2021; torchmetrics' CLIPScore definition). The model, tokenizer and image processor come from
one local ``transformers`` CLIP folder (e.g. openai/clip-vit-large-patch14 saved to disk); nothing
is downloaded. ``CLIPScoreStats`` holds a running sum, sum of squares and count, so scores of any
number of samples are gathered batch by batch and across torchrun processes.

The same network gives image features for a Frechet distance in CLIP space (``get_feature_network("clip")``).
Scoring a ``generate --prompts`` folder (``ardistill evaluate --prompts``) is evaluation/prompt_samples.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ardistill.data.t5 import require_transformers
from ardistill.io import distributed as dist


def _as_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) as is; float in [-1, 1] -> uint8 with DiT's rounding (as saved samples are)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP expects RGB images (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def _embeds(out) -> torch.Tensor:
    """transformers <5 returns the projected embeddings; 5 returns an output whose pooler_output holds them."""
    return out if torch.is_tensor(out) else out.pooler_output


class CLIPScorer:
    """A CLIP model, tokenizer and image processor from one local folder."""

    name = "clip"

    def __init__(self, folder: str | os.PathLike, device=None, dtype: torch.dtype = torch.float32):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP folder not found: {folder} (a local transformers CLIP folder: config.json, "
                                    "weights, tokenizer and preprocessor files)")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP folder {folder} has no config.json")
        transformers = require_transformers()
        self.folder = folder
        self.device = torch.device(device or "cpu")
        self.model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        import warnings
        with warnings.catch_warnings():  # "no torchvision: PIL backend", the same preprocessing
            warnings.simplefilter("ignore")
            self.processor = transformers.CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 or float [-1, 1] -> projected CLIP image embeddings (N, P) float32."""
        x = _as_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()
        pixels = self.processor(images=list(x), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        return _embeds(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> projected CLIP text embeddings (N, P) float32 (truncated to CLIP's context)."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return _embeds(self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                                    attention_mask=batch["attention_mask"].to(self.device))).float()

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair CLIP scores (N,): 100 * max(cos, 0)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIP score: {images.shape[0]} images but {len(prompts)} prompts")
        a = torch.nn.functional.normalize(self.image_embeds(images), dim=-1)
        b = torch.nn.functional.normalize(self.text_embeds(prompts), dim=-1)
        return (100.0 * (a * b).sum(-1)).clamp(min=0).cpu()

    # the feature-network interface (evaluation/features.py): FD in CLIP image-embedding space
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embeds(images)


class CLIPScoreStats:
    """Streaming CLIP score: running sum, sum of squares and count; merge / all_reduce like FeatureStats."""

    def __init__(self):
        self.total = 0.0
        self.total_sq = 0.0
        self.count = 0

    def update(self, scores: torch.Tensor | np.ndarray) -> "CLIPScoreStats":
        s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        self.total += float(s.sum())
        self.total_sq += float((s * s).sum())
        self.count += int(s.numel())
        return self

    def merge(self, other: "CLIPScoreStats") -> "CLIPScoreStats":
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count
        return self

    def all_reduce(self) -> "CLIPScoreStats":
        """Sum over torchrun processes (a no-op in one process)."""
        from ardistill.evaluation.metrics import _collective_device
        t = torch.tensor([self.total, self.total_sq, float(self.count)], dtype=torch.float64)
        t = dist.all_reduce_sum(t.to(_collective_device())).cpu()
        self.total, self.total_sq, self.count = float(t[0]), float(t[1]), int(round(float(t[2])))
        return self

    @property
    def mean(self) -> float:
        if not self.count:
            raise ValueError("CLIP score of zero samples")
        return self.total / self.count

    @property
    def std(self) -> float:
        """Standard deviation of the per-pair scores."""
        m = self.mean
        return math.sqrt(max(self.total_sq / self.count - m * m, 0.0))


def clip_score(scorer: CLIPScorer, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> CLIPScoreStats:
    """Stream (images, prompts) pairs through the scorer in batches; returns the statistics."""
    stats = CLIPScoreStats()
    for i in range(0, images.shape[0], batch_size):
        stats.update(scorer.scores(images[i:i + batch_size], prompts[i:i + batch_size]))
    return stats
