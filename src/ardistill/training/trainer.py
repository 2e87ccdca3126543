"""What `distill` and `finetune-gan` share: the start of a run, its state, checkpoints and the step loop.

A trainer (``Trainer`` subclass) holds only what is its own: the models and data it builds
(``_build``), one optimizer step (``_train_step``), what it logs (``_account`` / ``_log``) and what its
checkpoints hold besides the common state. The rest is here:

- ``start_run``: the latest checkpoint, the resume rules (only the runtime fields may change), the
  batch split over processes, backends, precision and this rank's seed;
- the student on its device with its EMA copy, wrapped for DDP or sharded with FSDP2;
- checkpoints: the NaN guard on the weights, the common state (step, EMA, data order, RNG, configs),
  single weight files and AdamW state (ddp) or one DCP folder (fsdp), and restoring them;
- the loop: steps, logging and checkpoint cadence, the final weight files beside the checkpoints;
- the entry points' plumbing: process group, ``--resume`` from a run folder alone.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ardistill.io import distributed as dist
from ardistill.io.fileio import atomic_write_json, read_json
from ardistill.io.student_io import read_student_file, save_student
from ardistill.training.checkpointer import Checkpointer
from ardistill.training.data_order import EpochBatches
from ardistill.training.ema import EMA
from ardistill.training.nan_guard import check_finite
from ardistill.training.parallel import (DCP_DIR, DCP_FORMAT, full_state_dict, load_full_state_dict,
                                         load_indexed_optimizer, load_sharded, local, save_sharded, sharded_world,
                                         wrap_parallel)
from ardistill.training.precision import resolve_precision, setup_backends
from ardistill.training.rng_state import capture_rng, restore_rng
from ardistill.training.run_logger import RunLogger, progress


@dataclass
class RunStart:
    """What a trainer needs to begin or continue a run (see ``start_run``)."""

    cfg: object  # the config in force: the saved one (plus runtime fields) when resuming
    ckpt: Checkpointer
    latest: Path | None  # the checkpoint resumed from, or None for a fresh start
    state: dict | None  # its training state
    precision: str


def check_resume_config(saved, cfg, where: Path, runtime_fields: tuple[str, ...]):
    """The saved config with ``cfg``'s runtime fields; any other difference is an error naming the fields."""
    diff = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(saved)
            if f.name not in runtime_fields and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ValueError(f"cannot resume {where} with other settings ({'; '.join(diff)}); "
                         f"only {', '.join(runtime_fields)} may change")
    return replace(saved, **{k: getattr(cfg, k) for k in runtime_fields})


def start_run(cfg, resume: bool, device: torch.device, runtime_fields: tuple[str, ...]) -> RunStart:
    """Shared start of `distill` and `finetune-gan`: find the latest checkpoint, apply the resume
    rules (only ``runtime_fields`` may change), check the batch split over processes, set up
    backends and this rank's seed.
    """
    run_dir = Path(cfg.run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.keep_every)
    latest, state = None, None
    pointer = ckpt.root / "latest.json"
    if pointer.is_file():
        if not resume:
            raise ValueError(f"{run_dir} already holds a run (checkpoint {read_json(pointer, 'checkpoint pointer')['dir']}); "
                             f"pass --resume to continue it or choose another --run-dir")
        latest, state = ckpt.resume_point()  # the newest readable one
        saved = type(cfg).from_dict(state["config"])
        if resolve_precision(saved.precision, device) == resolve_precision(cfg.precision, device):
            cfg = replace(cfg, precision=saved.precision)  # e.g. 'auto' and 'fp32' on a CPU: the same run
        cfg = check_resume_config(saved, cfg, latest, runtime_fields)
    world = dist.world_size()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"{type(cfg).__name__}.batch_size {cfg.batch_size} is not divisible by processes ({world}) "
                         f"x grad_accum ({cfg.grad_accum})")
    precision = resolve_precision(cfg.precision, device)
    setup_backends(device, cfg.deterministic)
    torch.manual_seed(cfg.seed + dist.rank())
    random.seed(cfg.seed + dist.rank())  # nothing draws from it today; seeded so a checkpoint is a function of the run
    return RunStart(cfg=cfg, ckpt=ckpt, latest=latest, state=state, precision=precision)


# ------------------------------------------------------------------------------------------------
# entry points


def resolve_path(path: str) -> str:
    """An absolute path (symlinks resolved), so the saved config does not depend on the working directory."""
    return str(Path(path).expanduser().resolve())


