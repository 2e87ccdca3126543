"""ARD (R+G): discriminator (frozen teacher features + heads), hinge losses, adaptive weight, the fine-tuning loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ardistill.training.finetune_gan as fg
from ardistill.models.dit import DiT
from ardistill.training.finetune_gan import DiscriminatorCollapseError, GANConfig, LatentReal, finetune_gan
from ardistill.models.discriminator import (Discriminator, adaptive_weight, adaptive_weight_from_grads, discriminator_config_for,
                           hinge_d_loss, hinge_g_loss, last_head_weight)
from ardistill.io.student_io import load_student, save_student
from ardistill.training.distill import DistillConfig, build_distill_student
from ardistill.training.checkpointer import Checkpointer
from ardistill.training.nan_guard import NonFiniteLossError
from ardistill.data.trajectory_format import load_manifest
from tiny_teachers import DIGITS, TINY_DIT, random_dit, record_tiny

# the digits' shape (1 x 8 x 8, 10 classes) so that the real data is the embedded digits
TINY = dict(TINY_DIT, **DIGITS)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _teacher(seed: int = 0) -> DiT:
    return random_dit(TINY, seed=seed, std=0.02, seed_torch=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny random teacher, a 16-trajectory recording (S = 4), and an ARD student saved as a weight file."""
    root = tmp_path_factory.mktemp("gan")
    teacher = _teacher()
    record_tiny(root, teacher)
    manifest = load_manifest(root / "rec")
    for name, kw in (("student", dict(history_layers=1)), ("x0", dict(history_layers=1, target="x0", heads="per_step"))):
        dc = DistillConfig(recording=str(root / "rec"), teacher=str(root / "teacher.safetensors"), run_dir="unused", **kw)
        save_student(root / f"{name}.safetensors", build_distill_student(dc, teacher, manifest))
    return {"root": root, "recording": str(root / "rec"), "teacher": str(root / "teacher.safetensors"),
            "student": str(root / "student.safetensors"), "x0": str(root / "x0.safetensors")}


def _cfg(s, run_dir, **kw) -> GANConfig:
    base = dict(student=s["student"], recording=s["recording"], teacher=s["teacher"], run_dir=str(run_dir), steps=6,
                batch_size=4, gan_warmup=2, ema_decay=0.9, ckpt_every=3, log_every=1, tensorboard=False, progress=False)
    return GANConfig(**{**base, **kw})


def _log(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "log.jsonl").read_text().splitlines()]


