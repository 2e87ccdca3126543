"""The report of an evaluation (``ardistill demo`` / ``sweep``): report.md, metrics.json and two figures.

- ``grid.png``: one row of samples per model from the same noise (the paper's Figure 5 layout), each
  row labelled with its model's name;
- ``trajectory_errors.png``: per-step MSE to the teacher's trajectory, free-running and teacher-forced,
  over the student steps 1..S.

The rows are ``ModelResult``s (evaluation/evaluate.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ardistill.evaluation.evaluate import ModelResult
from ardistill.io.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from ardistill.io.images import make_grid

LABEL_MARGIN = 4  # pixels of white on either side of a row's label


def trajectory_errors_figure(results: list[ModelResult]):
    """The matplotlib figure of per-step MSE, free-running (solid) vs teacher-forced (dashed), log scale; one x
    tick per student step. Close it with ``matplotlib.pyplot.close``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    num_steps = 0
    for i, r in enumerate(x for x in results if x.errors):
        steps = np.arange(1, len(r.errors["free_running"]) + 1)
        num_steps = max(num_steps, len(steps))
        color = f"C{i}"
        ax.plot(steps, r.errors["free_running"], "-o", color=color, label=f"{r.name} free-running")
        ax.plot(steps, r.errors["teacher_forced"], "--", color=color, alpha=0.7, label=f"{r.name} teacher-forced")
    ax.set_xticks(range(1, num_steps + 1))  # steps are whole: no tick between two of them
    ax.set_yscale("log")
    ax.set_xlabel("student step s")
    ax.set_ylabel("MSE to teacher trajectory")
    ax.set_title("Exposure bias: per-step trajectory error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_trajectory_errors(results: list[ModelResult], path: Path) -> None:
    """Write ``trajectory_errors_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = trajectory_errors_figure(results)

    def write(tmp):
        fig.savefig(tmp, format="png")
    atomic_write(path, write)
    plt.close(fig)


def labelled_grid(rows: dict[str, torch.Tensor], scale: int = 6, padding: int = 1) -> Image.Image:
    """One row per model, same noise in each column, the model's name on a white strip left of its row.

    ``rows``: name -> images (n, 1 or 3, H, W) in [-1, 1]; every row is cut to the shortest. The images
    are ``make_grid``'s (black ``padding`` between them), placed right of the strip.
    """
    names = list(rows)
    n = min(len(v) for v in rows.values())
    imgs = torch.cat([rows[k][:n] for k in names])
    grid = Image.fromarray(make_grid(imgs, nrow=n, padding=padding, scale=scale))
    font = ImageFont.load_default()
    boxes = {name: font.getbbox(name) for name in names}  # (left, top, right, bottom)
    strip = max(b[2] - b[0] for b in boxes.values()) + 2 * LABEL_MARGIN
    canvas = Image.new(grid.mode, (strip + grid.width, grid.height), "white")
    canvas.paste(grid, (strip, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = imgs.shape[-2] * scale
    for r, name in enumerate(names):
        left, top, _, bottom = boxes[name]
        y = padding + r * (row_h + padding) + (row_h - (bottom - top)) // 2 - top
        draw.text((LABEL_MARGIN - left, y), name, fill="black", font=font)
    return canvas


def side_by_side_grid(rows: dict[str, torch.Tensor], path: Path, scale: int = 6) -> None:
    """Write ``labelled_grid`` as a PNG (atomically)."""
    buf = io.BytesIO()
    labelled_grid(rows, scale=scale).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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
