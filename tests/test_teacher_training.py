"""Teacher training on the digits: the loss falls, runs are deterministic, resume is exact, EMA is saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ardistill.training import teacher as tt
from ardistill.io.checkpoints import load_teacher
from ardistill.training.teacher import TeacherTrainConfig, learning_rate, train_teacher

TINY = dict(model="DiT-T/2", batch_size=16, lr=2e-3, warmup_steps=2, log_every=4, checkpoint_every=4)




def test_loss_falls_and_files_are_written(tmp_path):
    cfg = TeacherTrainConfig(steps=40, **{**TINY, "log_every": 10, "checkpoint_every": 40})
    path = train_teacher(cfg, tmp_path, progress=False)
    losses = json.loads((tmp_path / "losses.json").read_text())["losses"]
    assert [l["step"] for l in losses] == [10, 20, 30, 40]
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"] == cfg.to_dict() and config["data"]["num_images"] == 1438
    teacher = load_teacher(path)
    assert (teacher.cfg.input_size, teacher.cfg.in_channels, teacher.cfg.num_classes) == (8, 1, 10)
    assert not teacher.cfg.learn_sigma and teacher.cfg.class_dropout_prob == 0.1


def test_ema_is_what_is_saved_and_it_moves(tmp_path):
    cfg = TeacherTrainConfig(steps=8, ema_decay=0.5, **TINY)
    path = train_teacher(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    saved = load_file(path)
    ema, raw = state["ema"]["module"], state["model"]
    assert state["ema"]["num_updates"] == 8
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(saved[key], ema[key]) and not torch.equal(saved[key], raw[key])
    # adaLN-Zero starts the output layer at zero; the EMA must have moved away from it
    assert saved["final_layer.linear.weight"].abs().sum() > 0


def _interrupt_after(monkeypatch, at_step: int):
    real_save = tt._save

    def save_then_stop(out_dir, cfg, mcfg, model, ema, opt, gen, step, *rest):
        real_save(out_dir, cfg, mcfg, model, ema, opt, gen, step, *rest)
        if step == at_step:
            raise KeyboardInterrupt
    monkeypatch.setattr(tt, "_save", save_then_stop)


@pytest.mark.parametrize("shift", [0, 1])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, shift):
    cfg = TeacherTrainConfig(steps=8, augment_shift=shift, **TINY)
    straight = load_file(train_teacher(cfg, tmp_path / "a", progress=False))
    again = load_file(train_teacher(cfg, tmp_path / "b", progress=False, resume=False))
    assert all(torch.equal(straight[k], again[k]) for k in straight)  # seeded: runs repeat exactly

    _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, tmp_path / "c", progress=False)
    assert torch.load(tmp_path / "c" / "train_state.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    resumed = load_file(train_teacher(cfg, tmp_path / "c", progress=False))
    # resume replays the same steps with the same kernels in one process: exact by construction
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = json.loads((tmp_path / "c" / "losses.json").read_text())["losses"]
    assert [l["step"] for l in losses] == [4, 8]


def test_resume_refuses_a_different_config(tmp_path):
    train_teacher(TeacherTrainConfig(steps=4, **TINY), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different training config"):
        train_teacher(TeacherTrainConfig(steps=8, **{**TINY, "lr": 1e-4}), tmp_path, progress=False)


def test_learning_rate_schedule():
    cfg = TeacherTrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0) and learning_rate(cfg, 100) == pytest.approx(0.1)
    const = TeacherTrainConfig(steps=100, lr=1.0, warmup_steps=0, lr_schedule="constant")
    assert learning_rate(const, 0) == learning_rate(const, 99) == 1.0


@pytest.mark.parametrize("bad, match", [(dict(model="DiT-Q/2"), "unknown DiT size"),
                                        (dict(class_dropout_prob=0.0), "class_dropout_prob"),
                                        (dict(steps=0), "steps"), (dict(lr_schedule="step"), "lr_schedule")])
def test_config_validation_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        TeacherTrainConfig(**bad)


def test_cli_trains_and_resumes(tmp_path, capsys):
    from ardistill.cli import main
    args = ["train-teacher", "--out", str(tmp_path), "--model", "DiT-T/2", "--steps", "4", "--batch-size", "8",
            "--log-every", "2", "--checkpoint-every", "2", "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith("teacher.safetensors")
    assert main(args[:6] + ["6"] + args[7:]) == 0  # extend the run: resumes from step 4
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("command, cls_path", [("train-teacher", "ardistill.training.teacher.TeacherTrainConfig"),
                                               ("train-classifier", "ardistill.evaluation.classifier.ClassifierTrainConfig")])
def test_cli_help_shows_the_config_defaults(command, cls_path):
    """The [default] in each flag's help is the dataclass default the command really uses."""
    import dataclasses
    import importlib
    import re

    from ardistill.cli import build_parser
    module, name = cls_path.rsplit(".", 1)
    defaults = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    shown = {a.dest: re.search(r"\[([^\]]+)\]$", a.help or "") for a in sub._actions if a.dest in defaults}
    assert shown and all(m is not None for m in shown.values()), shown
    for dest, m in shown.items():
        value = defaults[dest]
        if value is None:  # resolved per data set; the help names each case
            continue
        if isinstance(value, bool):
            assert m.group(1) == ("on" if value else "off"), (dest, m.group(1))
            continue
        assert (m.group(1) == value if isinstance(value, str) else float(m.group(1)) == value), (dest, m.group(1))


