"""Train a class-conditional DiT teacher on any data: the embedded digits or photos, an image folder, a latent store.

Loss (``prediction`` 'eps', DiT's VP process): E_{x0, y, t, eps} |eps_theta(x_t, t, y') - eps|^2 with t
uniform on 0..999 and x_t = q_sample(x0, t, eps); (``prediction`` 'velocity', rectified flow):
|v_theta(x_t, t, y') - (eps - x0)|^2 with t uniform on [0, 1] and x_t = (1 - t) x0 + t eps. In both,
y' = y replaced by the null class with probability ``class_dropout_prob`` (so classifier-free
guidance works). AdamW, linear warm-up then cosine decay, gradient clipping, EMA of the weights.
The data (``data``: 'digits', 'photos', or a path) sets the DiT's input size, channels and classes.

Every random draw (batch indices, shifts, label dropout, t, eps) comes from one seeded
``torch.Generator`` whose state is checkpointed, so a resumed run is bit-identical to an
uninterrupted one. Under torchrun every process draws the same global batch from that generator
and trains on its slice (rank r: rows r*B/W .. (r+1)*B/W), with DDP or FSDP2 (``parallel``,
training/parallel.py) averaging the gradients: the run is the one-process run up to the rounding of
that average, and a run resumes on any number of processes. Files in ``out_dir``:
  teacher.safetensors   EMA weights, DiT config in the metadata (what ``load_teacher`` reads)
  train_state.pt        raw + EMA weights, optimiser, generator, step, losses (for resume; ddp)
  checkpoints/          parallel "fsdp": numbered sharded (DCP) checkpoints of the same state instead
  config.json           resolved training config, model config and data counts
  losses.json           mean training loss per ``log_every`` steps

The trainer itself (``run_teacher_training``) is the text teacher's too (text_teacher.py): the two differ
only in what the model is conditioned on, a ``ConditionSource`` (``ClassLabels`` here), which draws the
clean images with their conditioning and its guidance dropout from the run's generator.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ardistill.data.sources import TrainingData, open_training_data
from ardistill.io import distributed as dist
from ardistill.sampling.diffusion import process_for
from ardistill.models.dit import DiT, DiT_models, dit_config
from ardistill.training.config_checks import ConfigDict, check_at_least, check_choices, check_fraction
from ardistill.training.checkpointer import Checkpointer, CheckpointReadError
from ardistill.training.ema import EMA
from ardistill.training.lr_schedule import LR_SCHEDULES, learning_rate
from ardistill.io.checkpoints import torch_load_reason
from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.training.parallel import (DCP_DIR, DCP_FORMAT, check_parallel, full_state_dict, load_full_state_dict,
                                         load_indexed_optimizer, load_sharded, save_sharded, wrap_ddp, wrap_parallel)

TEACHER_FILE = "teacher.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.json"
CHECKPOINTS = "checkpoints"  # sharded (fsdp) training states, numbered (checkpointer.Checkpointer)
PREDICTIONS = ("eps", "velocity")  # eps on DiT's VP process, velocity on rectified flow


@dataclass(frozen=True, kw_only=True)
class TeacherRecipe(ConfigDict):
    """The optimisation of a teacher training run, the same for every conditioning (class and text teachers):
    AdamW with a linear warm-up, then a constant or cosine learning rate, gradient clipping and an EMA."""

    steps: int = 14000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # linear warm-up, then constant or cosine decay to min_lr_ratio * lr
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999


@dataclass(frozen=True)
class TeacherTrainConfig(TeacherRecipe):
    """Everything that determines a teacher training run (saved as config.json beside it)."""

    model: str = "DiT-digits-S"  # a key of dit.DiT_models (its width and depth; the data sets the shape)
    data: str = "digits"  # 'digits', 'photos', an image folder (ImageNet layout) or a latent store
    image_size: int = 32  # ADM centre crop of an image folder (other data have their own size)
    hflip: bool = False  # mirror half of an image folder's draws
    prediction: str = "eps"  # 'eps' (VP) or 'velocity' (rectified flow)
    class_dropout_prob: float = 0.1
    augment_shift: int = 0  # random translation by up to this many pixels (0 = none)
    seed: int = 0
    data_seed: int = 0  # seed of the train / held-out split
    heldout_fraction: float = 0.2
    log_every: int = 100
    checkpoint_every: int = 500
    # where and how it runs (may change on resume): "cpu" or "cuda" (one GPU per process under torchrun);
    # several processes (torchrun) average gradients with "ddp" or shard the model with "fsdp" (FSDP2)
    device: str = "cpu"
    parallel: str = "ddp"

    def __post_init__(self):
        check_parallel("TeacherTrainConfig.parallel", self.parallel)
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"TeacherTrainConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.model not in DiT_models:
            raise ValueError(f"TeacherTrainConfig.model: unknown DiT size {self.model!r}; "
                             f"choose from {sorted(DiT_models)}")
        check_choices(self, {"prediction": PREDICTIONS})
        if not self.data:
            raise ValueError("TeacherTrainConfig.data must be 'digits', 'photos' or a path")
        check_at_least(self, 1, ("steps", "batch_size", "log_every", "checkpoint_every", "image_size"))
        check_at_least(self, 0, ("warmup_steps", "augment_shift"))
        check_recipe(self)
        check_fraction(self, "class_dropout_prob", "(0, 1)", "guidance needs the null class")
        check_fraction(self, "heldout_fraction", "(0, 1)")


def check_recipe(cfg) -> None:
    """The optimisation fields every teacher config shares: lr, weight decay, clipping, schedule, EMA."""
    if cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ValueError(f"{type(cfg).__name__}: lr must be > 0, weight_decay and grad_clip >= 0 (0 = no clipping)")
    check_choices(cfg, {"lr_schedule": LR_SCHEDULES})
    check_fraction(cfg, "min_lr_ratio")
    check_fraction(cfg, "ema_decay", "[0, 1)")


def open_data(cfg: TeacherTrainConfig) -> TrainingData:
    """The run's training data."""
    return open_training_data(cfg.data, image_size=cfg.image_size, hflip=cfg.hflip, augment_shift=cfg.augment_shift,
                              data_seed=cfg.data_seed, heldout_fraction=cfg.heldout_fraction)