def run_in_process_group(trainer_cls: type["Trainer"], cfg, resume: bool, teacher=None):
    """``trainer_cls(cfg, device, resume, teacher).run()`` in one process or under torchrun (the process group
    is started here if needed, and ended again)."""
    owns_group = not dist.is_distributed()
    device = dist.init(cfg.device)
    try:
        return trainer_cls(cfg, device, resume, teacher).run()
    finally:
        if owns_group:
            dist.cleanup()


def load_run_config(config_cls, run_dir: str | Path, key: str):
    """The config of an existing run (from its latest checkpoint, else ``config.json[key]``)."""
    point = Checkpointer(Path(run_dir) / "checkpoints").resume_point()
    if point is not None:
        return config_cls.from_dict(point[1]["config"])
    return config_cls.from_dict(read_json(Path(run_dir) / "config.json", "run config")[key])


def command_config(config_cls, options: dict, resume: bool, required: tuple[str, ...], key: str):
    """The config of a command line: ``options`` are its fields. With ``resume`` and without ``required[0]``
    (what starts a new run), the settings come from the run folder and ``options`` (runtime fields) apply
    on top; otherwise every ``required`` option must be given."""
    if resume and required[0] not in options:
        if "run_dir" not in options:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        return replace(load_run_config(config_cls, options["run_dir"], key), **options)
    missing = [f"--{k.replace('_', '-')}" for k in required if k not in options]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return config_cls(**options)


