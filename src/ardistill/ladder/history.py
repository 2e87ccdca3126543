"""Does a ladder's ARD student use its history? The history-cut ablation at every evaluated rung.

Each ARD run's EMA weights at a rung sample the evaluation noise twice: as trained, and with the history
cut at sampling time (``sample(history=False)``: every step sees only its current state, as a step
distillation student would). Both are compared with the teacher's samples from the same noise (per-pixel
MSE and FD to the teacher) and with each other. A student that ignores its history samples the same
either way; one that relies on it gets worse without it.

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
from ardistill.ladder.table import write_csv

HISTORY_CUT_FIELDS = ("teacher", "student", "seed", "steps", "mse_to_teacher", "mse_to_teacher_history_cut",
                      "mse_with_vs_cut", "fd", "fd_history_cut", "fd_to_teacher", "fd_to_teacher_history_cut",
                      "commit")


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
    return row if row.get("weights_sha256") == sha256_file(run.rung_weights(steps)) else None


def history_cut_row(cfg: LadderConfig, run: LadderRun, steps: int, evaluator) -> dict:
    """The ablation of ``run`` at ``steps``, saved beside its weights; ``evaluator``: the ladder's Evaluator."""
    from ardistill.evaluation.evaluate import history_dependence, image_metrics, run_sampler
    from ardistill.io.student_io import load_student
    from ardistill.ladder.evaluation import code_commit
    ev, dev = evaluator.ev, cfg.device
    weights = run.rung_weights(steps)
    student = load_student(weights, device=dev)
    samples = run_sampler(student.sample, ev.noise, ev.labels, device=dev)
    h = history_dependence(student, ev, samples=samples, device=dev)
    metrics = [image_metrics(x, evaluator.real, evaluator.net, teacher_features=evaluator.teacher_features)
               for x in (samples, h["samples_history_cut"])]
    row = {"teacher": cfg.teacher_name, "student": cfg.row_name(run.student), "seed": run.seed, "steps": steps,
           "mse_to_teacher": h["mse_to_teacher"], "mse_to_teacher_history_cut": h["mse_to_teacher_history_cut"],
           "mse_with_vs_cut": h["mse_with_vs_cut"], "fd": metrics[0].fd, "fd_history_cut": metrics[1].fd,
           "fd_to_teacher": metrics[0].fd_teacher, "fd_to_teacher_history_cut": metrics[1].fd_teacher,
           "commit": code_commit(), "weights_sha256": sha256_file(weights)}
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


def history_cut_table(rows: list[dict]) -> str:
    """Markdown, seed means per (teacher, student, steps): the samples' MSE to the teacher's with the history
    and with it cut, the share of the error the history accounts for (MSE with vs cut over MSE to teacher),
    and FD to the teacher both ways."""
    lines = ["| teacher | student | steps | seeds | MSE to teacher | MSE to teacher, history cut | "
             "MSE with vs cut (/ MSE to teacher) | FD to teacher | FD to teacher, history cut |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["student"], int(r["steps"])), []).append(r)
    for (t, name, n), rs in sorted(groups.items()):
        m = {k: float(np.mean([float(r[k]) for r in rs])) for k in HISTORY_CUT_FIELDS[4:-1]}
        lines.append(f"| {t} | {name} | {n} | {len(rs)} | {m['mse_to_teacher']:.5f} | "
                     f"{m['mse_to_teacher_history_cut']:.5f} | {m['mse_with_vs_cut']:.5f} "
                     f"({m['mse_with_vs_cut'] / m['mse_to_teacher']:.0%}) | {m['fd_to_teacher']:.1f} | "
                     f"{m['fd_to_teacher_history_cut']:.1f} |")
    return "\n".join(lines)
