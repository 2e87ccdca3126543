"""`ardistill finetune-gan`: ARD's second stage, "ARD (R+G)": regression + hinge GAN fine-tuning of a student.

Starts from a distilled student (``ardistill distill``). Each optimizer step, per micro-batch:

1. generator (the student): the teacher-forced pass over the recorded trajectory gives the
   regression loss L_reg (per-step MSE, as in ``distill``). The fakes are the student's outputs:
   ``fakes="forced"`` reuses that pass; ``fakes="free"`` runs the student on its own history (a
   KV-cached rollout from the same noise without gradient, then one pass with gradient), which is
   what sampling produces. ``gan_steps="last"`` discriminates the final output, ``"all"`` one
   randomly chosen step per sample (intermediate ODE states are seen at their own grid time).
   The final output (and the real image) is noised by the forward process to a time drawn from
   ``feature_noise``; the frozen teacher extracts per-block tokens; L_G = -E[D(fake)];
   loss = L_reg + lambda * L_G with lambda adaptive (gan.py), 0 for the first ``gan_warmup`` steps.
2. discriminator (the heads): hinge loss on real images (digits train split, or a pre-encoded
   latent store at scale) against the same fakes, detached, at the same noise levels.

Both updates use the parameters from before the step (simultaneous updates). The infrastructure
(data order, DDP, EMA, atomic checkpoints, RNG, NaN guard, logging) is train_utils.py's, as in
``distill``. A discriminator-collapse guard warns (and optionally stops) when the D loss stays near
zero. Design choices and measurements: docs/gan.md.

Run folder: as ``distill``'s, plus ``disc_heads.safetensors`` beside the student weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ardistill.data.sources import EMBEDDED
from ardistill.io import distributed as dist
from ardistill.io.checkpoints import load_state_and_config, save_model
from ardistill.sampling.diffusion import VPProcess, make_process
from ardistill.training.ema import EMA
from ardistill.io.fileio import atomic_write_json, read_json, sha256_file
from ardistill.models.discriminator import (DISC_HEADS_KIND, DiscriminatorConfig, DiscriminatorHeads, TeacherFeatures, adaptive_weight,
                           discriminator_config_for, hinge_d_loss, hinge_g_loss, last_head_weight)
from ardistill.models.student import ARDStudent, StudentConfig, block_times_for
from ardistill.io.student_io import read_student_file, resolve_student_path, save_student
from ardistill.training.distill import distill_loss, recording_id
from ardistill.training.loop import (start_run, PRECISIONS, Checkpointer, EpochBatches, RunLogger, autocast, capture_rng,
                                   check_finite, progress, restore_rng, sync_gradients)
from ardistill.training.parallel import (DCP_DIR, DCP_FORMAT, check_parallel, full, full_state_dict, load_full_state_dict,
                                         load_indexed_optimizer, load_sharded, local, save_sharded, sharded_world,
                                         wrap_parallel)

FAKES = ("forced", "free")
GAN_STEPS = ("last", "all")
START_WEIGHTS = ("ema", "student")
# Fields that may change on resume: paths (checked by content), run length, learning rates, logging.
# ``parallel``: DDP and FSDP2 checkpoints resume under either (not bit-identically: other rounding of the average).
RUNTIME_FIELDS = ("student", "recording", "teacher", "real", "run_dir", "steps", "lr", "d_lr", "ckpt_every",
                  "keep_every", "log_every", "tensorboard", "progress", "stop_on_collapse", "verify_shards", "parallel")


@dataclass(frozen=True)
class GANConfig:
    """Everything that determines a GAN fine-tuning run; saved in config.json and in every checkpoint."""

    student: str  # distilled student: run folder, checkpoint folder or weight file
    recording: str  # the recording it was distilled on (regression targets, fakes' noise and labels)
    teacher: str  # the teacher of the recording: the frozen feature network (sha256-checked)
    run_dir: str
    real: str = "digits"  # real images: "digits" or "photos" (train split), a latent store folder (encode-latents)
    #                       or an image folder (root/<class>/<images>, centre-cropped to the student's size)
    start_weights: str = "ema"  # which weights of a run/checkpoint folder to start from
    # discriminator
    disc_blocks: tuple[int, ...] = ()  # teacher blocks with a head; () = every block
    head_channels: int = 64
    head_kernel: int = 3
    head_cmap: int = 64
    # what is discriminated
    fakes: str = "forced"  # "forced": teacher-forced outputs (regression pass); "free": own-history outputs
    gan_steps: str = "last"  # "last": the final output; "all": one random step per sample
    # final outputs and reals noised to t ~ U(range) x the time range (VP: t = frac * 999); measured on
    # digits: low noise gives D a sharper view and the student a better gradient than the full range
    feature_noise: tuple[float, float] = (0.0, 0.25)
    # adaptive weight: gan_factor * clamp(|g_reg| / (|g_gan| + 1e-4), 0, gan_weight_max), 0 before gan_warmup
    gan_factor: float = 10.0
    gan_weight_max: float = 1e4
    gan_warmup: int = 3000
    # optimisation: generator (paper: AdamW 1e-4) and discriminator (paper: 1e-3)
    steps: int = 10000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    d_lr: float = 1e-3
    d_betas: tuple[float, float] = (0.0, 0.99)
    d_grad_clip: float = 0.0  # 0 = off (the norm is still logged)
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    loss_weights: tuple[float, ...] = ()  # per-step regression weights; () = equal
    # discriminator-collapse guard: D loss below collapse_d_loss for collapse_patience logs in a row
    collapse_d_loss: float = 0.05
    collapse_patience: int = 5
    stop_on_collapse: bool = False
    # run
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    deterministic: bool = False
    parallel: str = "ddp"  # "ddp" or "fsdp": FSDP2 on the student's blocks and the discriminator heads
    ckpt_every: int = 500
    keep_every: int = 0
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    verify_shards: bool = True  # check each recording / latent shard's sha256 before its first use

    def __post_init__(self):
        check_parallel("GANConfig.parallel", self.parallel)
        for name in ("betas", "d_betas", "feature_noise", "loss_weights"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        object.__setattr__(self, "disc_blocks", tuple(int(b) for b in self.disc_blocks))
        for name, choices in (("fakes", FAKES), ("gan_steps", GAN_STEPS), ("start_weights", START_WEIGHTS),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GANConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "head_channels", "head_kernel",
                     "head_cmap", "collapse_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"GANConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gan_factor", "gan_weight_max", "gan_warmup", "weight_decay", "grad_clip", "d_grad_clip",
                     "keep_every", "seed", "collapse_d_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"GANConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.d_lr > 0):
            raise ValueError(f"GANConfig: lr and d_lr must be > 0, got {self.lr}, {self.d_lr}")
        for name in ("betas", "d_betas"):
            b = getattr(self, name)
            if len(b) != 2 or not all(0 <= v < 1 for v in b):
                raise ValueError(f"GANConfig.{name} must be two numbers in [0, 1), got {b}")
        lo_hi = self.feature_noise
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"GANConfig.feature_noise must be (lo, hi) with 0 <= lo <= hi <= 1, got {lo_hi}")
        if self.head_kernel % 2 == 0:
            raise ValueError(f"GANConfig.head_kernel must be odd, got {self.head_kernel}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"GANConfig.ema_decay must be in [0, 1], got {self.ema_decay}")
        if any(w < 0 for w in self.loss_weights) or (self.loss_weights and sum(self.loss_weights) == 0):
            raise ValueError(f"GANConfig.loss_weights must be >= 0 and not all zero, got {self.loss_weights}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"GANConfig.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("betas", "d_betas", "feature_noise", "loss_weights", "disc_blocks"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GANConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"GANConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


# Recommended setting for the embedded digits (about 100 s on one free CPU core). Measured in docs/gan.md: FD
# 9.53 / 9.51 against 9.68 / 9.67 for regression-only training of the same length (two seeds); the
# paper's factor 10 raises the FD from 10.7 to 132 there.
DIGITS_GAN_SETTINGS: dict = dict(steps=300, batch_size=64, gan_warmup=50, gan_factor=0.3, lr=1e-4, d_lr=1e-3,
                                 ema_decay=0.99, fakes="forced", gan_steps="last", feature_noise=(0.0, 0.25))


@dataclass
class GANResult:
    """What a finished (or collapse-stopped) fine-tuning run left behind."""

    run_dir: Path
    step: int
    loss: float  # regression loss (weighted), mean over the last logging window
    loss_d: float
    gan_weight: float
    ema_path: Path
    student_path: Path
    disc_path: Path


class DiscriminatorCollapseError(RuntimeError):
    """The discriminator loss stayed below the collapse threshold; a checkpoint was written first."""


# ------------------------------------------------------------------------------------------------
# real data


class RealData(Protocol):
    """Real images for the discriminator, in the student's state space."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W) float32, labels (B,) int64)."""
        ...

    def identity(self) -> dict: ...


