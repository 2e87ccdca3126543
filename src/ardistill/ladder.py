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
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ardistill.io.fileio import atomic_write_bytes, atomic_write_json, read_json

# The students of the ladder, named as in the photos study; DistillConfig overrides.
LADDER_STUDENTS: dict[str, dict] = {
    "step distillation": {"history_layers": 0},
    "ARD (N_h = 1)": {"history_layers": 1},
    "step distillation, per-step heads": {"history_layers": 0, "heads": "per_step"},
    "ARD (N_h = 1), per-step heads": {"history_layers": 1, "heads": "per_step"},
}
TEACHER_ROW = "teacher"
CSV_FIELDS = ("teacher", "student", "seed", "steps", "fd", "fd_to_teacher", "precision", "recall", "mse_free",
              "mse_forced", "mse_free_train", "mse_forced_train", "wall_s", "commit")


@dataclass(frozen=True)
class LadderConfig:
    """One ladder: one teacher, its recordings, the students and seeds, the rungs, the training recipe."""

    out: str  # this ladder's folder: recordings/, runs/, teacher_eval.json
    teacher_name: str  # the CSV's ``teacher`` column, e.g. "DiT-photos-S"
    teacher: str | None = None  # None = the shipped photos teacher
    benchmark: str = "photos"
    rungs: tuple[int, ...] = (300, 1000, 3000, 10000)
    # student name (a key of LADDER_STUDENTS) -> training seeds
    students: dict = field(default_factory=lambda: {"step distillation": [0, 1], "ARD (N_h = 1)": [0, 1],
                                                    "step distillation, per-step heads": [0],
                                                    "ARD (N_h = 1), per-step heads": [0]})
    # recordings: the photos study's settings (DDIM-25, guidance 1.5, S on the ARD grid); the eval
    # recording is the study's (same seeds), the training one is larger so long runs do not memorise it
    train_count: int = 16384
    eval_count: int = 500
    train_eval_count: int = 500  # training trajectories on which the overfitting check is measured
    num_steps: int = 4
    teacher_steps: int = 25
    grid: str = "ard"
    solver: str = "ddim"
    cfg_scale: float = 1.5
    # training: the study's recipe, with a schedule independent of the budget
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    ema_warmup: bool = True
    ckpt_every: int = 250
    compile: bool = False  # torch.compile the training forward (runtime only: equal within float32 rounding)
    device: str = "cpu"  # "cpu" or "cuda": where recording, training and evaluation run
    precision: str = "fp32"  # DistillConfig.precision; fp32 (TF32 matmuls on CUDA) keeps GPU rows comparable

    def __post_init__(self):
        rungs = tuple(int(r) for r in self.rungs)
        object.__setattr__(self, "rungs", rungs)
        object.__setattr__(self, "students", {k: [int(s) for s in v] for k, v in dict(self.students).items()})
        if not rungs or list(rungs) != sorted(set(rungs)) or rungs[0] < 1:
            raise ValueError(f"LadderConfig.rungs must be increasing positive step counts, got {list(rungs)}")
        unknown = set(self.students) - set(LADDER_STUDENTS)
        if unknown:
            raise ValueError(f"LadderConfig.students: unknown {sorted(unknown)}; choose from {list(LADDER_STUDENTS)}")
        for name, seeds in self.students.items():
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"LadderConfig.students[{name!r}] must list distinct seeds, got {seeds}")
        for name in ("train_count", "eval_count", "train_eval_count", "num_steps", "teacher_steps", "batch_size",
                     "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LadderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_eval_count > self.train_count:
            raise ValueError(f"LadderConfig.train_eval_count {self.train_eval_count} exceeds train_count "
                             f"{self.train_count}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"LadderConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.warmup_steps >= rungs[0]:
            raise ValueError(f"LadderConfig.warmup_steps {self.warmup_steps} must end before the first rung {rungs[0]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rungs"] = list(self.rungs)
        return d

    @property
    def teacher_path(self) -> Path:
        if self.teacher is not None:
            return Path(self.teacher).expanduser().resolve()
        from ardistill.comparison.benchmarks import BENCHMARKS
        return BENCHMARKS[self.benchmark].teacher_path()


@dataclass(frozen=True)
class LadderRun:
    """One (student, seed) of a ladder: one training run, evaluated at every rung."""

    student: str
    seed: int
    run_dir: Path

    def rung_json(self, steps: int) -> Path:
        return self.run_dir / "rungs" / f"step_{steps:08d}.json"

    def rung_weights(self, steps: int) -> Path:
        return self.run_dir / "rungs" / f"step_{steps:08d}.safetensors"


def _slug(name: str) -> str:
    from ardistill.comparison.variants import slug
    return slug(name)


def ladder_runs(cfg: LadderConfig) -> list[LadderRun]:
    """The runs of a ladder, in the order of ``cfg.students``."""
    return [LadderRun(name, seed, Path(cfg.out) / "runs" / f"{_slug(name)}-seed{seed}")
            for name, seeds in cfg.students.items() for seed in seeds]


def recordings(cfg: LadderConfig) -> tuple[Path, Path]:
    """The training and evaluation recording folders (``prepare`` writes them)."""
    return Path(cfg.out) / "recordings" / "train", Path(cfg.out) / "recordings" / "eval"


def record_config(cfg: LadderConfig, split: str):
    """RecordConfig of one recording: the photos study's settings and seeds (train from 0, eval from 1e9)."""
    from ardistill.data.record import RecordConfig
    count, base_seed = {"train": (cfg.train_count, 0), "eval": (cfg.eval_count, 1_000_000_000)}[split]
    return RecordConfig(count=count, base_seed=base_seed, shard_size=1024, num_steps=cfg.num_steps,
                        teacher_steps=cfg.teacher_steps, grid=cfg.grid, solver=cfg.solver, cfg_scale=cfg.cfg_scale,
                        batch_size=256, dtype="float32")


def prepare(cfg: LadderConfig, split: str, progress: bool = False) -> Path:
    """Record (or finish, or check) one of the ladder's recordings; saves the ladder's config beside them."""
    from ardistill.data.record import record
    from ardistill.io.checkpoints import load_any_teacher
    out = Path(cfg.out)
    saved = out / "ladder.json"
    if saved.is_file():
        old = read_json(saved, "ladder config")
        # a setting added after this ladder was started is absent from its file: it ran with the default
        old = {**{f.name: f.default for f in fields(LadderConfig) if f.default is not MISSING}, **old}
        keep = {k: v for k, v in cfg.to_dict().items() if k not in _RUNTIME}
        if {k: v for k, v in old.items() if k not in _RUNTIME} != keep:
            raise ValueError(f"{saved}: this ladder was started with other settings; use another --out or the "
                             f"same settings (changed: {sorted(k for k in keep if old.get(k) != keep[k])})")
    atomic_write_json(saved, cfg.to_dict())
    path = recordings(cfg)[0 if split == "train" else 1]
    record(load_any_teacher(cfg.teacher_path), path, record_config(cfg, split), device=cfg.device,
           progress=progress)
    return path


# settings that may differ between invocations of the same ladder (more rungs, students or seeds later)
_RUNTIME = ("rungs", "students", "ckpt_every", "compile", "out", "device")


def distill_config(cfg: LadderConfig, run: LadderRun, steps: int):
    """The DistillConfig of ``run`` trained to ``steps`` (only ``steps`` differs between rungs)."""
    from ardistill.training.distill import DistillConfig
    train_rec, _ = recordings(cfg)
    return DistillConfig(recording=str(train_rec), teacher=str(cfg.teacher_path), run_dir=str(run.run_dir),
                         steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup, seed=run.seed, device=cfg.device,
                         precision=cfg.precision,
                         ckpt_every=cfg.ckpt_every, log_every=50, tensorboard=False, progress=False,
                         compile=cfg.compile, **LADDER_STUDENTS[run.student])


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


def train_to(cfg: LadderConfig, run: LadderRun, steps: int) -> Path:
    """Train ``run`` to ``steps`` (resuming) and keep its EMA weights at that budget; returns their path."""
    from ardistill.training.distill import distill
    from ardistill.training.checkpointer import Checkpointer
    weights = run.rung_weights(steps)
    if weights.is_file():
        return weights
    point = Checkpointer(run.run_dir / "checkpoints").resume_point()
    if point is not None and int(point[1]["step"]) > steps:
        raise ValueError(f"{run.run_dir} is at step {point[1]['step']}, past the rung {steps} whose weights "
                         f"({weights.name}) are missing; rungs must be trained in increasing order")
    distill(distill_config(cfg, run, steps), resume=True)
    data = (run.run_dir / "ema.safetensors").read_bytes()  # the final weights of a run of ``steps`` steps
    atomic_write_bytes(weights, data)
    return weights


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

    def student_row(self, run: LadderRun, steps: int) -> dict:
        from ardistill.evaluation.evaluate import image_metrics, run_sampler, trajectory_errors
        from ardistill.io.student_io import load_student
        dev = self.cfg.device  # the student samples there; features and metrics stay on the CPU
        student = load_student(run.rung_weights(steps), device=dev)
        samples = run_sampler(student.sample, self.ev.noise, self.ev.labels, device=dev)
        m = image_metrics(samples, self.real, self.net, teacher_features=self.teacher_features)
        held = trajectory_errors(student, self.ev, device=dev)
        train = trajectory_errors(student, self.train, device=dev)
        fmt = lambda v: " ".join(f"{x:.6g}" for x in v)
        return {"teacher": self.cfg.teacher_name, "student": run.student, "seed": run.seed, "steps": steps,
                "fd": m.fd, "fd_to_teacher": m.fd_teacher, "precision": m.precision, "recall": m.recall,
                "mse_free": fmt(held["free_running"]), "mse_forced": fmt(held["teacher_forced"]),
                "mse_free_train": fmt(train["free_running"]), "mse_forced_train": fmt(train["teacher_forced"]),
                "wall_s": round(training_seconds(run.run_dir, steps, self.cfg.batch_size), 1), "commit": code_commit()}


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


def ladder_rows(cfgs: list[LadderConfig]) -> list[dict]:
    """Every evaluated row of the ladders (teacher rows first), sorted by teacher, student, seed, steps."""
    rows = []
    for cfg in cfgs:
        t = Path(cfg.out) / "teacher_eval.json"
        if t.is_file():
            rows.append(read_json(t, "ladder teacher evaluation"))
        for run in ladder_runs(cfg):
            for p in sorted((run.run_dir / "rungs").glob("step_*.json")):
                rows.append(read_json(p, "ladder rung"))
    order = {name: i for i, name in enumerate([TEACHER_ROW, *LADDER_STUDENTS])}
    rows.sort(key=lambda r: (r["teacher"], order.get(r["student"], 99), r["student"], str(r["seed"]), int(r["steps"])))
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The ladder table (CSV_FIELDS), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ analysis

def degradation_ratios(rows: list[dict], sd: str = "step distillation", ard: str = "ARD (N_h = 1)") -> list[dict]:
    """The paper's FD-degradation ratio (FD_SD - FD_teacher) / (FD_ARD - FD_teacher) at every budget.

    Per teacher and budget where both students have rows: the ratio of the seed means, and the range
    over the per-seed ratios (seeds paired by number); the same with FD to the teacher's own samples.
    """
    out = []
    teachers = sorted({r["teacher"] for r in rows})
    for t in teachers:
        trow = [r for r in rows if r["teacher"] == t and r["student"] == TEACHER_ROW]
        if not trow:
            continue
        tfd = float(trow[0]["fd"])
        steps = sorted({int(r["steps"]) for r in rows if r["teacher"] == t and r["student"] in (sd, ard)})
        for n in steps:
            a = {str(r["seed"]): r for r in rows if r["teacher"] == t and r["student"] == sd and int(r["steps"]) == n}
            b = {str(r["seed"]): r for r in rows if r["teacher"] == t and r["student"] == ard and int(r["steps"]) == n}
            if not a or not b:
                continue
            fa = np.array([float(r["fd"]) for r in a.values()])
            fb = np.array([float(r["fd"]) for r in b.values()])
            ta = np.array([float(r["fd_to_teacher"]) for r in a.values()])
            tb = np.array([float(r["fd_to_teacher"]) for r in b.values()])
            per_seed = [(float(a[s]["fd"]) - tfd) / (float(b[s]["fd"]) - tfd) for s in sorted(set(a) & set(b))
                        if float(b[s]["fd"]) > tfd]
            per_seed_t = [float(a[s]["fd_to_teacher"]) / float(b[s]["fd_to_teacher"]) for s in sorted(set(a) & set(b))]
            ex_a, ex_b = fa.mean() - tfd, fb.mean() - tfd
            out.append({"teacher": t, "steps": n, "teacher_fd": tfd, "sd_fd": fa.mean(), "sd_fd_std": _std(fa),
                        "ard_fd": fb.mean(), "ard_fd_std": _std(fb), "sd_fd_to_teacher": ta.mean(),
                        "ard_fd_to_teacher": tb.mean(), "sd_fd_to_teacher_std": _std(ta),
                        "ard_fd_to_teacher_std": _std(tb),
                        "ratio": ex_a / ex_b if ex_b > 0 else math.inf,
                        "ratio_range": (min(per_seed), max(per_seed)) if per_seed else (math.nan, math.nan),
                        "ratio_to_teacher": ta.mean() / tb.mean() if tb.mean() > 0 else math.inf,
                        "ratio_to_teacher_range": (min(per_seed_t), max(per_seed_t)) if per_seed_t else (math.nan, math.nan),
                        "seeds": len(set(a) & set(b)),
                        "sd_excess_over_std": ex_a / _std(fa) if _std(fa) > 0 else math.nan})
    return out


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


PAIRS = (("step distillation", "ARD (N_h = 1)"),
         ("step distillation, per-step heads", "ARD (N_h = 1), per-step heads"))


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per teacher, pair (shared heads; per-step heads) and budget, both students' FD and FD to
    teacher (mean ± seed std), the paper's FD-degradation ratio and the FD-to-teacher ratio (per-seed ranges)."""
    lines = ["| teacher | heads | steps | teacher FD | SD FD | ARD FD | SD FD to teacher | ARD FD to teacher | "
             "FD-degradation ratio (per-seed range) | FD-to-teacher ratio (range) | seeds | SD excess / SD std |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sd, ard in PAIRS:
        heads = "per-step" if "per-step" in sd else "shared"
        for d in degradation_ratios(rows, sd, ard):
            lines.append(
                f"| {d['teacher']} | {heads} | {d['steps']} | {d['teacher_fd']:.1f} | {d['sd_fd']:.1f} ± {d['sd_fd_std']:.1f} | "
                f"{d['ard_fd']:.1f} ± {d['ard_fd_std']:.1f} | {d['sd_fd_to_teacher']:.1f} ± {d['sd_fd_to_teacher_std']:.1f} | "
                f"{d['ard_fd_to_teacher']:.1f} ± {d['ard_fd_to_teacher_std']:.1f} | {d['ratio']:.2f} "
                f"({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f}) | {d['ratio_to_teacher']:.2f} "
                f"({d['ratio_to_teacher_range'][0]:.2f}-{d['ratio_to_teacher_range'][1]:.2f}) | {d['seeds']} | "
                f"{'-' if math.isnan(d['sd_excess_over_std']) else format(d['sd_excess_over_std'], '.0f')} |")
    return "\n".join(lines)


def plot_ladder(rows: list[dict], path: str | Path) -> Path:
    """FD to teacher vs training steps (log x), one panel per teacher, one line per student: the seed
    mean, with the seeds' range shaded (students with one seed show their points only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    teachers = sorted({r["teacher"] for r in rows})
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.2 * len(teachers), 4), squeeze=False)
    styles = {"step distillation": ("tab:blue", "-"), "ARD (N_h = 1)": ("tab:red", "-"),
              "step distillation, per-step heads": ("tab:blue", "--"), "ARD (N_h = 1), per-step heads": ("tab:red", "--")}
    for ax, t in zip(axes[0], teachers):
        students = [s for s in dict.fromkeys(r["student"] for r in rows if r["teacher"] == t) if s != TEACHER_ROW]
        for s in students:
            rs = [r for r in rows if r["teacher"] == t and r["student"] == s]
            steps = sorted({int(r["steps"]) for r in rs})
            vals = [[float(r["fd_to_teacher"]) for r in rs if int(r["steps"]) == n] for n in steps]
            mean = [float(np.mean(v)) for v in vals]
            color, ls = styles.get(s, (None, ":"))
            n = max(len(v) for v in vals)
            ax.plot(steps, mean, ls, marker="o", ms=3, color=color, label=f"{s} ({n} seed{'s' if n > 1 else ''})")
            if n > 1:  # the seeds' range: a band between rungs, a bar at each rung
                lo, hi = [min(v) for v in vals], [max(v) for v in vals]
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
                ax.errorbar(steps, mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]],
                            fmt="none", ecolor=color, capsize=3, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training steps (batch 64)")
        ax.set_ylabel("FD to the teacher's samples (same noise)")
        ax.set_title(f"teacher {t}, S = 4")
        ax.grid(True, which="both", alpha=0.3)
        if students:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