def teacher_model_config(cfg: TeacherTrainConfig, data: TrainingData | None = None):
    """The DiT config this run trains: the registry size, with the data's shape and no learned sigma.

    Any registered size works ('DiT-T/2' in tests): input size, channels and classes come from the
    data; learn_sigma is off because the loss is the plain MSE (no variational-bound term).
    """
    data = open_data(cfg) if data is None else data
    c, h, w = data.shape
    if h != w:
        raise ValueError(f"training data {cfg.data!r}: samples are {h}x{w}; the DiT needs square inputs")
    return dit_config(cfg.model, input_size=h, in_channels=c, num_classes=data.num_classes, learn_sigma=False,
                      prediction=cfg.prediction, class_dropout_prob=cfg.class_dropout_prob)


class ConditionSource(Protocol):
    """What a teacher is conditioned on: the one part of teacher training that differs between tasks.

    ``draw`` takes the global batch from the run's generator: the clean images and the model's
    conditioning inputs, each replaced by the null condition with the config's dropout probability (so
    that classifier-free guidance works). The teacher file is written with ``kind`` and ``file_metadata``.
    """

    kind: str
    file_metadata: dict

    def prepare(self, model: torch.nn.Module) -> None:
        """Put the model in the mode it trains in."""

    def draw(self, batch_size: int, gen: torch.Generator,
             model: torch.nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(x0 (B, C, H, W), conditioning inputs after dropout)."""


class ClassLabels:
    """Class labels of the training data, dropped to the null class by the DiT's own label embedder."""

    kind = "teacher"
    file_metadata: dict = {}

    def __init__(self, data: TrainingData):
        self.data = data

    def prepare(self, model: torch.nn.Module) -> None:
        # Label dropout is drawn here from the run's generator (so resume is exact); the model itself runs
        # in eval mode, which only switches off its own dropout draw (DiT has no other train-time layers).
        model.eval()

    def draw(self, batch_size: int, gen: torch.Generator, model: torch.nn.Module):
        x0, labels = self.data.sample(batch_size, gen)  # the global batch: the same draws on every rank
        return x0, (model.y_embedder.token_drop(labels, generator=gen),)


def train_teacher(cfg: TeacherTrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) a teacher; returns the path of the EMA checkpoint ``teacher.safetensors``.

    Args:
        cfg: the run's configuration.
        out_dir: folder for the checkpoint, training state, config and losses.
        resume: continue from the newest training state in ``out_dir`` when there is one (its config must match).
        progress: show a tqdm progress bar.
    Works in one process or under torchrun (the process group is started here if needed).
    """
    owns_group = not dist.is_distributed()
    device = dist.init(cfg.device)
    try:
        return _train_teacher(cfg, Path(out_dir), resume, progress, device)
    finally:
        if owns_group:
            dist.cleanup()


def _train_teacher(cfg: TeacherTrainConfig, out_dir: Path, resume: bool, progress: bool, device: torch.device) -> Path:
    world = dist.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"TeacherTrainConfig.batch_size {cfg.batch_size} is not divisible by the {world} processes")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = open_data(cfg)
    mcfg = teacher_model_config(cfg, data)
    process = process_for(cfg.prediction)
    info = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "process": asdict(process), "data": data.describe()}
    return run_teacher_training(cfg, out_dir, lambda: DiT(mcfg), mcfg, process, ClassLabels(data), info, resume,
                                progress, device, cfg.parallel, "train-teacher")


# ------------------------------------------------------------------------------------------------
# the teacher trainer (class labels here, captions in text_teacher.py)


def run_teacher_training(cfg, out_dir: Path, make_model: Callable[[], torch.nn.Module], mcfg, process,
                         conditions: ConditionSource, info: dict, resume: bool, progress: bool, device: torch.device,
                         parallel: str, desc: str) -> Path:
    """Train (or resume) the teacher ``make_model`` builds on ``conditions``; returns the EMA checkpoint's path.

    Each step draws the global batch (images and conditioning from ``conditions``, then t and eps) from the
    run's generator on every rank; each rank trains on its slice of it. ``info`` is written as config.json.
    """
    from tqdm import tqdm

    world, rank = dist.world_size(), dist.rank()
    model, ema, opt, gen, start, losses, elapsed = start_teacher_run(make_model, cfg, out_dir, resume,
                                                                     device=device, parallel=parallel)
    forward = wrap_ddp(model, device) if parallel == "ddp" else model  # fsdp: the sharded module itself
    ckpt = Checkpointer(out_dir / CHECKPOINTS) if parallel == "fsdp" else None
    if dist.is_main():
        atomic_write_json(out_dir / CONFIG_FILE, info)

    conditions.prepare(model)
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's share
    t0, window = time.time() - elapsed, []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and dist.is_main()),
               desc=desc)
    for step in bar:
        x0, cond = conditions.draw(cfg.batch_size, gen, model)
        t = process.sample_train_t(cfg.batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = process.q_sample(x0, t, eps).float()
        target = process.training_target(x0, eps, t).float()
        inputs = (x_t, process.model_time(t), *cond)
        if world > 1:
            inputs, target = tuple(v[rows] for v in inputs), target[rows]
        inputs = tuple(v.to(device) for v in inputs)
        loss = F.mse_loss(forward(*inputs), target.to(device))

        optimizer_step(cfg, step, loss, model, opt, ema)

        window.append(_mean_over_ranks(loss))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses.append({"step": done, "loss": sum(window) / len(window), "lr": learning_rate(cfg, step)})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save(out_dir, cfg, mcfg, model, ema, opt, gen, done, losses, time.time() - t0, ckpt, conditions)
    return out_dir / TEACHER_FILE


def _mean_over_ranks(loss: torch.Tensor) -> float:
    """The global batch's loss (each rank's share has the same size): the one-process value in one process."""
    if not dist.is_distributed():
        return loss.item()
    return dist.all_reduce_sum(loss.detach().clone()).item() / dist.world_size()


def start_teacher_run(make_model, cfg, out_dir: Path, resume: bool, device: torch.device | None = None,
                      parallel: str = "ddp"):
    """Seeded model, EMA, AdamW and the run's generator; restored from the newest training state when resuming.

    Shared by the class-conditional and the text teacher trainers. ``parallel`` "fsdp" shards the model and
    its EMA per DiT block before the optimizer is built (on more than one process) and restores from
    ``train_state.pt`` or a sharded checkpoint, whichever is newer. Returns (model, ema, opt, gen, start
    step, losses, elapsed seconds); the model is not DDP-wrapped (the caller wraps it).
    """
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = make_model()
    if device is not None:
        model = model.to(device)
    # EMA warm-up (decay min(d, (1 + n) / (10 + n))) keeps a short run from averaging in the random init.
    ema = EMA(model, cfg.ema_decay, warmup=True)
    if parallel == "fsdp":  # shards under torchrun; the plain module without a process group
        wrap_parallel(model, device or torch.device("cpu"), "fsdp", None, (), (ema.module,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, losses, elapsed = 0, [], 0.0

    point = _resume_point(out_dir) if resume else None
    if point is not None:
        where, state = point
        saved = type(cfg).from_dict(state["train_config"])
        if _resume_key(saved) != _resume_key(cfg):
            raise ValueError(f"{where}: saved with a different training config; use a new --out or resume=False")
        if state.get("checkpoint_format") == DCP_FORMAT:  # any number of processes, sharded or not
            load_sharded(where / DCP_DIR, {"model": model, "ema": ema.module}, {"optimizer": (model, opt)})
            ema.num_updates = int(state["ema_updates"])
        else:  # whole tensors: cut into this rank's shards under fsdp
            load_full_state_dict(model, state["model"])
            load_full_state_dict(ema.module, state["ema"]["module"])
            ema.num_updates = int(state["ema"]["num_updates"])
            load_indexed_optimizer(model, opt, state["optimizer"])
        gen.set_state(state["generator"])
        start, losses, elapsed = int(state["step"]), list(state["losses"]), float(state["elapsed_s"])
        if start > cfg.steps:
            raise ValueError(f"{where}: the run is already at step {start}, past --steps {cfg.steps}")
    return model, ema, opt, gen, start, losses, elapsed


def _resume_point(out_dir: Path) -> tuple[Path, dict] | None:
    """(where, state) of the newest training state: ``train_state.pt`` or a sharded checkpoint (a run may
    have switched between ddp and fsdp); None for a fresh start."""
    found = []
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, flipped bytes, a pickle that is not ours
            raise CheckpointReadError(
                f"teacher training state {state_path} is unreadable ({torch_load_reason(e)}); delete it to start "
                f"the run again from step 0 (the {TEACHER_FILE} beside it is the last completed save)") from e
        found.append((state_path, state))
    if (out_dir / CHECKPOINTS / "latest.json").is_file():
        found.append(Checkpointer(out_dir / CHECKPOINTS).resume_point())
    return max(found, key=lambda f: int(f[1]["step"])) if found else None


def optimizer_step(cfg, step: int, loss: torch.Tensor, model, opt, ema) -> None:
    """One AdamW step at the schedule's learning rate, gradient clipping, then the EMA update."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    ema.update(model)