def _assert_same(a: dict, b: dict):
    """Bit-equal tensors: for runs that replay the same steps with the same kernels in the same process layout
    (a resumed run), where exact equality holds by construction."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# pieces


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - r) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 1.0, -0.5])  # relu(1 + f) = 0, 1, 2, 0.5 -> mean 0.875
    loss, r, f = hinge_d_loss(real, fake)
    assert (r.item(), f.item(), loss.item()) == pytest.approx((0.625, 0.875, 1.5))
    assert hinge_g_loss(fake).item() == pytest.approx(0.375)  # -mean(fake)
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0))[0].item() == 0.0  # perfect D: margin met


def test_adaptive_weight_matches_formula():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||grad L_reg|| = 5
    b = torch.tensor([[0.0, 0.3], [0.4, 0.0]])  # ||grad L_G|| = 0.5
    reg, gan = (w * a).sum() + 1.0, (w * b).sum()
    lam = adaptive_weight(reg, gan, w, factor=10.0)
    assert lam.item() == pytest.approx(10.0 * 5.0 / (0.5 + 1e-4), rel=1e-6)
    assert adaptive_weight(reg, gan, w, factor=10.0, max_weight=2.0).item() == pytest.approx(20.0)  # clamp, then factor
    assert not lam.requires_grad
    # ``reduce`` sees each gradient (the distributed mean), and a loss not reaching the layer counts as 0
    seen = []
    adaptive_weight(reg, gan, w, factor=1.0, reduce=lambda g: seen.append(g.clone()) or g)
    assert torch.equal(seen[0], a) and torch.equal(seen[1], b)
    unused = adaptive_weight(reg, torch.ones(()).requires_grad_() * 2, w, factor=1.0, max_weight=7.0)
    assert unused.item() == pytest.approx(7.0)
    assert adaptive_weight_from_grads(a, b, 0.0).item() == 0.0


def test_discriminator_shapes_frozen_features_and_gradient_to_input():
    teacher = _teacher()
    disc = Discriminator(teacher, discriminator_config_for(teacher, blocks=(1,), channels=16, cmap_dim=8))
    assert len(disc.heads.heads) == 1 and len(disc.features.blocks) == 2
    disc.train()
    assert not disc.features.training  # stays in inference mode (no label dropout)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    logits = disc(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3]))
    assert logits.shape == (3, 1, 16)  # (B, heads, tokens)
    hinge_g_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's gradient passes through
    assert all(p.grad is None and not p.requires_grad for p in disc.features.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    # the features are the teacher's own block outputs
    with torch.no_grad():
        h = teacher.embed(x)
        c = teacher.t_embedder(torch.tensor([0, 500, 999])) + teacher.y_embedder(torch.tensor([1, 2, 3]), False)
        for block in teacher.blocks:
            h = block(h, c)
        # the same modules on the same batch (the same path): the default tolerance is looser than needed
        torch.testing.assert_close(disc.features(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3]))[-1], h)
    with pytest.raises(ValueError, match="blocks"):
        discriminator_config_for(teacher, blocks=(2,))


def test_frozen_feature_network_gets_no_updates(setup, tmp_path):
    """Inside the loop (GAN on from step 0): features unchanged, no .grad, in no optimizer, not DDP-wrapped."""
    trainer = fg._GANTrainer(_cfg(setup, tmp_path / "frozen", gan_warmup=0), torch.device("cpu"), resume=False)
    before = {k: v.clone() for k, v in trainer.features.state_dict().items()}
    heads_before = {k: v.clone() for k, v in trainer.heads.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    for _ in range(3):
        stats, _, _ = trainer._train_step()
        assert stats[trainer.S].item() > 0  # the adaptive weight was on
    _assert_same(before, trainer.features.state_dict())
    assert all(p.grad is None and not p.requires_grad for p in trainer.features.parameters())
    optimized = {id(p) for opt in (trainer.opt_g, trainer.opt_d) for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in trainer.features.parameters()}
    assert trainer.d_model is trainer.heads  # one process: no wrapper; under DDP only the heads are wrapped
    # while both trained parts changed
    assert any(not torch.equal(v, trainer.heads.state_dict()[k]) for k, v in heads_before.items())
    assert any(not torch.equal(v, trainer.student.state_dict()[k]) for k, v in student_before.items())
    assert last_head_weight(trainer.student) is trainer.student.heads[-1].linear.weight


@pytest.mark.numerics
def test_generator_gradient_is_regression_plus_weighted_gan_loss(setup, tmp_path):
    """The loop's student gradient (surrogate <fake, dL_G/dfake>) equals d(L_reg + lambda L_G)/dtheta."""
    trainer = fg._GANTrainer(_cfg(setup, tmp_path / "grad", gan_warmup=0), torch.device("cpu"), resume=False)
    b = trainer.data.batch([0, 1, 2, 3])
    x, target, y = b["inputs"], b["targets"], b["label"]
    xr, yr = trainer.real.batch([5, 6, 7, 8], trainer.gen)
    heads_state = {k: v.clone() for k, v in trainer.heads.state_dict().items()}  # incl. spectral-norm vectors
    torch.manual_seed(5)
    stats = trainer._micro_step(x, target, y, xr, yr, gan_on=True, sync=True, n_micro=1)
    params = [p for p in trainer.student.parameters() if p.requires_grad]
    loop_grads = [p.grad.clone() for p in params]
    lam = stats[trainer.S].item()
    assert lam > 0
    # direct: the same noise (same RNG draws in the same order), the same head state
    trainer.heads.load_state_dict(heads_state)
    torch.manual_seed(5)
    k, t, renoise = trainer._noise_levels(4)
    pred = trainer.student(x, y)
    loss_reg, _ = fg.distill_loss(pred, target, trainer.weights)
    fake = pred[torch.arange(4), k]
    x_fake = torch.where(renoise.view(4, 1, 1, 1), trainer._noised(fake, t), fake)
    loss_g = hinge_g_loss(trainer.heads(trainer.features(x_fake, trainer._model_time(t), y), y))
    direct = torch.autograd.grad(loss_reg + lam * loss_g, params)
    for a, b_ in zip(loop_grads, direct):  # equal up to fp32 summation order
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5 * float(b_.abs().max()))


# ------------------------------------------------------------------------------------------------
# the loop


