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

Both updates use the parameters from before the step (simultaneous updates). The run's start and
resume, EMA, DDP / FSDP2, atomic checkpoints, RNG, NaN guard, logging and the step loop are trainer.py's
``Trainer``, as in ``distill``; the real images are real_data.py's. A discriminator-collapse guard warns (and optionally stops) when the D loss stays near
zero. Design choices and measurements: docs/gan.md.

Run folder: as ``distill``'s, plus ``disc_heads.safetensors`` beside the student weights.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ardistill.data.sources import EMBEDDED
from ardistill.io import distributed as dist
from ardistill.io.checkpoints import load_state_and_config, save_model
from ardistill.sampling.diffusion import VPProcess, make_process
from ardistill.io.fileio import sha256_file
from ardistill.models.discriminator import (DISC_HEADS_KIND, DiscriminatorConfig, DiscriminatorHeads, TeacherFeatures, adaptive_weight,
                           discriminator_config_for, hinge_d_loss, hinge_g_loss, last_head_weight)
from ardistill.models.student import ARDStudent, StudentConfig, block_times_for
from ardistill.io.student_io import read_student_file, resolve_student_path
from ardistill.training.distill import distill_loss, recording_id
from ardistill.training.gan_config import RUNTIME_FIELDS, GANConfig
from ardistill.training.nan_guard import check_finite
from ardistill.training.parallel import full, local, sync_gradients, wrap_parallel
from ardistill.training.precision import autocast
from ardistill.training.real_data import LatentReal, open_real
from ardistill.training.trainer import (Trainer, command_config, load_run_config, resolve_path,
                                        run_in_process_group)

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
# entry points


def finetune_gan(cfg: GANConfig, resume: bool = False) -> GANResult:
    """Fine-tune a distilled student with regression + GAN as ``cfg`` says; ``resume`` continues exactly.

    Args:
        cfg: the run's settings. On resume they must equal the saved ones except RUNTIME_FIELDS.
        resume: continue from the latest checkpoint of ``cfg.run_dir`` (a fresh start if it has none).
    Works in one process or under torchrun. Raises DiscriminatorCollapseError when the guard trips
    and ``cfg.stop_on_collapse`` (after writing a checkpoint).
    """
    paths = [k for k in ("student", "recording", "teacher", "run_dir", "real") if not (k == "real" and cfg.real in EMBEDDED)]
    cfg = replace(cfg, **{k: resolve_path(getattr(cfg, k)) for k in paths})  # resumable from any directory
    return run_in_process_group(_GANTrainer, cfg, resume)


def load_gan_run_config(run_dir: str | Path) -> GANConfig:
    """The GANConfig of an existing run (from its latest checkpoint, else config.json)."""
    return load_run_config(GANConfig, run_dir, "gan")


def finetune_gan_command(options: dict, resume: bool = False) -> GANResult:
    """`ardistill finetune-gan`: ``options`` are GANConfig fields; with ``resume`` and no ``student``,
    the settings come from the run folder and the given options (runtime fields) apply on top."""
    cfg = command_config(GANConfig, options, resume, ("student", "recording", "teacher", "run_dir"), "gan")
    result = finetune_gan(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.run_dir}: {result.step} steps, regression loss {result.loss:.4g}, D loss {result.loss_d:.4g}, "
              f"GAN weight {result.gan_weight:.4g}; EMA weights {result.ema_path}")
    return result


# ------------------------------------------------------------------------------------------------
# the loop

# the scalars one micro-batch contributes (after the S per-step regression losses)
_STATS = ("gan_weight", "loss_d", "loss_d/real", "loss_d/fake", "logit/real", "logit/fake", "d_accuracy")