# ------------------------------------------------------------------ any data: folders, latents, flow, photos

def _folder(root, classes=("b_cat", "a_dog"), per_class=3):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_teacher_resumes_bit_identically(tmp_path, monkeypatch):
    data = _folder(tmp_path / "data")
    cfg = TeacherTrainConfig(steps=8, data=str(data), image_size=8, hflip=True, **TINY)
    straight = load_file(train_teacher(cfg, tmp_path / "a", progress=False))
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, tmp_path / "c", progress=False)
    monkeypatch.undo()
    resumed = load_file(train_teacher(cfg, tmp_path / "c", progress=False))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    teacher = load_teacher(tmp_path / "c" / "teacher.safetensors")
    assert (teacher.cfg.input_size, teacher.cfg.in_channels, teacher.cfg.num_classes) == (8, 3, 2)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["data"]["name"] == "image-folder" and config["data"]["classes"] == ["a_dog", "b_cat"]


def test_latent_store_and_velocity_prediction(tmp_path):
    from ardistill.data.image_folder import ImageFolder, encode_latents
    from ardistill.data.vae import IdentityCodec
    ds = ImageFolder(_folder(tmp_path / "data"), image_size=8)
    encode_latents(ds, IdentityCodec(3), tmp_path / "latents", batch_size=2, shard_size=4, dtype="float32",
                   progress=False)
    cfg = TeacherTrainConfig(steps=4, data=str(tmp_path / "latents"), prediction="velocity", **TINY)
    teacher = load_teacher(train_teacher(cfg, tmp_path / "run", progress=False))
    assert teacher.cfg.prediction == "velocity" and teacher.cfg.in_channels == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["name"] == "latent-store"


def test_photos_teacher_shape(tmp_path):
    teacher = load_teacher(train_teacher(TeacherTrainConfig(steps=2, data="photos", **TINY), tmp_path,
                                         progress=False))
    assert (teacher.cfg.input_size, teacher.cfg.in_channels, teacher.cfg.num_classes) == (16, 3, 10)


def test_bad_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_teacher(TeacherTrainConfig(steps=2, data=str(tmp_path / "nowhere"), **TINY), tmp_path / "r",
                      progress=False)
    with pytest.raises(ValueError, match="digits only"):
        train_teacher(TeacherTrainConfig(steps=2, data="photos", augment_shift=1, **TINY), tmp_path / "r",
                      progress=False)
    with pytest.raises(ValueError, match="prediction"):
        TeacherTrainConfig(prediction="x0")


def test_an_image_folder_teacher_feeds_record_and_distill(tmp_path):
    from ardistill.data.record import RecordConfig, record
    from ardistill.training.distill import DistillConfig, distill
    cfg = TeacherTrainConfig(steps=2, data=str(_folder(tmp_path / "data")), image_size=8, **TINY)
    path = train_teacher(cfg, tmp_path / "t", progress=False)
    record(load_teacher(path), tmp_path / "rec", RecordConfig(count=4, num_steps=2, teacher_steps=8, batch_size=4),
           progress=False)
    res = distill(DistillConfig(recording=str(tmp_path / "rec"), teacher=str(path), run_dir=str(tmp_path / "s"),
                                steps=2, batch_size=2, history_layers=1, progress=False, tensorboard=False))
    assert res.step == 2


def test_a_truncated_training_state_is_named_not_a_raw_traceback(tmp_path):
    from ardistill.training.checkpointer import CheckpointReadError
    cfg = TeacherTrainConfig(steps=4, **TINY)
    train_teacher(cfg, tmp_path, progress=False)
    state = tmp_path / "train_state.pt"
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(CheckpointReadError, match=r"train_state\.pt is unreadable .*delete it"):
        train_teacher(TeacherTrainConfig(steps=8, **TINY), tmp_path, progress=False)
