"""The configurations of a comparison: the engine's shared settings, and the class and text demos on top.

``ComparisonConfig`` holds what every comparison has: the recording (counts, S, the teacher's solver and
guidance), one training budget for every variant, the training seeds, evaluation sizes and where it all
goes. ``CompareConfig`` (class-conditional: ``ardistill demo`` / ``sweep``) adds the benchmark and the GAN
stage; ``T2IConfig`` (``ardistill demo --task t2i``) adds the caption sets and the extra student step counts.
Each is saved as config.json in ``out``; the presets of the demos live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ardistill.comparison.benchmarks import BENCHMARKS, DIGIT_PAIRS, get_benchmark
from ardistill.training.config_checks import ConfigDict, check_at_least


@dataclass(frozen=True)
class ComparisonConfig(ConfigDict):
    """What every comparison sets: recording, the training budget of every variant, evaluation."""

    out: str = "runs/demo"
    teacher: str | None = None  # None = the benchmark's shipped teacher
    # recording (teacher DDIM-25, guidance 1.5, S = 4 on the public code's grid)
    train_count: int = 2048
    eval_count: int = 1000
    num_steps: int = 4
    teacher_steps: int = 25
    grid: str = "ard"
    solver: str = "ddim"
    cfg_scale: float = 1.5
    record_batch: int = 256
    # training: the same budget for every variant
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 20
    ema_decay: float = 0.999
    ema_warmup: bool = True  # short runs: decay min(ema_decay, (1+n)/(10+n)), else the EMA stays near the init
    seeds: tuple[int, ...] = (0,)
    student: dict = field(default_factory=dict)  # DistillConfig fields shared by all variants
    # a folder shared by several comparisons (the sweep): students are kept by a hash of their training
    # settings, so a variant that appears on several axes (the baseline) is trained once
    student_cache: str | None = None
    # evaluation
    latency_batch: int = 64
    latency_repeats: int = 5
    grid_columns: int = 10
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        check_at_least(self, 1, ("train_count", "eval_count", "num_steps", "teacher_steps", "steps", "batch_size",
                                 "record_batch", "latency_batch", "latency_repeats", "grid_columns"))
        if not self.seeds:
            raise ValueError(f"{type(self).__name__}.seeds must name at least one training seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{type(self).__name__}.seeds has repeats: {self.seeds}")

    @property
    def all_steps(self) -> tuple[int, ...]:
        """The student step counts S, each with its own recordings (the first is ``num_steps``)."""
        return (self.num_steps,)

    @property
    def bench(self):
        """The benchmark the comparison evaluates against: its shipped teacher, data and feature network."""
        raise NotImplementedError

    @property
    def teacher_path(self) -> Path:
        return self.bench.teacher_path() if self.teacher is None else Path(self.teacher)


@dataclass(frozen=True)
class CompareConfig(ComparisonConfig):
    """A class-conditional comparison (``ardistill demo``, ``ardistill sweep``) on one benchmark."""

    benchmark: str = "digits"  # a key of BENCHMARKS: its shipped teacher, feature network and real images
    # benchmark "folder", your own data: the teacher's training images and held-out images (ImageNet-layout
    # folders, the same classes) and a classifier trained on them (ardistill train-classifier --data FOLDER)
    real_train: str | None = None
    real_heldout: str | None = None
    classifier: str | None = None
    gan: dict = field(default_factory=dict)  # GANConfig fields over the digits' GAN settings (the --gan rows)

    def __post_init__(self):
        super().__post_init__()
        from ardistill.training.finetune_gan import GANConfig
        bad = set(self.gan) - ({f.name for f in fields(GANConfig)} - {"student", "recording", "teacher", "run_dir",
                                                                          "real", "seed", "device", "progress"})
        if bad:
            raise ValueError(f"CompareConfig.gan: {sorted(bad)} are not GAN settings a comparison may change")
        own = {k: getattr(self, k) for k in ("real_train", "real_heldout", "classifier")}
        if self.benchmark == "folder":
            missing = [k for k, v in own.items() if v is None] + (["teacher"] if self.teacher is None else [])
            if missing:
                raise ValueError(f"CompareConfig: benchmark 'folder' (your own data) needs {', '.join(missing)}")
        elif self.benchmark not in BENCHMARKS:
            raise ValueError(f"CompareConfig.benchmark: unknown {self.benchmark!r}; choose from "
                             f"{sorted(BENCHMARKS) + ['folder']}")
        elif any(v is not None for v in own.values()):
            raise ValueError(f"CompareConfig: real_train / real_heldout / classifier are for benchmark 'folder', "
                             f"not {self.benchmark!r}")

    @property
    def bench(self):
        return get_benchmark(self)


@dataclass(frozen=True)
class T2IConfig(ComparisonConfig):
    """A text-to-image comparison on the two-digit benchmark (``ardistill demo --task t2i``)."""

    out: str = "runs/t2i"
    train_count: int = 768  # training trajectories (captions cycle)
    eval_count: int = 160  # captions (= trajectories) per evaluation set
    cfg_scale: float = 3.0
    steps: int = 250
    batch_size: int = 32
    latency_repeats: int = 3
    grid_columns: int = 8
    train_prompts: int = 512  # training captions (seen pairs), each encoded once
    real_count: int = 1000  # real held-out pairs per set: the FD / precision / recall reference
    extra_steps: tuple[int, ...] = (3,)  # more student step counts, each with its own recording
    extra_step_distillation: bool = False  # also a step-distillation student at every extra S (else ARD only)
    history_layers: int | None = None  # ARD's N_h (None: 6/28 of the depth, at least 1)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "extra_steps", tuple(int(s) for s in self.extra_steps))
        check_at_least(self, 1, ("train_prompts", "real_count"))
        if any(s < 1 for s in self.extra_steps) or self.num_steps in self.extra_steps:
            raise ValueError(f"T2IConfig.extra_steps must be step counts >= 1 other than num_steps, got {self.extra_steps}")

    @property
    def all_steps(self) -> tuple[int, ...]:
        return (self.num_steps, *self.extra_steps)

    @property
    def bench(self):
        return DIGIT_PAIRS


# Named presets of ``ardistill demo``. "quick" fits 10 minutes on a 2-core CPU; "full" is the
# documented comparison in docs/results.md (longer training, three training seeds).
DEMO_PRESETS: dict[str, dict] = {
    "quick": dict(),
    "full": dict(out="runs/full", train_count=8192, eval_count=2000, steps=3000, seeds=(0, 1, 2)),
}
# ``ardistill demo --benchmark photos`` (docs/photos.md): the harder benchmark, where step
# distillation degrades visibly. "full" is the benchmark setting chosen by the regime study (S = 4,
# 300 steps x batch 64 on 1024 trajectories: step distillation's FD exceeds the teacher's by 36 seed
# standard deviations), three seeds; "quick" is a smaller budget sized for 10 minutes on a 2-core CPU.
PHOTOS_PRESETS: dict[str, dict] = {
    "quick": dict(benchmark="photos", out="runs/demo-photos", train_count=512, eval_count=300, steps=200),
    "full": dict(benchmark="photos", out="runs/full-photos", train_count=1024, eval_count=500, steps=300,
                 seeds=(0, 1, 2)),
}
# ``ardistill demo --benchmark folder``: your own data; the digits' budgets (a start: size them to your data)
FOLDER_PRESETS: dict[str, dict] = {
    "quick": dict(benchmark="folder", out="runs/demo-folder"),
    "full": dict(DEMO_PRESETS["full"], benchmark="folder", out="runs/full-folder"),
}
BENCHMARK_PRESETS: dict[str, dict[str, dict]] = {"digits": DEMO_PRESETS, "photos": PHOTOS_PRESETS,
                                                 "folder": FOLDER_PRESETS}

# "quick" is sized for 10 minutes on a 2-core CPU (a text teacher step costs about 3x a digits-teacher
# step: twice the tokens plus cross-attention); "full" is the three-seed comparison of docs/t2i.md.
T2I_PRESETS: dict[str, dict] = {
    "quick": dict(),
    "full": dict(out="runs/t2i-full", train_count=2048, eval_count=300, steps=500, seeds=(0, 1, 2),
                 extra_step_distillation=True),
}


def t2i_config(preset: str, options: dict, student: dict | None = None, progress: bool = True) -> T2IConfig:
    """A preset with the options that are not None on top (``student``: DistillConfig fields for every variant)."""
    if preset not in T2I_PRESETS:
        raise ValueError(f"unknown t2i preset {preset!r}; choose from {sorted(T2I_PRESETS)}")
    kw = dict(T2I_PRESETS[preset])
    kw.update({k: v for k, v in options.items() if v is not None})
    if "num_steps" in kw:  # the main S is never repeated among the extra ones
        kw["extra_steps"] = tuple(S for S in kw.get("extra_steps", T2IConfig.extra_steps) if S != kw["num_steps"])
    extra = {k: v for k, v in (student or {}).items() if v is not None}
    if extra:
        kw["student"] = {**kw.get("student", {}), **extra}
    return T2IConfig(**kw, progress=progress)
