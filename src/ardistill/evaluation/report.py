"""The report of an evaluation (``ardistill demo`` / ``sweep``): report.md, metrics.json and two figures.

- ``grid.png``: one row of samples per model from the same noise (the paper's Figure 5 layout);
- ``trajectory_errors.png``: per-step MSE to the teacher's trajectory, free-running and teacher-forced.

The rows are ``ModelResult``s (evaluation/evaluate.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ardistill.evaluation.evaluate import ModelResult
from ardistill.io.fileio import atomic_write_bytes, atomic_write_json


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
