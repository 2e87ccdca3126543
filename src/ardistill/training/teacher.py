"""Train a class-conditional DiT teacher on any data: the embedded digits or photos, an image folder, a latent store.

Loss (``prediction`` 'eps', DiT's VP process): E_{x0, y, t, eps} |eps_theta(x_t, t, y') - eps|^2 with t
uniform on 0..999 and x_t = q_sample(x0, t, eps); (``prediction`` 'velocity', rectified flow):
|v_theta(x_t, t, y') - (eps - x0)|^2 with t uniform on [0, 1] and x_t = (1 - t) x0 + t eps. In both,
y' = y replaced by the null class with probability ``class_dropout_prob`` (so classifier-free
guidance works). AdamW, linear warm-up then cosine decay, gradient clipping, EMA of the weights.
The data (``data``: 'digits', 'photos', or a path) sets the DiT's input size, channels and classes.

Every random draw (batch indices, shifts, label dropout, t, eps) comes from one seeded
``torch.Generator`` whose state is checkpointed, so a resumed run is bit-identical to an
uninterrupted one. Files in ``out_dir``:
  teacher.safetensors   EMA weights, DiT config in the metadata (what ``load_teacher`` reads)
  train_state.pt        raw + EMA weights, optimiser, generator, step, losses (for resume)
  config.json           resolved training config, model config and data counts
  losses.json           mean training loss per ``log_every`` steps
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ardistill.data.sources import TrainingData, open_training_data
from ardistill.sampling.diffusion import process_for
from ardistill.models.dit import DiT, DiT_models, dit_config
from ardistill.training.ema import EMA
from ardistill.io.checkpoints import torch_load_reason
from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.training.loop import CheckpointReadError

TEACHER_FILE = "teacher.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.json"
LR_SCHEDULES = ("constant", "cosine")
PREDICTIONS = ("eps", "velocity")  # eps on DiT's VP process, velocity on rectified flow


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Everything that determines a teacher training run (saved as config.json beside it)."""

    model: str = "DiT-digits-S"  # a key of dit.DiT_models (its width and depth; the data sets the shape)
    data: str = "digits"  # 'digits', 'photos', an image folder (ImageNet layout) or a latent store
    image_size: int = 32  # ADM centre crop of an image folder (other data have their own size)
    hflip: bool = False  # mirror half of an image folder's draws
    prediction: str = "eps"  # 'eps' (VP) or 'velocity' (rectified flow)
    steps: int = 14000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # linear warm-up, then constant or cosine decay to min_lr_ratio * lr
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_dropout_prob: float = 0.1
    augment_shift: int = 0  # random translation by up to this many pixels (0 = none)
    seed: int = 0
    data_seed: int = 0  # seed of the train / held-out split
    heldout_fraction: float = 0.2
    log_every: int = 100
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.model not in DiT_models:
            raise ValueError(f"TeacherTrainConfig.model: unknown DiT size {self.model!r}; "
                             f"choose from {sorted(DiT_models)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"TeacherTrainConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not self.data:
            raise ValueError("TeacherTrainConfig.data must be 'digits', 'photos' or a path")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "augment_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"TeacherTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TeacherTrainConfig: lr must be > 0, weight_decay and grad_clip >= 0 (0 = no clipping)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TeacherTrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TeacherTrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TeacherTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.class_dropout_prob < 1:
            raise ValueError("TeacherTrainConfig.class_dropout_prob must be in (0, 1): guidance needs the null class")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"TeacherTrainConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherTrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TeacherTrainConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def learning_rate(cfg: TeacherTrainConfig, step: int) -> float:
    """Learning rate at (0-based) ``step``: linear warm-up, then constant or cosine to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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


def train_teacher(cfg: TeacherTrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) a teacher; returns the path of the EMA checkpoint ``teacher.safetensors``.

    Args:
        cfg: the run's configuration.
        out_dir: folder for the checkpoint, training state, config and losses.
        resume: continue from ``out_dir/train_state.pt`` when it exists (its config must match).
        progress: show a tqdm progress bar.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = open_data(cfg)
    mcfg = teacher_model_config(cfg, data)
    process = process_for(cfg.prediction)

    model, ema, opt, gen, start, losses, elapsed = start_teacher_run(lambda: DiT(mcfg), cfg, out_dir, resume)
    atomic_write_json(out_dir / CONFIG_FILE, {
        "train": cfg.to_dict(), "model": mcfg.to_dict(), "process": asdict(process),
        "data": data.describe(),
    })

    # Label dropout is drawn here from the run's generator (so resume is exact); the model itself runs
    # in eval mode, which only switches off its own dropout draw (DiT has no other train-time layers).
    model.eval()
    t0, window = time.time() - elapsed, []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train-teacher")
    for step in bar:
        x0, labels = data.sample(cfg.batch_size, gen)
        y = model.y_embedder.token_drop(labels, generator=gen)
        t = process.sample_train_t(cfg.batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = process.q_sample(x0, t, eps).float()
        loss = F.mse_loss(model(x_t, process.model_time(t), y), process.training_target(x0, eps, t).float())

        optimizer_step(cfg, step, loss, model, opt, ema)

        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses.append({"step": done, "loss": sum(window) / len(window), "lr": learning_rate(cfg, step)})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save(out_dir, cfg, mcfg, model, ema, opt, gen, done, losses, time.time() - t0)
    return out_dir / TEACHER_FILE



def start_teacher_run(make_model, cfg, out_dir: Path, resume: bool):
    """Seeded model, EMA, AdamW and the run's generator; restored from ``train_state.pt`` when resuming.

    Shared by the class-conditional and the text teacher trainers. Returns (model, ema, opt, gen,
    start step, losses, elapsed seconds).
    """
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = make_model()
    # EMA warm-up (decay min(d, (1 + n) / (10 + n))) keeps a short run from averaging in the random init.
    ema = EMA(model, cfg.ema_decay, warmup=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, losses, elapsed = 0, [], 0.0

    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, flipped bytes, a pickle that is not ours
            raise CheckpointReadError(
                f"teacher training state {state_path} is unreadable ({torch_load_reason(e)}); delete it to start "
                f"the run again from step 0 (the {TEACHER_FILE} beside it is the last completed save)") from e
        saved = type(cfg).from_dict(state["train_config"])
        if _resume_key(saved) != _resume_key(cfg):
            raise ValueError(f"{state_path}: saved with a different training config; use a new --out or resume=False")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, losses, elapsed = int(state["step"]), list(state["losses"]), float(state["elapsed_s"])
        if start > cfg.steps:
            raise ValueError(f"{state_path}: the run is already at step {start}, past --steps {cfg.steps}")
    return model, ema, opt, gen, start, losses, elapsed


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
    for k in ("log_every", "checkpoint_every", "steps"):
        d.pop(k)
    return d


def _save(out_dir: Path, cfg, mcfg, model, ema, opt, gen, step: int, losses: list, elapsed: float) -> None:
    """Write the EMA checkpoint, then the resume state (each atomically)."""
    from ardistill.io.checkpoints import save_model

    save_model(ema.module, mcfg.to_dict(), out_dir / TEACHER_FILE, kind="teacher",
               extra_metadata={"train_config": cfg.to_dict(), "step": step, "weights": "ema"})
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "step": step, "losses": losses, "elapsed_s": elapsed,
             "train_config": cfg.to_dict()}
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write_json(out_dir / LOSSES_FILE, {"losses": losses, "step": step, "elapsed_s": round(elapsed, 1)})


def read_train_config(path: str | Path) -> TeacherTrainConfig:
    """The training config saved in a run folder's config.json."""
    return TeacherTrainConfig.from_dict(read_json(path, "teacher training config")["train"])
