"""The ladder's figure: FD to the teacher, and the error the students' own steps add, against training steps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ardistill.io.fileio import atomic_write_bytes
from ardistill.ladder.config import TEACHER_ROW
from ardistill.ladder.gan import parse_row_name


def plot_ladder(rows: list[dict], path: str | Path) -> Path:
    """One column per teacher. First row: FD to teacher vs training steps (log x), one line per student:
    the seed mean, with the seeds' range shaded (students with one seed show their points only). Second
    row: the error the students' own steps add, final-step free-running over teacher-forced MSE, the same
    way. With GAN-stage rows, a third row: FD (to real held-out images, the paper's measure: a GAN pulls
    the student towards the real data, away from the teacher's samples) vs the GAN factor, each base
    student's control dashed, the teacher's FD dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    teachers = sorted({r["teacher"] for r in rows})
    is_gan = lambda name: parse_row_name(name).gan
    has_gan = any(is_gan(r["student"]) for r in rows)
    fig, axes = plt.subplots(3 if has_gan else 2, len(teachers), figsize=(5.2 * len(teachers), 12 if has_gan else 8),
                             squeeze=False)
    final = lambda r, k: float(r[k].split()[-1])
    for i, t in enumerate(teachers):
        students = [s for s in dict.fromkeys(r["student"] for r in rows if r["teacher"] == t)
                    if s != TEACHER_ROW and not is_gan(s)]
        mine = [r for r in rows if r["teacher"] == t]
        sizes = {s.rpartition(", S=")[2] for s in students if ", S=" in s}
        title = f"teacher {t}, S = {', '.join(sorted(sizes)) or 4}"
        _plot_curves(axes[0][i], mine, students, lambda r: float(r["fd_to_teacher"]),
                     "FD to the teacher's samples (same noise)", title, log_y=True)
        _plot_curves(axes[1][i], mine, students, lambda r: final(r, "mse_free") / final(r, "mse_forced"),
                     "final-step MSE to teacher: free-running / teacher-forced",
                     f"{title}: error added by the student's own steps", log_y=False)
    if has_gan:
        for ax, t in zip(axes[2], teachers):
            trow = [r for r in rows if r["teacher"] == t and r["student"] == TEACHER_ROW]
            _plot_gan(ax, [r for r in rows if r["teacher"] == t and is_gan(r["student"])], t,
                      float(trow[0]["fd"]) if trow else None)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def curve_label(student: str, steps: list[int], seeds: list[int]) -> str:
    """A curve's legend: the student and its seed count, with the rungs that have fewer seeds (still
    training), e.g. 'step distillation (2 seeds; 1 at 10,000)'."""
    n = max(seeds)
    fewer = "".join(f"; {k} at {m:,}" for m, k in zip(steps, seeds) if k < n)
    return f"{student} ({n} seed{'s' if n > 1 else ''}{fewer})"


def _plot_curves(ax, rows: list[dict], students: list[str], value, ylabel: str, title: str, log_y: bool) -> None:
    """``value(row)`` vs training steps for each student: seed mean, the seeds' range as band and bars."""
    from matplotlib.ticker import NullFormatter
    for s in students:
        rs = [r for r in rows if r["student"] == s]
        steps = sorted({int(r["steps"]) for r in rs})
        vals = [[value(r) for r in rs if int(r["steps"]) == n] for n in steps]
        mean = [float(np.mean(v)) for v in vals]
        color, ls = _style(s)
        n = max(len(v) for v in vals)
        ax.plot(steps, mean, ls, marker="o", ms=3, color=color, label=curve_label(s, steps, [len(v) for v in vals]))
        if n > 1:  # the seeds' range: a band between rungs, a bar at each rung
            lo, hi = [min(v) for v in vals], [max(v) for v in vals]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
            ax.errorbar(steps, mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]],
                        fmt="none", ecolor=color, capsize=3, lw=1)
    ax.set_xscale("log")
    rungs = sorted({int(r["steps"]) for r in rows if r["student"] in students})
    ax.set_xticks(rungs, [f"{n:,}" for n in rungs])  # the rungs, not the log axis' crowded minor labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training steps (batch 64)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if students:
        ax.legend(fontsize=7)


def _style(student: str) -> tuple:
    color = "tab:red" if student.startswith("ARD") else "tab:blue" if student.startswith("step") else None
    return color, "--" if "per-step" in student else "-"


def _plot_gan(ax, rows: list[dict], teacher: str, teacher_fd: float | None) -> None:
    """The GAN stage of one teacher: FD (seed mean, seeds as dots) vs factor, controls dashed."""
    names = {r["student"]: parse_row_name(r["student"]) for r in rows}
    for base in dict.fromkeys(n.base + n.sizes for n in names.values()):
        color = _style(base)[0]
        mine = [(names[r["student"]], r) for r in rows if names[r["student"]].base + names[r["student"]].sizes == base]
        control = [float(r["fd"]) for n, r in mine if n.is_control]
        factors = sorted({n.factor for n, _ in mine if n.factor is not None})
        vals = [[float(r["fd"]) for n, r in mine if n.factor == f] for f in factors]
        if factors:
            ax.plot(factors, [np.mean(v) for v in vals], "-", marker="o", ms=4, color=color, label=f"{base} + GAN")
            for f, v in zip(factors, vals):
                ax.plot([f] * len(v), v, ".", color=color, alpha=0.5)
        if control:
            ax.axhline(float(np.mean(control)), ls="--", color=color, lw=1,
                       label=f"{base}, regression-only control ({len(control)} seed{'s' if len(control) > 1 else ''})")
    if teacher_fd is not None:
        ax.axhline(teacher_fd, ls=":", color="black", lw=1, label="teacher")
    steps = sorted({int(r["steps"]) for r in rows})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GAN factor (adaptive weight x factor)")
    ax.set_ylabel("FD (held-out real images)")
    ax.set_title(f"teacher {teacher}: GAN stage, {', '.join(map(str, steps))} steps in all")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
