"""The ladder's GAN stage at the longest budget (issue 23, part 3): ARD (R+G) against its regression control.

Each (base student, seed) of ``LadderConfig.gan_students`` starts from its EMA weights at the rung
``gan_base_steps`` (R) and is fine-tuned ``gan_steps`` (G) more steps by ``finetune_gan`` (regression +
hinge GAN against the frozen-teacher discriminator, docs/gan.md), once per factor of ``gan_factors``,
and once with factor 0: the *control*, the same G steps of regression only, with the same learning
rate, EMA, data order and seed, so that a GAN row minus its control is the GAN's effect alone.

The paper's proportions: the GAN weight is 0 for the first ``gan_warmup`` x R steps (the paper: 3000
of 300k, 1%), then adaptive (factor x |grad L_reg| / |grad L_G| at the last head's weight); G lr 1e-4,
D lr 1e-3, AdamW. What is discriminated: the final output, teacher-forced (the settings docs/gan.md
measured best on digits and photos), noised to t ~ U(0, 0.25) of the time range before the frozen
teacher sees it. Each arm's row is at R + G steps, named ``<student>, GAN (factor f)`` or
``<student>, GAN control``; its wall time is the base run's to R plus the arm's own.

An arm's folder (``runs/<student>-seed<s>-from<R>-gan<f>`` or ``...-control``) keeps its settings in
``arm.json``; a later invocation with other GAN settings is refused there, not mixed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ardistill.io.fileio import atomic_write_bytes, atomic_write_json, read_json
from ardistill.ladder.config import LadderConfig
from ardistill.ladder.evaluation import Evaluator, training_seconds
from ardistill.comparison.variants import slug
from ardistill.ladder.runs import LadderRun, recordings

CONTROL_FACTOR = 0.0
# what is discriminated and how the discriminator sees it (docs/gan.md's photos and digits settings)
GAN_DESIGN = dict(fakes="forced", gan_steps="last", feature_noise=(0.0, 0.25))
# arm.json keys that may differ between invocations (where it runs, how often it saves)
_ARM_RUNTIME = ("device", "ckpt_every", "progress", "tensorboard", "log_every", "verify_shards")


# a table row's student name: base student, optional ``, S=n`` (ladder config row_name), optional GAN arm
_ROW_NAME = re.compile(r"(?P<base>.*?)(?P<s>, S=\d+)?(?P<gan>, GAN control|, GAN \(factor (?P<factor>[^)]+)\))?")


@dataclass(frozen=True)
class RowName:
    """A row's student name taken apart: ``<base>[, S=n][, GAN control | , GAN (factor f)]``."""

    base: str
    sizes: str  # ", S=n" or ""
    gan: bool
    factor: float | None  # None: a regression row or a control

    @property
    def is_control(self) -> bool:
        return self.gan and self.factor is None


def parse_row_name(name: str) -> RowName:
    """Inverse of ``GANArm.name`` / ``LadderConfig.row_name`` for the table's readers."""
    m = _ROW_NAME.fullmatch(name)
    return RowName(m["base"], m["s"] or "", bool(m["gan"]), None if m["factor"] is None else float(m["factor"]))


@dataclass(frozen=True)
class GANArm:
    """One GAN fine-tuning run (or its control) from one base run's rung."""

    base: LadderRun
    factor: float  # 0 = the regression-only control
    start: int  # the base rung R
    steps: int  # the fine-tuning steps G
    run_dir: Path

    @property
    def is_control(self) -> bool:
        return self.factor == CONTROL_FACTOR

    @property
    def total_steps(self) -> int:
        return self.start + self.steps

    def name(self, cfg: LadderConfig) -> str:
        base = cfg.row_name(self.base.student)
        return f"{base}, GAN control" if self.is_control else f"{base}, GAN (factor {self.factor:g})"

    def as_run(self, cfg: LadderConfig) -> LadderRun:
        """The arm as a run of the table: its row is at ``total_steps``."""
        return LadderRun(self.name(cfg), self.base.seed, self.run_dir)


