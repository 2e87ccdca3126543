"""The ladder's settings (``LadderConfig``), its students and the table's columns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    # the GAN stage at the longest budget (issue 23, part 3; ladder/gan.py): each (base student, seed) of
    # ``gan_students`` is fine-tuned from its EMA weights at rung ``gan_from`` (0 = the last rung) for
    # ``gan_steps`` steps with regression + hinge GAN at every factor of ``gan_factors``, and once with
    # factor 0, its regression-only control of the same length; () = no GAN stage
    gan_factors: tuple[float, ...] = ()
    gan_students: dict = field(default_factory=lambda: {"step distillation": [0], "ARD (N_h = 1)": [0]})
    gan_from: int = 0
    gan_steps: int = 1000
    gan_warmup: float = 0.01  # GAN-free warm-up as a fraction of the base run's steps (the paper: 3000 of 300k)
    gan_lr: float = 1e-4  # generator (the paper's); the control trains at the same rate
    gan_d_lr: float = 1e-3  # discriminator (the paper's)

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
        object.__setattr__(self, "gan_factors", tuple(float(f) for f in self.gan_factors))
        object.__setattr__(self, "gan_students", {k: [int(s) for s in v] for k, v in dict(self.gan_students).items()})
        if any(not f > 0 or not math.isfinite(f) for f in self.gan_factors) or \
                len(set(self.gan_factors)) != len(self.gan_factors):
            raise ValueError(f"LadderConfig.gan_factors must be distinct positive numbers (the control, factor 0, "
                             f"is always run), got {list(self.gan_factors)}")
        for name, seeds in (self.gan_students if self.gan_factors else {}).items():
            if name not in self.students or not set(seeds) <= set(self.students[name]):
                raise ValueError(f"LadderConfig.gan_students[{name!r}] = {seeds}: the GAN stage starts from the "
                                 f"ladder's own runs; students and seeds: {self.students}")
        if self.gan_from and self.gan_from not in rungs:
            raise ValueError(f"LadderConfig.gan_from {self.gan_from} is not a rung of {list(rungs)} (0 = the last)")
        if self.gan_steps < 1 or not 0 <= self.gan_warmup < 1:
            raise ValueError(f"LadderConfig: gan_steps must be >= 1 and gan_warmup a fraction in [0, 1), got "
                             f"{self.gan_steps} and {self.gan_warmup}")
        if self.warmup_steps >= rungs[0]:
            raise ValueError(f"LadderConfig.warmup_steps {self.warmup_steps} must end before the first rung {rungs[0]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rungs"] = list(self.rungs)
        d["gan_factors"] = list(self.gan_factors)
        return d

    @property
    def gan_base_steps(self) -> int:
        """The rung the GAN stage starts from."""
        return self.gan_from or self.rungs[-1]

    def row_name(self, student: str) -> str:
        """A student's name in the table: ``S=n`` is added when the ladder does not sample in 4 steps."""
        return student if self.num_steps == 4 else f"{student}, S={self.num_steps}"

    @property
    def teacher_path(self) -> Path:
        if self.teacher is not None:
            return Path(self.teacher).expanduser().resolve()
        from ardistill.comparison.benchmarks import BENCHMARKS
        return BENCHMARKS[self.benchmark].teacher_path()


# settings that may differ between invocations of the same ladder (more rungs, students or seeds later; the
# GAN stage's settings are checked per GAN run, in its own folder)
RUNTIME_SETTINGS = ("rungs", "students", "ckpt_every", "compile", "out", "device", "gan_factors", "gan_students",
                    "gan_from", "gan_steps", "gan_warmup", "gan_lr", "gan_d_lr")
