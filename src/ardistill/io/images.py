"""Writing images: a grid of samples as one PNG."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ardistill.io.fileio import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 1, scale: int = 1,
              pad_value: float = -1.0) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] (C = 1 or 3) -> one uint8 grid (rows, cols) or (rows, cols, 3).

    ``nrow`` images per row; ``padding`` pixels of ``pad_value`` (image range; -1 = black) between
    them; ``scale`` enlarges every pixel by nearest-neighbour repetition (8x8 digits are unreadable at
    scale 1).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image grid needs (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"image grid: need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    n, c, h, w = images.shape
    u = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    u = u.repeat(scale, axis=2).repeat(scale, axis=3)  # (N, C, h*s, w*s)
    hs, ws = h * scale, w * scale
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    fill = int(round((min(max(pad_value, -1.0), 1.0) + 1) * 127.5))
    grid = np.full((c, rows * (hs + padding) + padding, cols * (ws + padding) + padding), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y0, x0 = padding + r * (hs + padding), padding + k * (ws + padding)
        grid[:, y0:y0 + hs, x0:x0 + ws] = u[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 1,
                    scale: int = 1, pad_value: float = -1.0) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (atomically); returns the path."""
    grid = make_grid(images, nrow=nrow, padding=padding, scale=scale, pad_value=pad_value)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