class _InMemoryReal:
    """Real images held in memory: ``images`` (N, C, H, W) in [-1, 1], ``labels`` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, generator):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


class EmbeddedReal(_InMemoryReal):
    """The training split of an embedded data set ("digits" or "photos"), in [-1, 1]: the images the
    benchmark's teacher was trained on (``data.sources.open_training_data``)."""

    def __init__(self, name: str = "digits"):
        from ardistill.data.sources import open_training_data
        d = open_training_data(name)
        self.images, self.labels, self.name = d.images, d.labels, name
        self.shape, self.num_classes = tuple(d.shape), d.num_classes

    def identity(self) -> dict:
        return {"kind": self.name, "split": "train", "count": len(self)}


class LatentReal:
    """Pre-encoded latents (``ardistill encode-latents``); the mirrored latent half the time."""

    def __init__(self, root: str | Path, verify_shards: bool = True):
        from ardistill.data.image_folder import LatentStore
        self.store = LatentStore(root, verify_shards=verify_shards)
        self.shape, self.num_classes = tuple(self.store.shape), self.store.num_classes

    def __len__(self) -> int:
        return len(self.store)

    def batch(self, indices, generator):
        flip = (torch.rand(len(indices), generator=generator) < 0.5).numpy() if self.store.layout.flipped else None
        return self.store.batch(indices, flip)

    def identity(self) -> dict:
        content = hashlib.sha256("".join(s["sha256"] for s in self.store.shards).encode()).hexdigest()
        return {"kind": "latents", "count": len(self), "shape": list(self.shape), "content": content}


