"""Does a ladder's ARD student use its history? The history-cut ablation at every evaluated rung.

Each ARD run's EMA weights at a rung sample the evaluation noise twice: as trained, and with the history
cut at sampling time (``sample(history=False)``: every step sees only its current state, as a step
distillation student would). Both are compared with the teacher's samples from the same noise (per-pixel
MSE and FD to the teacher) and with each other. A student that ignores its history samples the same
either way; one that relies on it gets worse without it.

The same rows ask what the history is read *for*, with the student's own current state at every step
(per-step columns; the table shows the final step) and its history swapped (``history_swap_errors``): for the teacher's states of the same trajectory (could
a perfect history correct the student's errors? the error then sits between the rung's free-running and
teacher-forced ones, near free-running if not), and for the teacher's states of another image (does the
history's content matter at all? near free-running if not).

Rows are cached beside the rung's weights (``rungs/history_cut_XXXXXXXX.json``, with the weights'
sha256), so rerunning only evaluates new rungs, and rungs whose weights changed since. This only reads
a ladder: it can run beside the ladder's own jobs, and evaluates the rungs whose weights exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ardistill.io.fileio import atomic_write_json, read_json, sha256_file
from ardistill.ladder.config import LADDER_STUDENTS, LadderConfig
from ardistill.ladder.runs import LadderRun, ladder_runs
from ardistill.ladder.table import final_step, write_csv

SCALAR_FIELDS = ("mse_to_teacher", "mse_to_teacher_history_cut", "mse_with_vs_cut", "fd", "fd_history_cut",
                 "fd_to_teacher", "fd_to_teacher_history_cut")
# per-step MSE to the teacher's trajectory (space-separated, as the ladder's CSV): the rung's teacher-forced
# and free-running errors, and the student's own state with the history swapped (history_swap_errors)
PER_STEP_FIELDS = ("mse_forced", "mse_free", "mse_teacher_history", "mse_other_history")
HISTORY_CUT_FIELDS = ("teacher", "student", "seed", "steps", *SCALAR_FIELDS, *PER_STEP_FIELDS, "commit")


def history_cut_json(run: LadderRun, steps: int) -> Path:
    """Beside the rung's weights, under a name the rung rows' pattern (``step_XXXXXXXX.json``) cannot match."""
    return run.run_dir / "rungs" / f"history_cut_{steps:08d}.json"


def history_runs(cfg: LadderConfig) -> list[LadderRun]:
    """The ladder's runs whose students have a history (``history_layers`` > 0)."""
    return [r for r in ladder_runs(cfg) if LADDER_STUDENTS[r.student].get("history_layers", 0) > 0]


def cached_history_cut(run: LadderRun, steps: int) -> dict | None:
    """The saved row of ``run`` at ``steps``, or None when there is none or its rung's weights changed since."""
    path = history_cut_json(run, steps)
    if not path.is_file():
        return None
    row = read_json(path, "ladder history-cut row")
    complete = all(k in row for k in HISTORY_CUT_FIELDS)  # a row of an older version lacks later columns
    return row if complete and row.get("weights_sha256") == sha256_file(run.rung_weights(steps)) else None


def history_cut_row(cfg: LadderConfig, run: LadderRun, steps: int, evaluator) -> dict:
    """The ablation of ``run`` at ``steps``, saved beside its weights; ``evaluator``: the ladder's Evaluator."""
    from ardistill.evaluation.evaluate import history_dependence, image_metrics, history_swap_errors, run_sampler
    from ardistill.io.student_io import load_student
    from ardistill.ladder.evaluation import code_commit
    ev, dev = evaluator.ev, cfg.device
    weights = run.rung_weights(steps)
    student = load_student(weights, device=dev)
    samples = run_sampler(student.sample, ev.noise, ev.labels, device=dev)
    h = history_dependence(student, ev, samples=samples, device=dev)
    metrics = [image_metrics(x, evaluator.real, evaluator.net, teacher_features=evaluator.teacher_features)
               for x in (samples, h["samples_history_cut"])]
    rung = read_json(run.rung_json(steps), "ladder rung")  # its free-running and teacher-forced errors
    swap = {h: " ".join(f"{x:.6g}" for x in history_swap_errors(student, ev, h, device=dev))
            for h in ("teacher", "other")}
    row = {"teacher": cfg.teacher_name, "student": cfg.row_name(run.student), "seed": run.seed, "steps": steps,
           "mse_to_teacher": h["mse_to_teacher"], "mse_to_teacher_history_cut": h["mse_to_teacher_history_cut"],
           "mse_with_vs_cut": h["mse_with_vs_cut"], "fd": metrics[0].fd, "fd_history_cut": metrics[1].fd,
           "fd_to_teacher": metrics[0].fd_teacher, "fd_to_teacher_history_cut": metrics[1].fd_teacher,
           "mse_forced": rung["mse_forced"], "mse_free": rung["mse_free"], "mse_teacher_history": swap["teacher"],
           "mse_other_history": swap["other"], "commit": code_commit(), "weights_sha256": sha256_file(weights)}
    atomic_write_json(history_cut_json(run, steps), row)
    return row