def _resume_key(cfg: TeacherTrainConfig) -> dict:
    """Fields that must match to resume; logging and checkpoint cadence and ``steps`` may change.

    A larger ``steps`` extends a finished run; with the cosine schedule that re-stretches the decay
    (the learning rate rises again), so extend constant-schedule runs, or plan the length up front.
    """
    d = cfg.to_dict()
    for k in ("log_every", "checkpoint_every", "steps", "device", "parallel"):
        d.pop(k, None)
    return d


def _save(out_dir: Path, cfg, mcfg, model, ema, opt, gen, step: int, losses: list, elapsed: float,
          ckpt: Checkpointer | None, conditions: ConditionSource) -> None:
    """Write the EMA checkpoint, then the resume state (each atomically); every rank calls it.

    ``ckpt`` (parallel "fsdp"): the resume state is a numbered sharded checkpoint there (each rank writes
    its shards) instead of ``train_state.pt``; the EMA file is gathered to rank 0 either way. The file's
    kind and extra metadata are the ``conditions``' (the text teacher's carries its encoder).
    """
    from ardistill.io.checkpoints import save_model

    ema_sd = full_state_dict(ema.module)  # a collective under fsdp
    if dist.is_main():
        save_model(ema.module, mcfg.to_dict(), out_dir / TEACHER_FILE, kind=conditions.kind,
                   extra_metadata={"train_config": cfg.to_dict(), "step": step, "weights": "ema",
                                   **conditions.file_metadata}, state_dict=ema_sd)
    common = {"generator": gen.get_state(), "step": step, "losses": losses, "elapsed_s": elapsed,
              "train_config": cfg.to_dict()}
    if ckpt is not None:
        state = {**common, "ema_updates": ema.num_updates, "model_config": mcfg.to_dict(),
                 "checkpoint_format": DCP_FORMAT, "world_size": dist.world_size()}
        ckpt.save(step, {}, state, {DCP_DIR: lambda p: save_sharded(p, {"model": model, "ema": ema.module},
                                                                    {"optimizer": (model, opt)})})
    elif dist.is_main():
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), **common}
        atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    if dist.is_main():
        atomic_write_json(out_dir / LOSSES_FILE, {"losses": losses, "step": step, "elapsed_s": round(elapsed, 1)})
    dist.barrier()


def read_train_config(path: str | Path) -> TeacherTrainConfig:
    """The training config saved in a run folder's config.json."""
    return TeacherTrainConfig.from_dict(read_json(path, "teacher training config")["train"])