class FolderReal(_InMemoryReal):
    """An image folder in ImageNet layout (your own data), ADM centre-cropped to the student's image size."""

    def __init__(self, root: str | Path, image_size: int):
        from ardistill.data.sources import load_image_folder
        d = load_image_folder(root, image_size)
        self.root, self.images, self.labels, self.classes = str(root), d.images, d.labels, d.classes
        self.shape, self.num_classes = tuple(d.images.shape[1:]), len(d.classes)

    def identity(self) -> dict:
        content = hashlib.sha256(self.images.numpy().tobytes() + self.labels.numpy().tobytes()).hexdigest()
        return {"kind": "image-folder", "count": len(self), "shape": list(self.shape), "classes": self.classes,
                "content": content}


def open_real(spec: str, verify_shards: bool = True, image_size: int | None = None) -> RealData:
    """"digits" or "photos" -> that embedded data set's train split; a folder with a trajectory-store
    manifest -> a latent store; any other folder -> an image folder (centre-cropped to ``image_size``)."""
    from ardistill.data.trajectories import MANIFEST
    if spec in EMBEDDED:
        return EmbeddedReal(spec)
    if Path(spec).is_dir() and not (Path(spec) / MANIFEST).exists():
        if image_size is None:
            raise ValueError(f"real data {spec}: an image folder needs the image size to crop to")
        return FolderReal(spec, image_size)
    return LatentReal(spec, verify_shards)


# ------------------------------------------------------------------------------------------------
# entry points


def finetune_gan(cfg: GANConfig, resume: bool = False) -> GANResult:
    """Fine-tune a distilled student with regression + GAN as ``cfg`` says; ``resume`` continues exactly.

    Args:
        cfg: the run's settings. On resume they must equal the saved ones except RUNTIME_FIELDS.
        resume: continue from the latest checkpoint of ``cfg.run_dir`` (a fresh start if it has none).
    Works in one process or under torchrun. Raises DiscriminatorCollapseError when the guard trips
    and ``cfg.stop_on_collapse`` (after writing a checkpoint).
    """
    from ardistill.training.distill import resolve_path
    paths = [k for k in ("student", "recording", "teacher", "run_dir", "real") if not (k == "real" and cfg.real in EMBEDDED)]
    cfg = replace(cfg, **{k: resolve_path(getattr(cfg, k)) for k in paths})  # resumable from any directory
    owns_group = not dist.is_distributed()
    device = dist.init(cfg.device)
    try:
        return _GANTrainer(cfg, device, resume).run()
    finally:
        if owns_group:
            dist.cleanup()


