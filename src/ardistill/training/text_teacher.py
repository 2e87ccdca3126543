"""Train a text-conditioned DiT teacher (PixArt form) on the embedded two-digit benchmark (``train-teacher --task t2i``).

Loss: E_{x0, caption, t, eps} |eps_theta(x_t, t, text') - eps|^2 on DiT's VP process, t uniform on
0..999, where text' is the caption's encoding, replaced by the null text (the encoder's empty
prompt) with probability ``caption_dropout_prob`` so that classifier-free guidance works. The data
are ``train_pairs`` examples of data/digit_pairs.py drawn once from ``data_seed`` (training images of
the digits split, the seen pairs only); captions are encoded once by the fixed word encoder
(data/text_encoder.py), whose spec is stored in the checkpoint. AdamW, warm-up then cosine decay,
gradient clipping, EMA of the weights: the recipe and the trainer of training/teacher.py
(``run_teacher_training``), with the captions (``Captions``) as what the model is conditioned on. It
trains in one process. Every draw comes from one seeded ``torch.Generator`` whose state is
checkpointed, so a resumed run is bit-identical to an uninterrupted one. Files in ``out_dir``:
  teacher.safetensors   EMA weights; TextDiTConfig and the text encoder's spec in the metadata
  train_state.pt        raw + EMA weights, optimiser, generator, step, losses (for resume)
  config.json           resolved training config, model config, encoder spec and data counts
  losses.json           mean training loss per ``log_every`` steps
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ardistill.data.digit_pairs import HELDOUT_PAIRS, PAIR_HEIGHT, PAIR_WIDTH, make_digit_pairs
from ardistill.data.digits import DIGITS_CHANNELS
from ardistill.data.text_encoder import digits_text_encoder
from ardistill.io.checkpoints import TEXT_TEACHER_KIND
from ardistill.io.fileio import read_json
from ardistill.models.text_dit import TextDiT, TextDiT_models, text_dit_config
from ardistill.sampling.diffusion import VPProcess
from ardistill.training.config_checks import check_at_least, check_fraction
from ardistill.training.teacher import TeacherRecipe, check_recipe, run_teacher_training


@dataclass(frozen=True)
class TextTeacherTrainConfig(TeacherRecipe):
    """Everything that determines a text-teacher training run (saved as config.json beside it); the optimisation
    is the class teacher's (``TeacherRecipe``), with its own default length."""

    model: str = "TextDiT-digits"  # a key of text_dit.TextDiT_models (width, depth); the data set the shape
    steps: int = field(default=6000, kw_only=True)
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
        check_at_least(self, 1, ("steps", "batch_size", "log_every", "checkpoint_every", "train_pairs"))
        check_at_least(self, 0, ("warmup_steps",))
        check_recipe(self)
        check_fraction(self, "caption_dropout_prob", "(0, 1)", "guidance needs the null text")
        check_fraction(self, "heldout_fraction", "(0, 1)")
        if self.encoder_width < 2 or self.encoder_width % 2:
            raise ValueError(f"TextTeacherTrainConfig.encoder_width must be even and >= 2, got {self.encoder_width}")


def text_teacher_model_config(cfg: TextTeacherTrainConfig):
    """The TextDiT config this run trains: the registry size with the benchmark's shape, eps, no learned sigma."""
    return text_dit_config(cfg.model, input_size=(PAIR_HEIGHT, PAIR_WIDTH), in_channels=DIGITS_CHANNELS,
                           caption_channels=cfg.encoder_width, learn_sigma=False, prediction="eps",
                           caption_dropout_prob=cfg.caption_dropout_prob)


class Captions:
    """Caption encodings (tokens and mask, encoded once), replaced by the null text (the encoder's empty
    prompt) with probability ``dropout_prob``; the teacher file carries the encoder's spec."""

    kind = TEXT_TEACHER_KIND

    def __init__(self, data, encoder, dropout_prob: float):
        self.data, self.dropout_prob = data, dropout_prob
        self.text, self.text_mask = encoder.encode(data.captions)  # once: (n, T, C), (n, T)
        self.null_text, self.null_mask = encoder.encode([""], pad_to=self.text.shape[1])
        self.file_metadata = {"text_encoder": encoder.spec()}

    def prepare(self, model: torch.nn.Module) -> None:
        model.train()  # no dropout layers: train mode changes nothing but is honest about it

    def draw(self, batch_size: int, gen: torch.Generator, model: torch.nn.Module):
        idx = torch.randint(0, len(self.data), (batch_size,), generator=gen)
        x0 = self.data.images[idx]
        drop = torch.rand(batch_size, generator=gen) < self.dropout_prob
        txt = torch.where(drop[:, None, None], self.null_text, self.text[idx])
        msk = torch.where(drop[:, None], self.null_mask, self.text_mask[idx])
        return x0, (txt, msk)


def train_text_teacher(cfg: TextTeacherTrainConfig, out_dir: str | Path, resume: bool = True,
                       progress: bool = True) -> Path:
    """Train (or resume) the two-digit text teacher; returns the path of the EMA checkpoint.

    Args:
        cfg: the run's configuration.
        out_dir: folder for the checkpoint, training state, config and losses.
        resume: continue from ``out_dir/train_state.pt`` when it exists (its config must match).
        progress: show a tqdm progress bar.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mcfg = text_teacher_model_config(cfg)
    encoder = digits_text_encoder(width=cfg.encoder_width, seed=cfg.encoder_seed)
    data = make_digit_pairs(cfg.train_pairs, split="train", pairs="seen", seed=cfg.data_seed,
                            data_seed=cfg.split_seed, heldout_fraction=cfg.heldout_fraction)
    captions = Captions(data, encoder, cfg.caption_dropout_prob)
    process = VPProcess()
    info = {"task": "t2i", "train": cfg.to_dict(), "model": mcfg.to_dict(), "process": asdict(process),
            "text_encoder": encoder.spec(),
            "data": {"name": "digit-pairs", "split": "train", "pairs": "seen", "num_examples": len(data),
                     "heldout_pairs": [list(p) for p in HELDOUT_PAIRS], "text_tokens": int(captions.text.shape[1]),
                     "value_range": [-1, 1], "heldout_fraction": cfg.heldout_fraction, "split_seed": cfg.split_seed}}
    return run_teacher_training(cfg, out_dir, lambda: TextDiT(mcfg), mcfg, process, captions, info, resume, progress,
                                torch.device("cpu"), "ddp", "train-teacher t2i")


def read_text_train_config(path: str | Path) -> TextTeacherTrainConfig:
    """The training config saved in a run folder's config.json."""
    return TextTeacherTrainConfig.from_dict(read_json(path, "text teacher training config")["train"])