def history_cut_rows(cfgs: list[LadderConfig], progress=print) -> list[dict]:
    """Every evaluated rung of every history run of the ladders (rung weights and json present)."""
    from ardistill.ladder.evaluation import Evaluator
    rows = []
    for cfg in cfgs:
        evaluator = None
        for run in history_runs(cfg):
            for rung in cfg.rungs:
                if not (run.rung_json(rung).is_file() and run.rung_weights(rung).is_file()):
                    continue
                row = cached_history_cut(run, rung)
                if row is None:
                    evaluator = evaluator or Evaluator(cfg)
                    row = history_cut_row(cfg, run, rung, evaluator)
                rows.append(row)
                if progress:
                    progress(f"[{cfg.teacher_name}] {run.student} seed {run.seed}: history cut at {rung}")
    return rows


def write_history_csv(rows: list[dict], path: str | Path) -> Path:
    """The ablation's rows (HISTORY_CUT_FIELDS), written atomically."""
    return write_csv(rows, path, HISTORY_CUT_FIELDS)


def _seed_means(rows: list[dict]) -> list[tuple[tuple, int, dict]]:
    """((teacher, student, steps), seeds, means of the numeric columns and, as ``final_*``, of the per-step
    columns' final step), sorted."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["student"], int(r["steps"])), []).append(r)
    out = []
    for k, rs in sorted(groups.items()):
        m = {c: float(np.mean([float(r[c]) for r in rs])) for c in SCALAR_FIELDS}
        m.update({"final" + c[3:]: float(np.mean([final_step(r, c) for r in rs])) for c in PER_STEP_FIELDS})
        out.append((k, len(rs), m))
    return out


def history_cut_table(rows: list[dict]) -> str:
    """Markdown, seed means per (teacher, student, steps): the samples' MSE to the teacher's with the history
    and with it cut, the share of the error the history accounts for (MSE with vs cut over MSE to teacher),
    and FD to the teacher both ways."""
    lines = ["| teacher | student | steps | seeds | MSE to teacher | MSE to teacher, history cut | "
             "MSE with vs cut (/ MSE to teacher) | FD to teacher | FD to teacher, history cut |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (t, name, n), seeds, m in _seed_means(rows):
        lines.append(f"| {t} | {name} | {n} | {seeds} | {m['mse_to_teacher']:.5f} | "
                     f"{m['mse_to_teacher_history_cut']:.5f} | {m['mse_with_vs_cut']:.5f} "
                     f"({m['mse_with_vs_cut'] / m['mse_to_teacher']:.0%}) | {m['fd_to_teacher']:.1f} | "
                     f"{m['fd_to_teacher_history_cut']:.1f} |")
    return "\n".join(lines)


def history_swap_table(rows: list[dict]) -> str:
    """Markdown, seed means per (teacher, student, steps): the final step's MSE to the teacher's trajectory
    teacher-forced, free-running, and with the student's own state but the history swapped: for the
    teacher's of the same image, with the share of the free-running excess over teacher-forced it removes,
    (free - swapped) / (free - forced); and for the teacher's of another image, with its change against
    free-running."""
    lines = ["| teacher | student | steps | seeds | final step: teacher-forced | free-running | "
             "own state, the teacher's history | excess it removes | own state, another image's history | "
             "change |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (t, name, n), seeds, m in _seed_means(rows):
        forced, free = m["final_forced"], m["final_free"]
        removed = f"{(free - m['final_teacher_history']) / (free - forced):+.0%}" if free > forced else "-"
        lines.append(f"| {t} | {name} | {n} | {seeds} | {forced:.5f} | {free:.5f} | {m['final_teacher_history']:.5f} | "
                     f"{removed} | "
                     f"{m['final_other_history']:.5f} | {m['final_other_history'] / free - 1:+.1%} |")
    return "\n".join(lines)