def load_gan_run_config(run_dir: str | Path) -> GANConfig:
    """The GANConfig of an existing run (from its latest checkpoint, else config.json)."""
    point = Checkpointer(Path(run_dir) / "checkpoints").resume_point()
    if point is not None:
        return GANConfig.from_dict(point[1]["config"])
    return GANConfig.from_dict(read_json(Path(run_dir) / "config.json", "run config")["gan"])


def finetune_gan_command(options: dict, resume: bool = False) -> GANResult:
    """`ardistill finetune-gan`: ``options`` are GANConfig fields; with ``resume`` and no ``student``,
    the settings come from the run folder and the given options (runtime fields) apply on top."""
    if resume and "student" not in options:
        if "run_dir" not in options:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        cfg = replace(load_gan_run_config(options["run_dir"]), **options)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("student", "recording", "teacher", "run_dir") if k not in options]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        cfg = GANConfig(**options)
    result = finetune_gan(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.run_dir}: {result.step} steps, regression loss {result.loss:.4g}, D loss {result.loss_d:.4g}, "
              f"GAN weight {result.gan_weight:.4g}; EMA weights {result.ema_path}")
    return result


# ------------------------------------------------------------------------------------------------
# the loop

# the scalars one micro-batch contributes (after the S per-step regression losses)
_STATS = ("gan_weight", "loss_d", "loss_d/real", "loss_d/fake", "logit/real", "logit/fake", "d_accuracy")


