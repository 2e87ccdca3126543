"""The settings of a GAN fine-tuning run (``ardistill finetune-gan``): ``GANConfig`` and what may change on resume."""

from __future__ import annotations

from dataclasses import dataclass

from ardistill.training.config_checks import (ConfigDict, check_at_least, check_batch_split, check_betas, check_choices,
                                              check_fraction, check_loss_weights)
from ardistill.training.parallel import check_parallel
from ardistill.training.precision import PRECISIONS

FAKES = ("forced", "free")
GAN_STEPS = ("last", "all")
START_WEIGHTS = ("ema", "student")
# Fields that may change on resume: paths (checked by content), run length, learning rates, logging.
# ``parallel``: DDP and FSDP2 checkpoints resume under either (not bit-identically: other rounding of the average).
RUNTIME_FIELDS = ("student", "recording", "teacher", "real", "run_dir", "steps", "lr", "d_lr", "ckpt_every",
                  "keep_every", "log_every", "tensorboard", "progress", "stop_on_collapse", "verify_shards", "parallel")


@dataclass(frozen=True)
class GANConfig(ConfigDict):
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
        check_choices(self, {"fakes": FAKES, "gan_steps": GAN_STEPS, "start_weights": START_WEIGHTS,
                             "precision": PRECISIONS})
        check_at_least(self, 1, ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "head_channels",
                                 "head_kernel", "head_cmap", "collapse_patience"))
        check_at_least(self, 0, ("gan_factor", "gan_weight_max", "gan_warmup", "weight_decay", "grad_clip",
                                 "d_grad_clip", "keep_every", "seed", "collapse_d_loss"))
        if not (self.lr > 0 and self.d_lr > 0):
            raise ValueError(f"GANConfig: lr and d_lr must be > 0, got {self.lr}, {self.d_lr}")
        check_betas(self, ("betas", "d_betas"))
        lo_hi = self.feature_noise
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"GANConfig.feature_noise must be (lo, hi) with 0 <= lo <= hi <= 1, got {lo_hi}")
        if self.head_kernel % 2 == 0:
            raise ValueError(f"GANConfig.head_kernel must be odd, got {self.head_kernel}")
        check_fraction(self, "ema_decay")
        check_loss_weights(self)
        check_batch_split(self)
