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


def save_captioned_grid(rows: dict[str, torch.Tensor], captions: list[str], path: str | os.PathLike,
                        scale: int = 6, padding: int = 2) -> Path:
    """One PNG: a row of images per model (name on the left), the caption printed under each column.

    ``rows``: name -> images (n, 1 or 3, H, W) in [-1, 1], the same n for every row; ``captions``: n
    strings, wrapped to the column width.
    """
    import textwrap

    from PIL import ImageDraw, ImageFont

    if not rows:
        raise ValueError("captioned grid: no rows")
    n = len(captions)
    if any(v.shape[0] != n for v in rows.values()):
        raise ValueError(f"captioned grid: every row needs {n} images (one per caption), got "
                         f"{ {k: int(v.shape[0]) for k, v in rows.items()} }")
    font = ImageFont.load_default()
    ch_w, ch_h = _text_size(font, "M")
    h, w = next(iter(rows.values())).shape[-2:]
    cell_w = w * scale
    wrap = max(4, cell_w // ch_w)
    wrapped = [textwrap.wrap(c, wrap) or [""] for c in captions]
    label_w = max(_text_size(font, name)[0] for name in rows) + 2 * padding
    cap_h = max(len(c) for c in wrapped) * (ch_h + 2) + padding
    W = label_w + n * (cell_w + padding) + padding
    H = padding + len(rows) * (h * scale + padding) + cap_h
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(rows.items()):
        y = padding + r * (h * scale + padding)
        strip = make_grid(imgs, nrow=n, padding=padding, scale=scale, pad_value=1.0)
        tile = Image.fromarray(strip).convert("RGB")
        canvas.paste(tile, (label_w - padding, y - padding))
        draw.text((padding, y + (h * scale - ch_h) // 2), name, fill=(0, 0, 0), font=font)
    y0 = padding + len(rows) * (h * scale + padding)
    for k, lines in enumerate(wrapped):
        x = label_w + k * (cell_w + padding)
        for i, line in enumerate(lines):
            draw.text((x, y0 + i * (ch_h + 2)), line, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return max(1, right - left), max(1, bottom - top)