class _GANTrainer:
    """State of one GAN fine-tuning run; ``run()`` is the loop."""

    def __init__(self, cfg: GANConfig, device: torch.device, resume: bool):
        from ardistill.io.checkpoints import load_any_teacher
        from ardistill.data.record import weights_sha256
        from ardistill.data.trajectories import StudentDataSpec, TrajectoryDataset, load_manifest

        self.device = device
        self.run_dir = Path(cfg.run_dir)
        run = start_run(cfg, resume, device, RUNTIME_FIELDS)
        cfg, self.ckpt, latest, state, self.precision = run.cfg, run.ckpt, run.latest, run.state, run.precision
        self.cfg, self.last_ckpt = cfg, latest
        world = dist.world_size()

        # the student: its starting weights, or (resume) its config from the checkpoint
        if state is None:
            self.start_file = resolve_student_path(cfg.student, cfg.start_weights)
            scfg, start_weights, _ = read_student_file(self.start_file)
        else:
            self.start_file, scfg, start_weights = None, StudentConfig.from_dict(state["student_config"]), None
        teacher = load_any_teacher(cfg.teacher)
        if teacher.cfg != scfg.teacher:
            raise ValueError(f"the student was distilled from a teacher with config {scfg.teacher}, "
                             f"{cfg.teacher} has {teacher.cfg}")
        manifest = load_manifest(cfg.recording)
        tc = teacher.cfg
        spec = StudentDataSpec(num_steps=scfg.num_steps, target=scfg.target, shape=(tc.in_channels, tc.input_size,
                               tc.input_size), num_classes=tc.num_classes, teacher_sha256=weights_sha256(teacher))
        self.data = TrajectoryDataset(cfg.recording, expect=spec, verify_shards=cfg.verify_shards)
        proc = dict(manifest["sampler"]["process"])
        self.process = make_process(proc.pop("kind"), **proc)
        self.grid_times = [float(t) for t in manifest["grid"]["times"]]
        want = block_times_for(self.grid_times, scfg.num_steps, scfg.time_labels, self.process.model_time)
        if not torch.allclose(torch.tensor(want), torch.tensor(scfg.block_times)):
            raise ValueError(f"the student's block times {scfg.block_times} do not match the recording's grid "
                             f"{self.grid_times} ({cfg.recording}): it was distilled on another grid")
        if cfg.gan_steps == "all" and scfg.target != "state":
            raise ValueError("GANConfig.gan_steps 'all' needs a student with target 'state': x0-prediction "
                             "targets of intermediate steps are not samples of the data distribution")
        self.recording_id = recording_id(manifest)
        self.real = open_real(cfg.real, cfg.verify_shards, image_size=spec.shape[-1])
        if cfg.verify_shards and dist.world_size() > 1:  # torchrun: the ranks hash the shards once between them
            from ardistill.data.trajectories import verify_split
            stores = [self.data] + ([self.real.store] if isinstance(self.real, LatentReal) else [])
            verify_split(stores, dist.rank(), dist.world_size(), dist.all_gather_object)
        if self.real.shape != spec.shape or self.real.num_classes != tc.num_classes:
            raise ValueError(f"real data {cfg.real}: images {self.real.shape} with {self.real.num_classes} classes, "
                             f"the teacher's are {spec.shape} with {tc.num_classes}")
        self.scfg, self.S = scfg, scfg.num_steps
        if cfg.loss_weights and len(cfg.loss_weights) != self.S:
            raise ValueError(f"GANConfig.loss_weights has {len(cfg.loss_weights)} entries, the student has S = {self.S}")
        self.weights = torch.tensor(cfg.loss_weights or [1.0] * self.S, device=device)

        # discriminator: frozen feature network (never wrapped, never optimized) + trainable heads
        self.dcfg = discriminator_config_for(teacher, cfg.disc_blocks, cfg.head_channels, cfg.head_kernel,
                                             cfg.head_cmap)
        self.features = TeacherFeatures(teacher, self.dcfg.tapped_blocks).to(device)
        del teacher
        torch.manual_seed(cfg.seed)  # the heads' initialisation is the same on every rank
        self.heads = DiscriminatorHeads(self.dcfg).to(device).train()
        torch.manual_seed(cfg.seed + dist.rank())

        self.student = ARDStudent(scfg)
        if start_weights is not None:
            self.student.load_state_dict(start_weights, strict=True)
        self.student = self.student.to(device).train()
        self.ema = EMA(self.student, cfg.ema_decay, cfg.ema_warmup)
        # fsdp: the student (and its EMA copy) per transformer block, the discriminator per head; the frozen
        # feature network stays replicated (no gradients or moments to shard)
        self.g_model = wrap_parallel(self.student, device, cfg.parallel, None, ("sample",), (self.ema.module,))
        self.d_model = wrap_parallel(self.heads, device, cfg.parallel, ("heads",))
        self.sharded = sharded_world(cfg.parallel)
        self.g_params = [p for p in self.student.parameters() if p.requires_grad]
        self.d_params = list(self.heads.parameters())
        self.opt_g = torch.optim.AdamW(self.g_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.Adam(self.d_params, lr=cfg.d_lr, betas=cfg.d_betas)
        micro = cfg.batch_size // (world * cfg.grad_accum)
        self.order = EpochBatches(len(self.data), micro, cfg.grad_accum, cfg.seed)
        self.real_order = EpochBatches(len(self.real), micro, cfg.grad_accum, cfg.seed + 1)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # step choice, latent flips: the same on every rank
        self.step, self.collapse_count = 0, 0
        self.window = self._new_window()
        if state is not None:
            self._restore(latest, state)
        elif dist.is_main():
            atomic_write_json(self.run_dir / "config.json", {
                "gan": cfg.to_dict(), "student": scfg.to_dict(), "discriminator": self.dcfg.to_dict(),
                "world_size": world, "start": {"path": str(self.start_file), "sha256": sha256_file(self.start_file)},
                "real": self.real.identity(),
                "recording": {"count": len(self.data), "grid": manifest["grid"], "sampler": manifest["sampler"]}})
        self.logger = RunLogger(self.run_dir, cfg.tensorboard, resume_step=self.step if state is not None else None)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _new_window(self) -> dict:
        return {"sum": torch.zeros(self.S + len(_STATS), dtype=torch.float64), "n": 0, "busy": 0.0,
                "grad_norm": 0.0, "d_grad_norm": 0.0}

    def _restore(self, folder: Path, state: dict) -> None:
        if state["recording_id"] != self.recording_id:
            raise ValueError(f"{folder} was trained on another recording than {self.cfg.recording} (content differs)")
        if state["real"] != self.real.identity():
            raise ValueError(f"{folder} was trained on other real data ({state['real']}) than {self.cfg.real} "
                             f"({self.real.identity()})")
        if DiscriminatorConfig.from_dict(state["disc_config"]) != self.dcfg:
            raise ValueError(f"{folder}: the discriminator config saved there differs from the one this run builds")
        if state.get("checkpoint_format") == DCP_FORMAT:  # sharded (fsdp) checkpoint: any process count, any mode
            load_sharded(folder / DCP_DIR, self._modules(), self._optimizers())
        else:  # whole weights and optimizers numbered by parameter: sharded on load under fsdp
            for module, name in ((self.student, "student"), (self.ema.module, "ema")):
                _, weights, _ = read_student_file(folder / f"{name}.safetensors")
                load_full_state_dict(module, weights)
            heads, _, _ = load_state_and_config(folder / "disc_heads.safetensors")
            load_full_state_dict(self.heads, heads)
            load_indexed_optimizer(self.student, self.opt_g, state["opt_g"])
            load_indexed_optimizer(self.heads, self.opt_d, state["opt_d"])
        self.ema.num_updates = int(state["ema_updates"])
        for opt, lr in ((self.opt_g, self.cfg.lr), (self.opt_d, self.cfg.d_lr)):  # may be changed on resume
            for group in opt.param_groups:
                group["lr"] = lr
        self.order.load_state_dict(state["data"])
        self.real_order.load_state_dict(state["real_data"])
        restore_rng(state["rng"], {"gan": self.gen})
        self.step, self.collapse_count = int(state["step"]), int(state["collapse_count"])
        w = state["window"]
        self.window = {"sum": w["sum"].clone(), "n": int(w["n"]), "busy": float(w["busy"]),
                       "grad_norm": float(w["grad_norm"]), "d_grad_norm": float(w["d_grad_norm"])}

    def _modules(self) -> dict:
        return {"student": self.student, "ema": self.ema.module, "disc_heads": self.heads}

    def _optimizers(self) -> dict:
        return {"opt_g": (self.student, self.opt_g), "opt_d": (self.heads, self.opt_d)}

    def _save(self) -> None:
        """Checkpoint the state after ``self.step`` steps (all ranks call; rank 0 writes, every rank its shards)."""
        norms = torch.stack(torch._foreach_norm([local(p) for p in self.g_params + self.d_params]))
        # never overwrite a good checkpoint with broken weights; sharded, each rank sees only its shards: all check
        if self.sharded or not bool(torch.isfinite(norms).all()):
            check_finite(norms.sum().reshape(1), self.step - 1, "parameter norm", self.last_ckpt)
        state = {"step": self.step,
                 "ema_updates": self.ema.num_updates, "data": self.order.state_dict(),
                 "real_data": self.real_order.state_dict(), "rng": capture_rng({"gan": self.gen}),
                 "config": self.cfg.to_dict(), "student_config": self.scfg.to_dict(),
                 "disc_config": self.dcfg.to_dict(), "recording_id": self.recording_id, "real": self.real.identity(),
                 "collapse_count": self.collapse_count, "world_size": dist.world_size(), "window": self.window}
        if self.cfg.parallel == "fsdp":
            state["checkpoint_format"] = DCP_FORMAT
            files, sharded = {}, {DCP_DIR: lambda p: save_sharded(p, self._modules(), self._optimizers())}
        else:
            state.update(opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict())
            files, sharded = self._weight_files({"step": self.step}), None
        self.last_ckpt = self.ckpt.save(self.step, files, state, sharded)

    def _weight_files(self, meta: dict) -> dict:
        """Single-file weights (name -> writer); gathered from the shards under fsdp (a collective: all ranks call)."""
        sd = {name: full_state_dict(m) for name, m in self._modules().items()}
        return {"student.safetensors": lambda p: save_student(p, self.student, meta, state_dict=sd["student"]),
                "ema.safetensors": lambda p: save_student(p, self.ema.module, meta, state_dict=sd["ema"]),
                "disc_heads.safetensors": lambda p: save_model(self.heads, self.dcfg.to_dict(), p, kind=DISC_HEADS_KIND,
                                                               extra_metadata=meta, state_dict=sd["disc_heads"])}

    # ---- pieces of a step -----------------------------------------------------------------------
    def _noise_levels(self, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(step index k (B,), process time t (B,) float64, re-noise the fake (B,) bool) per sample.

        The final output (k = S-1) is noised to t ~ U(feature_noise) of the time range; an
        intermediate ODE state (``gan_steps="all"``) is already at its grid time and is seen there.
        """
        S, (lo, hi) = self.S, self.cfg.feature_noise
        if self.cfg.gan_steps == "last":
            k = torch.full((B,), S - 1, dtype=torch.long)
        else:
            k = torch.randint(0, S, (B,), generator=self.gen)
        u = torch.rand(B, dtype=torch.float64) * (hi - lo) + lo
        t_final = (u * (self.process.num_timesteps - 1)).round() if isinstance(self.process, VPProcess) else u
        grid = torch.tensor(self.grid_times[1:], dtype=torch.float64)  # time of output k is grid time k + 1
        last = k == S - 1
        return k, torch.where(last, t_final, grid[k]), last

    def _noised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.process.q_sample(x, t.to(x.device), torch.randn_like(x)).to(x.dtype)

    def _model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.process.model_time(t).to(self.device)

    def _rollout(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The student's own trajectory from the batch's noise (KV-cached, no gradient): (B, S, C, H, W)."""
        with torch.no_grad(), autocast(self.device, self.precision):
            return self.student.sample(x[:, 0], y, return_all=True).to(x.dtype)

    def _micro_step(self, x, target, y, xr, yr, gan_on: bool, sync: bool, n_micro: int) -> torch.Tensor:
        """Generator and discriminator backward for one micro-batch; returns its stats vector."""
        cfg, dev, B = self.cfg, self.device, x.shape[0]
        k, t, renoise = self._noise_levels(B)
        t_model, renoise = self._model_time(t), renoise.to(dev).view(B, 1, 1, 1)
        rows = torch.arange(B, device=dev)

        # ---- generator: L_reg (+ lambda L_G)
        free = self._rollout(x, y) if cfg.fakes == "free" else None
        with sync_gradients(self.g_model, sync):
            with autocast(dev, self.precision):
                if free is not None and gan_on:  # one pass over [teacher history; own history]
                    own = torch.cat([x[:, :1], free[:, :-1]], dim=1)
                    both = self.g_model(torch.cat([x, own]), torch.cat([y, y]))
                    pred, fake_src = both[:B], both[B:]
                else:
                    pred = self.g_model(x, y)
                    fake_src = free if free is not None else pred
            loss_reg, per_step = distill_loss(pred, target, self.weights)
            fake = fake_src[rows, k.to(dev)]
            if gan_on:
                x_fake = torch.where(renoise, self._noised(fake, t), fake)
                with autocast(dev, self.precision):
                    fake_feats = self.features(x_fake, t_model, y)  # gradient flows through the frozen net
                    loss_g = hinge_g_loss(self.heads(fake_feats, y))
                # dL_G/d(fake) once, through heads and frozen network (no parameter of either gets a
                # gradient); the surrogate <fake, dL_G/dfake> has L_G's gradient for every student
                # weight, so the adaptive weight and the backward below do not repeat that pass.
                g_fake, = torch.autograd.grad(loss_g, fake)
                surrogate = (fake.float() * g_fake.float()).sum()
                last = last_head_weight(self.student)
                if local(last) is not last:  # FSDP2 keeps the root's weights whole from forward to backward
                    raise RuntimeError("the student's last head weight is sharded between its forward and backward; "
                                       "the adaptive GAN weight needs it whole (use --parallel ddp)")
                lam = adaptive_weight(loss_reg, surrogate, last, cfg.gan_factor,
                                      cfg.gan_weight_max, reduce=_mean_over_ranks)
                total = loss_reg + lam * surrogate
            else:
                lam, total = torch.zeros((), device=dev), loss_reg
            (total / n_micro).backward()

        # ---- discriminator: real vs the same fakes (detached), at the same noise levels
        with torch.no_grad(), autocast(dev, self.precision):
            if gan_on:
                fake_feats = [f.detach() for f in fake_feats]
            else:
                fake = fake.detach()
                fake_feats = self.features(torch.where(renoise, self._noised(fake, t), fake), t_model, y)
            real_feats = self.features(self._noised(xr, t), t_model, yr)
        with sync_gradients(self.d_model, sync):
            with autocast(dev, self.precision):
                logits = self.d_model([torch.cat([r, f]) for r, f in zip(real_feats, fake_feats)], torch.cat([yr, y]))
            lr_, lf = logits[:B].float(), logits[B:].float()
            loss_d, d_real, d_fake = hinge_d_loss(lr_, lf)
            (loss_d / n_micro).backward()
        acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
        extra = torch.stack([lam.float(), loss_d, d_real, d_fake, lr_.mean(), lf.mean(), acc]).detach()
        return torch.cat([per_step.detach().float(), extra])

    def _train_step(self) -> tuple[torch.Tensor, float, float]:
        """One optimizer step of G and D; returns (global stats, G gradient norm, D gradient norm)."""
        cfg, dev = self.cfg, self.device
        gan_on = cfg.gan_factor > 0 and self.step >= cfg.gan_warmup
        micro, real_micro = self.order.next_step(), self.real_order.next_step()
        stats = torch.zeros(self.S + len(_STATS), device=dev)

        def batch() -> str:  # for the NaN guard: which stored records this rank trained on
            text = self.data.describe_batch(np.concatenate([np.asarray(i, dtype=np.int64) for i in micro]))
            if isinstance(self.real, LatentReal):
                text += "; " + self.real.store.describe_batch(np.concatenate([np.asarray(i) for i in real_micro]))
            return text

        for m, (idx, ridx) in enumerate(zip(micro, real_micro)):
            b = self.data.batch(idx)
            x, target, y = (b[key].to(dev, non_blocking=True) for key in ("inputs", "targets", "label"))
            xr, yr = self.real.batch(ridx, self.gen)
            stats += self._micro_step(x, target, y, xr.to(dev), yr.to(dev), gan_on, m == len(micro) - 1, len(micro))
        stats = dist.all_reduce_sum(stats / (len(micro) * dist.world_size()))
        check_finite(stats, self.step, "losses", self.last_ckpt, batch)  # before any weight changes
        norms = []
        for params, clip in ((self.g_params, cfg.grad_clip), (self.d_params, cfg.d_grad_clip)):
            norms.append(full(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)))
        check_finite(torch.stack(norms), self.step, "gradient norms (generator, discriminator)", self.last_ckpt, batch)
        for opt in (self.opt_g, self.opt_d):
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.ema.update(self.student)
        self.step += 1
        return stats.double().cpu(), float(norms[0]), float(norms[1])

    # ---- the loop -------------------------------------------------------------------------------
    def _log(self) -> dict:
        w, S = self.window, self.S
        mean = (w["sum"] / max(w["n"], 1)).tolist()
        per_step, extra = mean[:S], dict(zip(_STATS, mean[S:]))
        loss = float((torch.tensor(per_step) * self.weights.cpu()).mean())
        scalars = {"loss": loss, **{f"loss/step_{k + 1}": v for k, v in enumerate(per_step)}, **extra,
                   "loss_g": -extra["logit/fake"], "lr": self.opt_g.param_groups[0]["lr"],
                   "d_lr": self.opt_d.param_groups[0]["lr"], "grad_norm": w["grad_norm"],
                   "d_grad_norm": w["d_grad_norm"], "samples_per_s": w["n"] * self.order.global_batch / max(w["busy"], 1e-9)}
        # collapse guard: only once the generator feels D (after the warm-up)
        collapsed = self.step > self.cfg.gan_warmup and extra["loss_d"] < self.cfg.collapse_d_loss
        self.collapse_count = self.collapse_count + 1 if collapsed else 0
        scalars["collapse_count"] = self.collapse_count
        self.logger.log(self.step, scalars)
        self.window = self._new_window()
        return scalars

    def run(self) -> GANResult:
        cfg = self.cfg
        bar = progress(cfg.steps, self.step, cfg.progress)
        last = {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                stats, gn, dgn = self._train_step()
                w = self.window
                w["busy"] += time.perf_counter() - t0
                w["sum"] += stats
                w["n"] += 1
                w["grad_norm"], w["d_grad_norm"] = gn, dgn
                bar.update(1)
                tripped = False
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    last = self._log()
                    bar.set_postfix(loss=f"{last['loss']:.4g}", d=f"{last['loss_d']:.3g}", w=f"{last['gan_weight']:.3g}")
                    if self.collapse_count >= cfg.collapse_patience:
                        tripped = True
                        msg = (f"discriminator collapse suspected at step {self.step}: D loss "
                               f"{last['loss_d']:.4g} < {cfg.collapse_d_loss} for {self.collapse_count} logs in a row")
                        if dist.is_main():
                            warnings.warn(msg)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or (tripped and cfg.stop_on_collapse):
                    self._save()
                if tripped and cfg.stop_on_collapse:
                    raise DiscriminatorCollapseError(f"{msg}; stopped (stop_on_collapse) after writing {self.last_ckpt}")
        finally:
            bar.close()
            self.logger.close()
        files = self._weight_files({"step": self.step})  # all ranks: gathered from the shards under fsdp
        if dist.is_main():  # the finished run's weights beside the checkpoints, for load_student(run_dir)
            for name, write in files.items():
                write(self.run_dir / name)
        dist.barrier()
        return GANResult(run_dir=self.run_dir, step=self.step, loss=last.get("loss", float("nan")),
                         loss_d=last.get("loss_d", float("nan")), gan_weight=last.get("gan_weight", float("nan")),
                         ema_path=self.run_dir / "ema.safetensors", student_path=self.run_dir / "student.safetensors",
                         disc_path=self.run_dir / "disc_heads.safetensors")


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return dist.all_reduce_sum(t.clone()) / dist.world_size() if dist.is_distributed() else t
