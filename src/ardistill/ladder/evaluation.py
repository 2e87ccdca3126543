"""A ladder's evaluation: one row per (run, rung) and the teacher's row, with the training time and commit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ardistill.io.fileio import atomic_write_json, read_json
from ardistill.ladder.config import TEACHER_ROW, LadderConfig
from ardistill.ladder.runs import LadderRun, recordings, train_to


def training_seconds(run_dir: Path, steps: int, batch: int) -> float:
    """Training time of the run's first ``steps`` steps, from its log (checkpoint writes excluded).

    Each log row gives the throughput of its window; a resumed run's log is cut back to its checkpoint,
    so the time lost to an interruption is not counted, and a compiled run's compilation is.
    """
    total, prev = 0.0, 0
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return float("nan")
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            step = int(row["step"])
            if step > steps:
                break
            total += (step - prev) * batch / float(row["samples_per_s"])
            prev = step
    return total


def code_commit(path: str | Path | None = None) -> str:
    """The git commit of the code that runs (``-dirty`` when its tracked files differ), or 'unknown'."""
    where = Path(path or Path(__file__).parent)
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head[:12] + ("-dirty" if dirty else "")


class Evaluator:
    """The ladder's evaluation: same noise and labels for every student (the eval recording), features of
    the benchmark's held-out images, the teacher's samples, and the first training trajectories."""

    def __init__(self, cfg: LadderConfig):
        from ardistill.comparison.benchmarks import BENCHMARKS
        from ardistill.comparison.classes import load_eval_set
        from ardistill.evaluation.evaluate import image_features
        train_rec, eval_rec = recordings(cfg)
        self.cfg = cfg
        self.ev, _ = load_eval_set(eval_rec)
        self.train, _ = load_eval_set(train_rec, count=cfg.train_eval_count)
        bench = BENCHMARKS[cfg.benchmark]
        self.net = bench.feature_network()
        self.real = self.net.features(bench.real_images("heldout")).float()
        self.teacher_features = image_features(self.ev.teacher_samples, self.net)

    def teacher_row(self) -> dict:
        from ardistill.evaluation.evaluate import image_metrics
        m = image_metrics(self.ev.teacher_samples, self.real, self.net)
        return {"teacher": self.cfg.teacher_name, "student": TEACHER_ROW, "seed": "", "steps": 0, "fd": m.fd,
                "fd_to_teacher": 0.0, "precision": m.precision, "recall": m.recall, "mse_free": "", "mse_forced": "",
                "mse_free_train": "", "mse_forced_train": "", "wall_s": "", "commit": code_commit()}

    def student_row(self, run: LadderRun, steps: int, wall_s: float | None = None, name: str | None = None) -> dict:
        """The row of ``run``'s weights at ``steps``; ``wall_s`` defaults to the run's training time to there,
        ``name`` to the student's table name (``LadderConfig.row_name``)."""
        from ardistill.evaluation.evaluate import image_metrics, run_sampler, trajectory_errors
        from ardistill.io.student_io import load_student
        dev = self.cfg.device  # the student samples there; features and metrics stay on the CPU
        student = load_student(run.rung_weights(steps), device=dev)
        samples = run_sampler(student.sample, self.ev.noise, self.ev.labels, device=dev)
        m = image_metrics(samples, self.real, self.net, teacher_features=self.teacher_features)
        held = trajectory_errors(student, self.ev, device=dev)
        train = trajectory_errors(student, self.train, device=dev)
        fmt = lambda v: " ".join(f"{x:.6g}" for x in v)
        if wall_s is None:
            wall_s = training_seconds(run.run_dir, steps, self.cfg.batch_size)
        name = name or self.cfg.row_name(run.student)
        return {"teacher": self.cfg.teacher_name, "student": name, "seed": run.seed, "steps": steps,
                "fd": m.fd, "fd_to_teacher": m.fd_teacher, "precision": m.precision, "recall": m.recall,
                "mse_free": fmt(held["free_running"]), "mse_forced": fmt(held["teacher_forced"]),
                "mse_free_train": fmt(train["free_running"]), "mse_forced_train": fmt(train["teacher_forced"]),
                "wall_s": round(wall_s, 1), "commit": code_commit()}


def run_rung(cfg: LadderConfig, run: LadderRun, steps: int, evaluator: Evaluator | None = None) -> dict:
    """One job: train ``run`` to ``steps``, evaluate it there, save the row beside the weights (idempotent)."""
    path = run.rung_json(steps)
    if path.is_file():
        return read_json(path, "ladder rung")
    train_to(cfg, run, steps)
    row = (evaluator or Evaluator(cfg)).student_row(run, steps)
    atomic_write_json(path, row)
    return row


def teacher_row(cfg: LadderConfig, evaluator: Evaluator | None = None) -> dict:
    """The teacher's row (FD etc. of its samples on the eval recording), cached in ``out/teacher_eval.json``."""
    path = Path(cfg.out) / "teacher_eval.json"
    if path.is_file():
        return read_json(path, "ladder teacher evaluation")
    row = (evaluator or Evaluator(cfg)).teacher_row()
    atomic_write_json(path, row)
    return row
