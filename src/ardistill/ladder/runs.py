"""A ladder's runs: its recordings, one training run per (student, seed), each trained rung by rung."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from ardistill.comparison.variants import slug
from ardistill.io.fileio import atomic_write_bytes, atomic_write_json, read_json
from ardistill.ladder.config import LADDER_STUDENTS, RUNTIME_SETTINGS, LadderConfig


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


def ladder_runs(cfg: LadderConfig) -> list[LadderRun]:
    """The runs of a ladder, in the order of ``cfg.students``."""
    return [LadderRun(name, seed, Path(cfg.out) / "runs" / f"{slug(name)}-seed{seed}")
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
        keep = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_SETTINGS}
        if {k: v for k, v in old.items() if k not in RUNTIME_SETTINGS} != keep:
            raise ValueError(f"{saved}: this ladder was started with other settings; use another --out or the "
                             f"same settings (changed: {sorted(k for k in keep if old.get(k) != keep[k])})")
    atomic_write_json(saved, cfg.to_dict())
    path = recordings(cfg)[0 if split == "train" else 1]
    record(load_any_teacher(cfg.teacher_path), path, record_config(cfg, split), device=cfg.device,
           progress=progress)
    return path


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