class _GANTrainer(Trainer):
    """State of one GAN fine-tuning run; ``run()`` (trainer.Trainer) is the loop."""

    RUNTIME_FIELDS = RUNTIME_FIELDS

    def _build(self, state: dict | None) -> None:
        from ardistill.io.checkpoints import load_any_teacher
        from ardistill.data.record import weights_sha256
        from ardistill.data.trajectory_dataset import StudentDataSpec, TrajectoryDataset
        from ardistill.data.trajectory_format import load_manifest

        cfg, device = self.cfg, self.device
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
        self.manifest = manifest = load_manifest(cfg.recording)
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
            from ardistill.data.sharded_records import verify_split
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

        student = ARDStudent(scfg)
        if start_weights is not None:
            student.load_state_dict(start_weights, strict=True)
        # fsdp: the student (and its EMA copy) per transformer block, the discriminator per head; the frozen
        # feature network stays replicated (no gradients or moments to shard)
        self.g_model = self._train_student(student)
        self.d_model = wrap_parallel(self.heads, device, cfg.parallel, ("heads",))
        self.g_params = [p for p in self.student.parameters() if p.requires_grad]
        self.d_params = list(self.heads.parameters())
        self.opt_g = torch.optim.AdamW(self.g_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.Adam(self.d_params, lr=cfg.d_lr, betas=cfg.d_betas)
        self.order = self._data_order(len(self.data), cfg.seed)
        self.real_order = self._data_order(len(self.real), cfg.seed + 1)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # step choice, latent flips: the same on every rank
        self.collapse_count = 0
        self.window = self._new_window()
        self.last = {}  # the scalars of the last log

    def _run_info(self) -> dict:
        return {"gan": self.cfg.to_dict(), "student": self.scfg.to_dict(), "discriminator": self.dcfg.to_dict(),
                "world_size": dist.world_size(),
                "start": {"path": str(self.start_file), "sha256": sha256_file(self.start_file)},
                "real": self.real.identity(),
                "recording": {"count": len(self.data), "grid": self.manifest["grid"],
                              "sampler": self.manifest["sampler"]}}

    # ---- checkpoints ----------------------------------------------------------------------------
    def _new_window(self) -> dict:
        return {"sum": torch.zeros(self.S + len(_STATS), dtype=torch.float64), "n": 0, "busy": 0.0,
                "grad_norm": 0.0, "d_grad_norm": 0.0}

    def _modules(self) -> dict:
        return {"student": self.student, "ema": self.ema.module, "disc_heads": self.heads}

    def _optimizers(self) -> dict:
        return {"opt_g": (self.student, self.opt_g), "opt_d": (self.heads, self.opt_d)}

    def _generators(self) -> dict:
        return {"gan": self.gen}

    def _check_resumable(self, folder: Path, state: dict) -> None:
        super()._check_resumable(folder, state)
        if state["real"] != self.real.identity():
            raise ValueError(f"{folder} was trained on other real data ({state['real']}) than {self.cfg.real} "
                             f"({self.real.identity()})")
        if DiscriminatorConfig.from_dict(state["disc_config"]) != self.dcfg:
            raise ValueError(f"{folder}: the discriminator config saved there differs from the one this run builds")

    def _read_weights(self, folder: Path, name: str) -> dict:
        if name == "disc_heads":
            return load_state_and_config(folder / "disc_heads.safetensors")[0]
        return super()._read_weights(folder, name)

    def _restore_own(self, state: dict) -> None:
        for opt, lr in ((self.opt_g, self.cfg.lr), (self.opt_d, self.cfg.d_lr)):  # may be changed on resume
            for group in opt.param_groups:
                group["lr"] = lr
        self.real_order.load_state_dict(state["real_data"])
        self.collapse_count = int(state["collapse_count"])
        w = state["window"]
        self.window = {"sum": w["sum"].clone(), "n": int(w["n"]), "busy": float(w["busy"]),
                       "grad_norm": float(w["grad_norm"]), "d_grad_norm": float(w["d_grad_norm"])}

    def _state(self) -> dict:
        return {**self._common_state(), "real_data": self.real_order.state_dict(), "config": self.cfg.to_dict(),
                "student_config": self.scfg.to_dict(), "disc_config": self.dcfg.to_dict(),
                "recording_id": self.recording_id, "real": self.real.identity(), "collapse_count": self.collapse_count,
                "world_size": dist.world_size(), "window": self.window}

    def _weight_writer(self, name: str, state_dict: dict, meta: dict):
        if name != "disc_heads":
            return super()._weight_writer(name, state_dict, meta)
        return lambda p: save_model(self.heads, self.dcfg.to_dict(), p, kind=DISC_HEADS_KIND, extra_metadata=meta,
                                    state_dict=state_dict)

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

    # ---- logging --------------------------------------------------------------------------------
    def _account(self, out: tuple[torch.Tensor, float, float], busy: float) -> None:
        stats, gn, dgn = out
        w = self.window
        w["busy"] += busy
        w["sum"] += stats
        w["n"] += 1
        w["grad_norm"], w["d_grad_norm"] = gn, dgn

    def _log(self, bar) -> str | None:
        """Log the window's means; returns why to stop (after a checkpoint) when the collapse guard trips
        and ``stop_on_collapse``."""
        cfg, w, S = self.cfg, self.window, self.S
        mean = (w["sum"] / max(w["n"], 1)).tolist()
        per_step, extra = mean[:S], dict(zip(_STATS, mean[S:]))
        loss = float((torch.tensor(per_step) * self.weights.cpu()).mean())
        scalars = {"loss": loss, **{f"loss/step_{k + 1}": v for k, v in enumerate(per_step)}, **extra,
                   "loss_g": -extra["logit/fake"], "lr": self.opt_g.param_groups[0]["lr"],
                   "d_lr": self.opt_d.param_groups[0]["lr"], "grad_norm": w["grad_norm"],
                   "d_grad_norm": w["d_grad_norm"], "samples_per_s": w["n"] * self.order.global_batch / max(w["busy"], 1e-9)}
        # collapse guard: only once the generator feels D (after the warm-up)
        collapsed = self.step > cfg.gan_warmup and extra["loss_d"] < cfg.collapse_d_loss
        self.collapse_count = self.collapse_count + 1 if collapsed else 0
        scalars["collapse_count"] = self.collapse_count
        self.logger.log(self.step, scalars)
        self.window = self._new_window()
        self.last = scalars
        bar.set_postfix(loss=f"{scalars['loss']:.4g}", d=f"{scalars['loss_d']:.3g}", w=f"{scalars['gan_weight']:.3g}")
        if self.collapse_count < cfg.collapse_patience:
            return None
        msg = (f"discriminator collapse suspected at step {self.step}: D loss "
               f"{scalars['loss_d']:.4g} < {cfg.collapse_d_loss} for {self.collapse_count} logs in a row")
        if dist.is_main():
            warnings.warn(msg)
        return msg if cfg.stop_on_collapse else None

    def _stop(self, reason: str) -> None:
        raise DiscriminatorCollapseError(f"{reason}; stopped (stop_on_collapse) after writing {self.last_ckpt}")

    def _result(self) -> GANResult:
        last = self.last
        return GANResult(run_dir=self.run_dir, step=self.step, loss=last.get("loss", float("nan")),
                         loss_d=last.get("loss_d", float("nan")), gan_weight=last.get("gan_weight", float("nan")),
                         ema_path=self.run_dir / "ema.safetensors", student_path=self.run_dir / "student.safetensors",
                         disc_path=self.run_dir / "disc_heads.safetensors")


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return dist.all_reduce_sum(t.clone()) / dist.world_size() if dist.is_distributed() else t