def test_exact_resume_and_logs(setup, tmp_path):
    """k steps, stop, resume to N == N steps straight: student, EMA, D heads, optimizers, logs."""
    kw = dict(fakes="free", gan_steps="all", grad_accum=2, disc_blocks=(0, 1), log_every=2, ckpt_every=3)
    full = finetune_gan(_cfg(setup, tmp_path / "full", **kw))
    assert full.step == 6 and full.disc_path.is_file()
    part = _cfg(setup, tmp_path / "part", **kw)
    finetune_gan(replace(part, steps=4, keep_every=3))
    # as if killed after the checkpoint at step 3, which falls inside a logging window (saved with it)
    ckpts = tmp_path / "part" / "checkpoints"
    (ckpts / "latest.json").write_text(json.dumps({"dir": "step_00000003", "step": 3}))
    import shutil
    shutil.rmtree(ckpts / "step_00000004")
    with pytest.raises(ValueError, match="already holds a run"):
        finetune_gan(part)
    with pytest.raises(ValueError, match="fakes: 'free' -> 'forced'"):
        finetune_gan(replace(part, fakes="forced"), resume=True)
    assert finetune_gan(part, resume=True).step == 6
    for name in ("student", "ema", "disc_heads"):
        _assert_same(load_file(str(tmp_path / "full" / f"{name}.safetensors")),
                     load_file(str(tmp_path / "part" / f"{name}.safetensors")))
    sf, sp = (Checkpointer.load_state(tmp_path / r / "checkpoints" / "step_00000006") for r in ("full", "part"))
    for key in ("opt_g", "opt_d"):
        for va, vb in zip(sf[key]["state"].values(), sp[key]["state"].values()):
            assert all(torch.equal(va[n], vb[n]) for n in va)
    assert sf["data"] == sp["data"] and sf["real_data"] == sp["real_data"]
    lf, lp = _log(tmp_path / "full"), _log(tmp_path / "part")
    assert [r["step"] for r in lp] == [2, 4, 6] and lf == [{**r, "samples_per_s": a["samples_per_s"]}
                                                          for r, a in zip(lp, lf)]
    for key in ("loss", "loss/step_4", "loss_d", "loss_g", "gan_weight", "d_accuracy", "logit/real", "collapse_count"):
        assert key in lf[0]
    assert lf[0]["gan_weight"] == 0.0 and lf[-1]["gan_weight"] > 0  # zero during the warm-up (2 steps)
    student = load_student(tmp_path / "full")  # EMA weights, loadable like any distilled student
    assert torch.isfinite(student.sample(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))).all()
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["real"] == {"kind": "digits", "split": "train", "count": 1438}
    assert saved["discriminator"]["blocks"] == [0, 1] and saved["start"]["path"] == setup["student"]


