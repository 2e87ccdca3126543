"""Text-teacher training (exact resume), prompt adherence, and ``ardistill sample --prompt``."""

from __future__ import annotations

import pytest
import torch

from ardistill.cli import main
from ardistill.data.digit_pairs import make_digit_pairs
from ardistill.data.text_encoder import load_text_teacher_and_encoder
from ardistill.evaluation.adherence import prompt_adherence, read_digit_pairs
from ardistill.evaluation.classifier import load_digits_classifier
from ardistill.io.checkpoints import load_state_and_config
from ardistill.training.text_teacher import TextTeacherTrainConfig, train_text_teacher

TINY = dict(model="TextDiT-T", train_pairs=64, batch_size=4, warmup_steps=2, log_every=2, checkpoint_every=2)


def test_resume_is_exact(tmp_path):
    cfg = TextTeacherTrainConfig(steps=4, **TINY)
    straight = train_text_teacher(cfg, tmp_path / "a", progress=False)
    train_text_teacher(TextTeacherTrainConfig(steps=2, **TINY), tmp_path / "b", progress=False)
    resumed = train_text_teacher(cfg, tmp_path / "b", progress=False)
    sa, _, ma = load_state_and_config(straight)
    sb, _, mb = load_state_and_config(resumed)
    # resume replays the same steps with the same kernels in one process: exact by construction
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["step"] == mb["step"] == "4" and ma["kind"] == "text-teacher"
    with pytest.raises(ValueError, match="different training config"):
        train_text_teacher(TextTeacherTrainConfig(steps=4, **dict(TINY, lr=5e-4)), tmp_path / "b", progress=False)


def test_trained_file_carries_its_encoder_and_samples_a_prompt_grid(tmp_path):
    path = train_text_teacher(TextTeacherTrainConfig(steps=2, **TINY), tmp_path / "run", progress=False)
    teacher, encoder = load_text_teacher_and_encoder(path)
    assert teacher.cfg.input_size == (8, 16) and encoder.width == teacher.cfg.caption_channels
    out = tmp_path / "grid.png"
    rc = main(["sample", "--teacher", str(path), "--prompt", "a 4 and a 1", "--prompt", "seven then three",
               "--seeds", "0-2", "--steps", "2", "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 0
    from PIL import Image
    # 2 rows (prompts) x 3 columns (seeds) of 8x16 images at scale 8 with 2-pixel padding
    assert Image.open(out).size == (3 * 128 + 4 * 2, 2 * 64 + 3 * 2)
    assert main(["sample", "--teacher", str(path), "--prompt", "a cat", "--out", str(out)]) == 2


def test_cli_rejects_class_only_flags_for_t2i(tmp_path):
    with pytest.raises(SystemExit, match="--augment-shift"):
        main(["train-teacher", "--task", "t2i", "--out", str(tmp_path), "--augment-shift", "1"])


def test_adherence_reads_real_pairs_and_catches_swaps():
    clf = load_digits_classifier()
    real = make_digit_pairs(300, split="heldout", pairs="all", seed=5)
    good = prompt_adherence(real.images, real.left, real.right, clf)
    assert good.adherence > 0.9 and good.num_samples == 300
    swapped_images = torch.cat([real.images[..., 8:], real.images[..., :8]], dim=3)
    bad = prompt_adherence(swapped_images, real.left, real.right, clf)
    assert bad.swapped > 0.85 and bad.adherence < 0.2
    left, right = read_digit_pairs(real.images[:5], clf)
    assert left.shape == right.shape == (5,)
    with pytest.raises(ValueError, match="300 images"):
        prompt_adherence(real.images, real.left[:3], real.right[:3], clf)


def test_shipped_text_teacher_matches_its_record_and_samples(tmp_path):
    import hashlib
    import json

    from ardistill.assets import DIGITS_T2I_TEACHER, DIGITS_T2I_TEACHER_CONFIG
    record = json.loads(DIGITS_T2I_TEACHER_CONFIG.read_text())
    assert hashlib.sha256(DIGITS_T2I_TEACHER.read_bytes()).hexdigest() == record["sha256"]
    teacher, encoder = load_text_teacher_and_encoder(DIGITS_T2I_TEACHER)
    # fields added to TextDiTConfig after the record was written (issue 15's micro-conditions) must sit at
    # their defaults; every recorded field must match
    from dataclasses import fields as dc_fields
    got = teacher.cfg.to_dict()
    defaults = {f.name: f.default for f in dc_fields(type(teacher.cfg))}
    assert {k: got[k] for k in record["model"]} == record["model"]
    assert all(got[k] == defaults[k] for k in set(got) - set(record["model"]))
    assert encoder.spec() == record["text_encoder"]
    out = tmp_path / "grid.png"
    assert main(["sample", "--prompt", "a 4 and a 1", "--seeds", "0-1", "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