# ------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """State of one student-training run; ``run()`` is the loop.

    A subclass builds its models, data and optimizers in ``_build`` (calling ``_train_student`` and
    ``_data_order``), names them in ``_modules`` / ``_optimizers`` / ``_generators``, and implements
    ``_train_step``, ``_account``, ``_log``, ``_state``, ``_run_info`` and ``_result``.
    """

    RUNTIME_FIELDS: tuple[str, ...] = ()  # config fields that may change when a run is resumed
    file_meta: dict = {}  # metadata of every weight file the run writes, besides the step

    def __init__(self, cfg, device: torch.device, resume: bool, teacher=None):
        self.device = device
        self.given_teacher = teacher  # the model at cfg.teacher, already loaded by the caller (None: load it)
        self.run_dir = Path(cfg.run_dir)
        run = start_run(cfg, resume, device, self.RUNTIME_FIELDS)
        self.cfg, self.ckpt, self.last_ckpt, self.precision = run.cfg, run.ckpt, run.latest, run.precision
        self.step = 0
        self._build(run.state)
        if run.state is not None:
            self._restore(run.latest, run.state)
        elif dist.is_main():
            atomic_write_json(self.run_dir / "config.json", self._run_info())
        self.logger = RunLogger(self.run_dir, self.cfg.tensorboard,
                                resume_step=self.step if run.state is not None else None)

    # ---- set-up (called from ``_build``) -------------------------------------------------------
    def _train_student(self, student: torch.nn.Module) -> torch.nn.Module:
        """The student on the device in train mode, with its EMA copy; returns the module forward and
        backward run through (DDP-wrapped, or under fsdp the student and its EMA sharded per block)."""
        cfg = self.cfg
        self.student = student.to(self.device).train()
        self.ema = EMA(self.student, cfg.ema_decay, cfg.ema_warmup)
        self.sharded = sharded_world(cfg.parallel)
        return wrap_parallel(self.student, self.device, cfg.parallel, None, ("sample",), (self.ema.module,))

    def _data_order(self, num_items: int, seed: int) -> EpochBatches:
        """A seeded epoch order of ``num_items`` cut into this rank's micro-batches."""
        cfg = self.cfg
        return EpochBatches(num_items, cfg.batch_size // (dist.world_size() * cfg.grad_accum), cfg.grad_accum, seed)

    # ---- what a trainer implements --------------------------------------------------------------
    def _build(self, state: dict | None) -> None:
        """Models, data, optimizers, data orders and generators (``state``: the checkpoint resumed from)."""
        raise NotImplementedError

    def _run_info(self) -> dict:
        """config.json of a new run."""
        raise NotImplementedError

    def _train_step(self):
        """One optimizer step (``self.step`` += 1); what it returns goes to ``_account``."""
        raise NotImplementedError

    def _account(self, out, busy: float) -> None:
        """Add a step's result and its seconds to the logging window."""
        raise NotImplementedError

    def _log(self, bar) -> str | None:
        """Log the window; a reason to stop the run (after a checkpoint), or None."""
        raise NotImplementedError

    def _state(self) -> dict:
        """A checkpoint's training state: ``_common_state()`` and the trainer's own entries."""
        raise NotImplementedError

    def _result(self):
        """What the finished run returns."""
        raise NotImplementedError

    # ---- what a trainer names ------------------------------------------------------------------
    def _modules(self) -> dict:
        """The trained modules by file name (student, its EMA, ...), as checkpointed."""
        return {"student": self.student, "ema": self.ema.module}

    def _optimizers(self) -> dict:
        """name -> (module, optimizer): the checkpoint key of each optimizer's state."""
        raise NotImplementedError

    def _generators(self) -> dict:
        """The run's own generators by name (their states are checkpointed with the global RNG)."""
        raise NotImplementedError

    def _trained_params(self) -> list:
        return [p for _, opt in self._optimizers().values() for g in opt.param_groups for p in g["params"]]

    # ---- checkpoints ---------------------------------------------------------------------------
    def _common_state(self) -> dict:
        """Step, EMA counter, data order and RNG (collective: every rank's states)."""
        return {"step": self.step, "ema_updates": self.ema.num_updates, "data": self.order.state_dict(),
                "rng": capture_rng(self._generators())}

    def _save(self) -> None:
        """Checkpoint the state after ``self.step`` optimizer steps (all ranks call; rank 0 writes, every rank
        its shards under fsdp)."""
        norms = torch.stack(torch._foreach_norm([local(p) for p in self._trained_params()]))
        # never overwrite a good checkpoint with broken weights; sharded, each rank sees only its shards: all check
        if self.sharded or not bool(torch.isfinite(norms).all()):
            check_finite(norms.sum().reshape(1), self.step - 1, "parameter norm", self.last_ckpt)
        state = self._state()
        if self.cfg.parallel == "fsdp":  # every rank writes its shards of the weights, EMA and optimizer moments
            state["checkpoint_format"] = DCP_FORMAT
            files, sharded = {}, {DCP_DIR: lambda p: save_sharded(p, self._modules(), self._optimizers())}
        else:
            state.update({name: opt.state_dict() for name, (_, opt) in self._optimizers().items()})
            files, sharded = self._weight_files({"step": self.step, **self.file_meta}), None
        self.last_ckpt = self.ckpt.save(self.step, files, state, sharded)

    def _weight_files(self, meta: dict) -> dict:
        """Single-file weights (name -> writer); gathered from the shards under fsdp (a collective: all ranks call)."""
        sd = {name: full_state_dict(m) for name, m in self._modules().items()}
        return {f"{name}.safetensors": self._weight_writer(name, sd[name], meta) for name in sd}

    def _weight_writer(self, name: str, state_dict: dict, meta: dict):
        module = self._modules()[name]
        return lambda p: save_student(p, module, meta, state_dict=state_dict)

    def _read_weights(self, folder: Path, name: str) -> dict:
        """The tensors of a single-file checkpoint's ``name``.safetensors."""
        return read_student_file(folder / f"{name}.safetensors")[1]

    def _restore(self, folder: Path, state: dict) -> None:
        self._check_resumable(folder, state)
        if state.get("checkpoint_format") == DCP_FORMAT:  # sharded (fsdp) checkpoint: any process count, any mode
            load_sharded(folder / DCP_DIR, self._modules(), self._optimizers())
        else:  # whole weights and optimizers numbered by parameter: sharded on load under fsdp
            for name, module in self._modules().items():
                load_full_state_dict(module, self._read_weights(folder, name))
            for name, (module, opt) in self._optimizers().items():
                load_indexed_optimizer(module, opt, state[name])
        self.ema.num_updates = int(state["ema_updates"])
        self.order.load_state_dict(state["data"])
        self._restore_own(state)
        restore_rng(state["rng"], self._generators())
        self.step = int(state["step"])

    def _check_resumable(self, folder: Path, state: dict) -> None:
        """Refuse a checkpoint of another recording (or other data) than this run's."""
        if state["recording_id"] != self.recording_id:
            raise ValueError(f"{folder} was trained on another recording than {self.cfg.recording} (content differs)")

    def _restore_own(self, state: dict) -> None:
        """The subclass's own parts of a checkpoint's state."""

    # ---- the loop ------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        bar = progress(cfg.steps, self.step, cfg.progress)
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                out = self._train_step()
                self._account(out, time.perf_counter() - t0)  # throughput counts training steps, not checkpoint writes
                bar.update(1)
                stop = None
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    stop = self._log(bar)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop:
                    self._save()
                if stop:
                    self._stop(stop)
        finally:
            bar.close()
            self.logger.close()
        files = self._weight_files({"step": self.step, **self.file_meta})  # all ranks: gathered under fsdp
        if dist.is_main():  # the finished run's weights beside the checkpoints, for load_student(run_dir)
            for name, write in files.items():
                write(self.run_dir / name)
        dist.barrier()
        return self._result()

    def _stop(self, reason: str) -> None:
        """End the run after the checkpoint that ``_log``'s ``reason`` asked for."""
        raise RuntimeError(reason)