def test_gan_factor_zero_is_regression_only(setup, tmp_path):
    """The control: factor 0 never turns the GAN term on, but D still trains and is logged."""
    finetune_gan(_cfg(setup, tmp_path / "reg", gan_factor=0.0, steps=3))
    log = _log(tmp_path / "reg")
    assert all(r["gan_weight"] == 0.0 for r in log) and all(r["d_grad_norm"] > 0 for r in log)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(setup, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = fg.distill_loss

    def poisoned(pred, target, weights):  # the 5th regression loss (step 5) is NaN
        calls["n"] += 1
        loss, per_step = real(pred, target, weights)
        return (loss * float("nan"), per_step * float("nan")) if calls["n"] == 5 else (loss, per_step)

    monkeypatch.setattr(fg, "distill_loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses at step 5.*step_00000003"):
        finetune_gan(_cfg(setup, run, steps=8))
    assert Checkpointer(run / "checkpoints").latest().name == "step_00000003"
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoints" / "step_00000003" / "student.safetensors")).values())
    assert not (run / "ema.safetensors").exists()
    monkeypatch.setattr(fg, "distill_loss", real)
    assert finetune_gan(_cfg(setup, run, steps=4), resume=True).step == 4


def test_collapse_guard_warns_and_stops(setup, tmp_path):
    # a threshold no D loss is below can never trip; one every D loss is below trips after `patience` logs
    finetune_gan(_cfg(setup, tmp_path / "ok", collapse_d_loss=0.0, stop_on_collapse=True, steps=3))
    with pytest.warns(UserWarning, match="discriminator collapse suspected") as caught:
        finetune_gan(_cfg(setup, tmp_path / "warn", collapse_d_loss=100.0, collapse_patience=2, steps=5))
    assert ["step 4" in str(w.message) for w in caught] == [True, False]  # warned at steps 4 and 5, ran on
    assert [r["collapse_count"] for r in _log(tmp_path / "warn")] == [0, 0, 1, 2, 3]  # counted after the warm-up
    run = tmp_path / "stop"
    with pytest.raises(DiscriminatorCollapseError, match="step 4"), pytest.warns(UserWarning):
        finetune_gan(_cfg(setup, run, collapse_d_loss=100.0, collapse_patience=2, stop_on_collapse=True, steps=6))
    assert Checkpointer(run / "checkpoints").latest().name == "step_00000004"  # saved before stopping


def test_config_validation_and_incompatible_inputs(setup, tmp_path):
    for kw, field in ((dict(fakes="both"), "fakes"), (dict(gan_steps="first"), "gan_steps"),
                      (dict(feature_noise=(0.5, 0.2)), "feature_noise"), (dict(head_kernel=4), "head_kernel"),
                      (dict(d_betas=(0.0, 1.0)), "d_betas"), (dict(batch_size=6, grad_accum=4), "grad_accum"),
                      (dict(gan_factor=-1), "gan_factor")):
        with pytest.raises(ValueError, match=field):
            _cfg(setup, tmp_path, **kw)
    assert GANConfig.from_dict(_cfg(setup, tmp_path).to_dict()) == _cfg(setup, tmp_path)
    with pytest.raises(ValueError, match="gan_steps 'all' needs a student with target 'state'"):
        finetune_gan(_cfg(setup, tmp_path / "x0", student=setup["x0"], gan_steps="all"))
    with pytest.raises(ValueError, match="blocks"):
        finetune_gan(_cfg(setup, tmp_path / "b", disc_blocks=(5,)))


def test_latent_store_as_real_data(setup, tmp_path):
    from ardistill.data.image_folder import ImageFolder, encode_latents
    from ardistill.data.vae import IdentityCodec
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    encode_latents(ImageFolder(tmp_path / "img", image_size=8), IdentityCodec(3), tmp_path / "lat", batch_size=2,
                   shard_size=4, dtype="float32", progress=False)
    real = LatentReal(tmp_path / "lat")
    x, y = real.batch([0, 5, 1], torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 0]
    assert real.identity()["count"] == 6 and len(real.identity()["content"]) == 64
    with pytest.raises(ValueError, match=r"images \(3, 8, 8\) with 2 classes"):  # not this teacher's latents
        finetune_gan(_cfg(setup, tmp_path / "run", real=str(tmp_path / "lat")))


def test_cli_finetune_gan_and_resume(setup, tmp_path):
    from ardistill.cli import main
    run = tmp_path / "cli"
    args = ["finetune-gan", "--student", setup["student"], "--recording", setup["recording"], "--teacher",
            setup["teacher"], "--run-dir", str(run), "--steps", "2", "--batch-size", "4", "--gan-warmup", "1",
            "--disc-blocks", "1", "--feature-noise", "0", "0.25", "--d-betas", "0.5", "0.9", "--no-progress",
            "--no-tensorboard"]
    assert main(args) == 0
    assert main(["finetune-gan", "--resume", "--run-dir", str(run), "--steps", "3", "--d-lr", "5e-4", "--no-progress"]) == 0
    assert _log(run)[-1]["d_lr"] == 5e-4  # a learning rate changed on resume is used
    assert main(["finetune-gan", "--resume", "--run-dir", str(run), "--fakes", "free"]) == 2  # not a runtime field
    state = Checkpointer.load_state(Checkpointer(run / "checkpoints").latest())
    assert state["step"] == 3 and state["config"]["feature_noise"] == [0.0, 0.25]
    assert state["config"]["d_betas"] == [0.5, 0.9] and state["disc_config"]["blocks"] == [1]


# ------------------------------------------------------------------------------------------------
# processes: torchrun (gloo)


def _env():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_two_process_gloo_finetunes_checkpoints_and_resumes_exactly(setup, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ardistill", "finetune-gan"]
    common = ["--student", setup["student"], "--recording", setup["recording"], "--teacher", setup["teacher"],
              "--batch-size", "4", "--gan-warmup", "1", "--ckpt-every", "2", "--log-every", "1", "--fakes", "free",
              "--no-progress", "--no-tensorboard", "--device", "cpu"]
    cmds = [torchrun + common + ["--run-dir", str(tmp_path / "straight"), "--steps", "4"],
            torchrun + common + ["--run-dir", str(tmp_path / "part"), "--steps", "2"],
            torchrun + ["--resume", "--run-dir", str(tmp_path / "part"), "--steps", "4", "--no-progress"]]
    for cmd in cmds:
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    state = Checkpointer.load_state(Checkpointer(tmp_path / "part" / "checkpoints").latest())
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]["ranks"]) == 2
    # both runs use two processes: the same kernels on the same shards, and gloo's two-rank all-reduce adds
    # the same two numbers (a + b = b + a exactly), so resuming is exact here too
    for name in ("student", "ema", "disc_heads"):
        _assert_same(load_file(str(tmp_path / "straight" / f"{name}.safetensors")),
                     load_file(str(tmp_path / "part" / f"{name}.safetensors")))
    log = _log(tmp_path / "part")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[0]["gan_weight"] == 0 and log[-1]["gan_weight"] > 0