def gan_arms(cfg: LadderConfig) -> list[GANArm]:
    """The GAN stage's runs: per base (student, seed), the control first, then the factors in order."""
    if not cfg.gan_factors:
        return []
    R = cfg.gan_base_steps
    arms = []
    for student, seeds in cfg.gan_students.items():
        for seed in seeds:
            base = LadderRun(student, seed, Path(cfg.out) / "runs" / f"{slug(student)}-seed{seed}")
            for f in (CONTROL_FACTOR, *cfg.gan_factors):
                tag = "control" if f == CONTROL_FACTOR else "gan" + f"{f:g}".replace(".", "p")
                arms.append(GANArm(base, f, R, cfg.gan_steps, base.run_dir.parent / f"{base.run_dir.name}-from{R}-{tag}"))
    return arms


def gan_config(cfg: LadderConfig, arm: GANArm):
    """The GANConfig of one arm."""
    from ardistill.comparison.benchmarks import BENCHMARKS
    from ardistill.training.finetune_gan import GANConfig
    train_rec, _ = recordings(cfg)
    return GANConfig(student=str(arm.base.rung_weights(arm.start)), recording=str(train_rec),
                     teacher=str(cfg.teacher_path), run_dir=str(arm.run_dir), real=BENCHMARKS[cfg.benchmark].gan_real,
                     gan_factor=arm.factor, gan_warmup=round(cfg.gan_warmup * arm.start), steps=arm.steps,
                     batch_size=cfg.batch_size, lr=cfg.gan_lr, d_lr=cfg.gan_d_lr, ema_decay=cfg.ema_decay,
                     ema_warmup=cfg.ema_warmup, seed=arm.base.seed, device=cfg.device, precision=cfg.precision,
                     ckpt_every=cfg.ckpt_every, log_every=50, tensorboard=False, progress=False, **GAN_DESIGN)


def _check_arm_settings(arm: GANArm, settings: dict) -> None:
    path = arm.run_dir / "arm.json"
    if path.is_file():
        old = read_json(path, "ladder GAN arm settings")
        changed = sorted(k for k in set(old) | set(settings) if k not in _ARM_RUNTIME and old.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{path}: this GAN run was started with other settings (changed: {changed}); use "
                             "another --out, or the same GAN settings")
    else:
        atomic_write_json(path, settings)


def train_arm(cfg: LadderConfig, arm: GANArm) -> Path:
    """Fine-tune one arm (resuming) and keep its EMA weights at ``total_steps``; returns their path."""
    from ardistill.training.finetune_gan import finetune_gan
    run = arm.as_run(cfg)
    weights = run.rung_weights(arm.total_steps)
    if weights.is_file():
        return weights
    start = arm.base.rung_weights(arm.start)
    if not start.is_file():
        raise ValueError(f"{start}: the base run {arm.base.run_dir.name} has not reached rung {arm.start} yet; "
                         "the GAN stage starts from it")
    gcfg = gan_config(cfg, arm)
    arm.run_dir.mkdir(parents=True, exist_ok=True)
    _check_arm_settings(arm, {k: (list(v) if isinstance(v, tuple) else v) for k, v in gcfg.to_dict().items()})
    result = finetune_gan(gcfg, resume=True)
    if result.step != arm.steps:
        raise RuntimeError(f"{arm.run_dir}: the GAN run stopped at step {result.step} of {arm.steps}")
    atomic_write_bytes(weights, Path(result.ema_path).read_bytes())
    return weights


def run_arm(cfg: LadderConfig, arm: GANArm, evaluator: Evaluator | None = None) -> dict:
    """One job: fine-tune ``arm``, evaluate it at R + G, save the row beside the weights (idempotent)."""
    run = arm.as_run(cfg)
    path = run.rung_json(arm.total_steps)
    if path.is_file():
        return read_json(path, "ladder GAN row")
    train_arm(cfg, arm)
    wall = training_seconds(arm.base.run_dir, arm.start, cfg.batch_size) + \
        training_seconds(arm.run_dir, arm.steps, cfg.batch_size)
    row = (evaluator or Evaluator(cfg)).student_row(run, arm.total_steps, wall_s=wall, name=arm.name(cfg))
    atomic_write_json(path, row)
    return row
