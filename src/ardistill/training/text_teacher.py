"""Train a text-conditioned DiT teacher (PixArt form) on the embedded two-digit benchmark (``train-teacher --task t2i``).

Loss: E_{x0, caption, t, eps} |eps_theta(x_t, t, text') - eps|^2 on DiT's VP process, t uniform on
0..999, where text' is the caption's encoding, replaced by the null text (the encoder's empty
prompt) with probability ``caption_dropout_prob`` so that classifier-free guidance works. The data
are ``train_pairs`` examples of data/digit_pairs.py drawn once from ``data_seed`` (training images of
the digits split, the seen pairs only); captions are encoded once by the fixed word encoder
(data/text_encoder.py), whose spec is stored in the checkpoint. AdamW, warm-up then cosine decay,
gradient clipping, EMA of the weights: the recipe of training/teacher.py, whose ``learning_rate`` is
reused. Every draw comes from one seeded ``torch.Generator`` whose state is checkpointed, so a
resumed run is bit-identical to an uninterrupted one. Files in ``out_dir``:
  teacher.safetensors   EMA weights; TextDiTConfig and the text encoder's spec in the metadata
  train_state.pt        raw + EMA weights, optimiser, generator, step, losses (for resume)
  config.json           resolved training config, model config, encoder spec and data counts
  losses.json           mean training loss per ``log_every`` steps
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ardistill.data.digit_pairs import HELDOUT_PAIRS, PAIR_HEIGHT, PAIR_WIDTH, make_digit_pairs
from ardistill.data.digits import DIGITS_CHANNELS
from ardistill.data.text_encoder import digits_text_encoder
from ardistill.io.checkpoints import TEXT_TEACHER_KIND
from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.models.text_dit import TextDiT, TextDiT_models, text_dit_config
from ardistill.sampling.diffusion import VPProcess
from ardistill.training.teacher import (CONFIG_FILE, LOSSES_FILE, LR_SCHEDULES, STATE_FILE, TEACHER_FILE,
                                        learning_rate, optimizer_step, start_teacher_run)


@dataclass(frozen=True)
class TextTeacherTrainConfig:
    """Everything that determines a text-teacher training run (saved as config.json beside it)."""

    model: str = "TextDiT-digits"  # a key of text_dit.TextDiT_models (width, depth); the data set the shape
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout_prob: float = 0.1
    train_pairs: int = 30000  # examples drawn once (seen pairs, training digits)
    encoder_width: int = 32
    encoder_seed: int = 0
    seed: int = 0  # initialisation and every training draw
    data_seed: int = 0  # the draw of the training pairs
    split_seed: int = 0  # the digits' train / held-out split (data/digits.py)
    heldout_fraction: float = 0.2
    log_every: int = 100
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.model not in TextDiT_models:
            raise ValueError(f"TextTeacherTrainConfig.model: unknown text DiT size {self.model!r}; "
                             f"choose from {sorted(TextDiT_models)}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "train_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextTeacherTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"TextTeacherTrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TextTeacherTrainConfig: lr must be > 0, weight_decay and grad_clip >= 0 (0 = no clipping)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TextTeacherTrainConfig.lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TextTeacherTrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TextTeacherTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.caption_dropout_prob < 1:
            raise ValueError("TextTeacherTrainConfig.caption_dropout_prob must be in (0, 1): guidance needs the null text")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"TextTeacherTrainConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.encoder_width < 2 or self.encoder_width % 2:
            raise ValueError(f"TextTeacherTrainConfig.encoder_width must be even and >= 2, got {self.encoder_width}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextTeacherTrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TextTeacherTrainConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def text_teacher_model_config(cfg: TextTeacherTrainConfig):
    """The TextDiT config this run trains: the registry size with the benchmark's shape, eps, no learned sigma."""
    return text_dit_config(cfg.model, input_size=(PAIR_HEIGHT, PAIR_WIDTH), in_channels=DIGITS_CHANNELS,
                           caption_channels=cfg.encoder_width, learn_sigma=False, prediction="eps",
                           caption_dropout_prob=cfg.caption_dropout_prob)


def train_text_teacher(cfg: TextTeacherTrainConfig, out_dir: str | Path, resume: bool = True,
                       progress: bool = True) -> Path:
    """Train (or resume) the two-digit text teacher; returns the path of the EMA checkpoint.

    Args:
        cfg: the run's configuration.
        out_dir: folder for the checkpoint, training state, config and losses.
        resume: continue from ``out_dir/train_state.pt`` when it exists (its config must match).
        progress: show a tqdm progress bar.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mcfg = text_teacher_model_config(cfg)
    encoder = digits_text_encoder(width=cfg.encoder_width, seed=cfg.encoder_seed)
    data = make_digit_pairs(cfg.train_pairs, split="train", pairs="seen", seed=cfg.data_seed,
                            data_seed=cfg.split_seed, heldout_fraction=cfg.heldout_fraction)
    text, text_mask = encoder.encode(data.captions)  # once: (n, T, C), (n, T)
    null_text, null_mask = encoder.encode([""], pad_to=text.shape[1])
    process = VPProcess()

    model, ema, opt, gen, start, losses, elapsed = start_teacher_run(lambda: TextDiT(mcfg), cfg, out_dir, resume)
    atomic_write_json(out_dir / CONFIG_FILE, {
        "task": "t2i", "train": cfg.to_dict(), "model": mcfg.to_dict(), "process": asdict(process),
        "text_encoder": encoder.spec(),
        "data": {"name": "digit-pairs", "split": "train", "pairs": "seen", "num_examples": len(data),
                 "heldout_pairs": [list(p) for p in HELDOUT_PAIRS], "text_tokens": int(text.shape[1]),
                 "value_range": [-1, 1], "heldout_fraction": cfg.heldout_fraction, "split_seed": cfg.split_seed},
    })

    model.train()  # no dropout layers: train mode changes nothing but is honest about it
    t0, window = time.time() - elapsed, []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train-teacher t2i")
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = data.images[idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout_prob
        txt = torch.where(drop[:, None, None], null_text, text[idx])
        msk = torch.where(drop[:, None], null_mask, text_mask[idx])
        t = process.sample_train_t(cfg.batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = process.q_sample(x0, t, eps)
        loss = F.mse_loss(model(x_t, process.model_time(t), txt, msk), eps)

        optimizer_step(cfg, step, loss, model, opt, ema)

        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses.append({"step": done, "loss": sum(window) / len(window), "lr": learning_rate(cfg, step)})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save(out_dir, cfg, mcfg, encoder, model, ema, opt, gen, done, losses, time.time() - t0)
    return out_dir / TEACHER_FILE



def _save(out_dir: Path, cfg, mcfg, encoder, model, ema, opt, gen, step: int, losses: list, elapsed: float) -> None:
    """Write the EMA checkpoint (with the encoder spec), then the resume state (each atomically)."""
    from ardistill.io.checkpoints import save_model

    save_model(ema.module, mcfg.to_dict(), out_dir / TEACHER_FILE, kind=TEXT_TEACHER_KIND,
               extra_metadata={"train_config": cfg.to_dict(), "step": step, "weights": "ema",
                               "text_encoder": encoder.spec()})
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "step": step, "losses": losses, "elapsed_s": elapsed,
             "train_config": cfg.to_dict()}
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write_json(out_dir / LOSSES_FILE, {"losses": losses, "step": step, "elapsed_s": round(elapsed, 1)})


def read_text_train_config(path: str | Path) -> TextTeacherTrainConfig:
    """The training config saved in a run folder's config.json."""
    return TextTeacherTrainConfig.from_dict(read_json(path, "text teacher training config")["train"])
