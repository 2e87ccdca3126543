"""Convergence ladder: ARD vs step distillation along one long training run per student.

The comparisons in ``compare`` train every student for one budget. A ladder trains each (student,
seed) once, with a schedule that does not depend on the budget (linear warm-up, then a constant
learning rate; EMA with warm-up, so that the average always spans about the last tenth of the run),
and evaluates its EMA weights at increasing budgets, the *rungs* (e.g. 300, 1k, 3k, 10k, 30k steps).
Extending a run from one rung to the next is ``distill(..., resume=True)`` with a larger ``steps``,
which is exact (tested in test_train.py), so rung r's student is the same as a run stopped there.

Every rung of every run leaves, in its run folder::

    rungs/step_XXXXXXXX.safetensors   the EMA student at that budget (load_student accepts it)
    rungs/step_XXXXXXXX.json          its evaluation: FD, FD to teacher, precision/recall, per-step MSE
                                      free-running and teacher-forced on held-out *and* training
                                      trajectories, training wall time, the code's commit

and ``ladder_rows`` / ``write_csv`` gather them into one table (``docs/data/photos_ladder.csv``).
A job (``run_rung``) is idempotent: a rung whose json exists is not trained or evaluated again, an
interrupted one resumes from the run's latest checkpoint. ``scripts/photos_ladder.py`` schedules the
jobs (rung by rung, several processes) and draws the figure; docs/results.md has the results.

At the longest rung, the GAN stage (``gan.py``) fine-tunes chosen runs with regression + GAN at several
factors, each against its regression-only control of the same length.

Modules: ``config`` (LadderConfig), ``runs`` (recordings, training runs, rungs), ``evaluation`` (one
row per rung), ``gan`` (the GAN stage), ``history`` (the history-cut ablation at every rung), ``schedule`` (the jobs' order and a
replay of it for the wall time), ``status`` (where each run stands), ``table`` (CSV, degradation ratios, error accumulation, convergence slopes), ``figure``.
"""

from ardistill.ladder.config import CSV_FIELDS, LADDER_STUDENTS, TEACHER_ROW, LadderConfig
from ardistill.ladder.evaluation import Evaluator, code_commit, run_rung, teacher_row, training_seconds
from ardistill.ladder.figure import plot_ladder
from ardistill.ladder.gan import GANArm, gan_arms, gan_config, parse_row_name, run_arm, train_arm
from ardistill.ladder.runs import LadderRun, distill_config, ladder_runs, prepare, recordings, train_to
from ardistill.ladder.table import (PAIRS, convergence, convergence_table, degradation_ratios, error_accumulation, error_table, gan_table, ladder_rows,
                                    ratio_table, read_csv, row_order, write_csv)

__all__ = ["CSV_FIELDS", "LADDER_STUDENTS", "TEACHER_ROW", "LadderConfig", "Evaluator", "code_commit", "run_rung",
           "teacher_row", "training_seconds", "plot_ladder", "GANArm", "gan_arms", "gan_config", "parse_row_name", "run_arm", "train_arm",
           "LadderRun", "distill_config", "ladder_runs", "prepare", "recordings", "train_to", "PAIRS", "convergence", "convergence_table",
           "degradation_ratios", "error_accumulation", "error_table", "gan_table", "ladder_rows", "ratio_table", "read_csv",
           "row_order", "write_csv"]
