"""FSDP2 (``--parallel fsdp``): sharded training, DCP checkpoints (exact resume, resharding, DDP <-> FSDP), export.

The multi-process tests launch torchrun with 2 CPU processes over gloo (as tests/test_train.py's DDP test)
at a tiny size: depth 2, width 32, a 16-trajectory recording. Each launch takes some seconds, so the runs
are made once per module and shared by the tests that read them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ardistill.io.student_io import load_student, resolve_student_path, save_student
from ardistill.training.distill import DistillConfig, build_distill_student, distill
from ardistill.training.export import export_checkpoint
from ardistill.training.checkpointer import Checkpointer
from ardistill.training.parallel import DCP_DIR, DCP_FORMAT
from ardistill.data.trajectory_format import load_manifest
from tiny_teachers import DIGITS, TINY_DIT, random_dit, record_tiny, tiny_distill_config

# width 32, depth 2 (4 heads of 8), 8x8 latents with 4 channels: 16 tokens
TINY = dict(TINY_DIT, hidden_size=32)
# the digits' shape, so that a GAN run's real data is the embedded digits
TINY_DIGITS = dict(TINY, **DIGITS)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _recording(root: Path, cfg: dict, std: float = 0.05) -> dict:
    """A random teacher (seed 0, torch's global RNG seeded too) and its TINY_RECORD recording."""
    return record_tiny(root, random_dit(cfg, std=std, seed_torch=True))


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> dict:
    """A tiny random teacher and a 16-trajectory recording of it (S = 4, T = 8)."""
    return _recording(tmp_path_factory.mktemp("fsdp"), TINY)


def _env():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ardistill"]
TORCHRUN_ONE = TORCHRUN[:5] + ["1"] + TORCHRUN[6:]  # FSDP2 sharded over a world of 1
ONE = [sys.executable, "-m", "ardistill"]  # no process group: fsdp trains the plain module


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _distill_args(rec, run_dir, *extra) -> list[str]:
    return ["distill", "--recording", rec["recording"], "--teacher", rec["teacher"], "--run-dir", str(run_dir),
            "--batch-size", "4", "--lr", "1e-3", "--ema-decay", "0.9", "--log-every", "1", "--ckpt-every", "2",
            # accumulation (2 processes x 2 micro-batches of 1) and on-policy rollouts of the (sharded) EMA
            "--grad-accum", "2", "--on-policy-prob", "0.5", "--on-policy-model", "ema",
            "--no-progress", "--no-tensorboard", "--device", "cpu", *extra]


def _resume_args(run_dir, *extra) -> list[str]:
    return ["distill", "--resume", "--run-dir", str(run_dir), "--no-progress", *extra]


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same(a: dict, b: dict):
    """Bit-equal: the same steps replayed with the same kernels in the same process layout."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_close_training(a: dict, b: dict):
    """Two runs of the same steps whose gradient averages were rounded in another order (DDP all-reduce vs
    FSDP2 reduce-scatter, or 2 processes vs 1). As in tests/test_train.py's DDP-vs-one-process test: each
    AdamW step moves a weight by about lr = 1e-3, and AdamW's division by each gradient's own RMS turns
    ~1e-7 relative rounding of a nearly cancelling gradient into up to a step for a few weights, so the
    maximum is no measure; bound the bulk: RMS difference below 1e-6 and fewer than 0.1% of the weights
    more than 1e-6 apart. A wrong shard, a missing reduction or a lost optimizer moment moves most weights
    by ~lr."""
    assert a.keys() == b.keys()
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    rms, far = d.square().mean().sqrt().item(), (d > 1e-6).double().mean().item()
    assert rms < 1e-6 and far < 1e-3, (rms, far, d.max().item())


def _assert_close_losses(la: list[float], lb: list[float]):
    # each logged loss is a float32 mean over the global batch of 4; the weights it is computed with differ
    # only by the rounding above (or not at all for the first step after a resume), so 1e-5 relative
    # (84 ulps) is ample while any wrong batch split or update changes it by > 1e-3
    assert len(la) == len(lb) and max(abs(x - y) / y for x, y in zip(la, lb)) < 1e-5, (la, lb)


# ------------------------------------------------------------------------------------------------
# two processes: runs made once


@pytest.fixture(scope="module")
def runs(rec, tmp_path_factory) -> dict:
    """2-process fsdp: ``straight`` (4 steps), ``part`` (2 steps, then resumed to 4 by 2 processes), and
    copies of ``part`` at step 2 resumed to 4 by one process: ``reshard`` (plain module, no torchrun) and
    ``reshard_torchrun`` (torchrun with one process: FSDP2 over a world of 1)."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    r = {k: root / k for k in ("straight", "part", "reshard", "reshard_torchrun")}
    _run(TORCHRUN + _distill_args(rec, r["straight"], "--steps", "4", "--parallel", "fsdp"))
    _run(TORCHRUN + _distill_args(rec, r["part"], "--steps", "2", "--parallel", "fsdp"))
    shutil.copytree(r["part"], r["reshard"])
    shutil.copytree(r["part"], r["reshard_torchrun"])
    _run(TORCHRUN + _resume_args(r["part"], "--steps", "4"))
    _run(ONE + _resume_args(r["reshard"], "--steps", "4"))
    _run(TORCHRUN_ONE + _resume_args(r["reshard_torchrun"], "--steps", "4"))
    return r


@pytest.mark.slow
def test_two_process_fsdp_checkpoints_are_sharded_and_resume_exactly(runs):
    folder = Checkpointer(runs["part"] / "checkpoints").latest()
    state = Checkpointer.load_state(folder)
    assert state["step"] == 4 and state["world_size"] == 2 and state["checkpoint_format"] == DCP_FORMAT
    assert "optimizer" not in state and len(state["rng"]["ranks"]) == 2
    shards = sorted(p.name for p in (folder / DCP_DIR).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and (folder / DCP_DIR / ".metadata").is_file()
    assert not (folder / "student.safetensors").exists()  # sharded only, until exported
    # the same two processes, the same kernels on the same shards: resuming is exact (gloo's two-rank
    # reduction adds the same two numbers either way)
    for name in ("student", "ema"):
        _assert_same(_weights(runs["straight"] / f"{name}.safetensors"), _weights(runs["part"] / f"{name}.safetensors"))
    assert _losses(runs["straight"]) == _losses(runs["part"])
    log = [json.loads(x) for x in (runs["part"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert 0 < sum(r["on_policy_frac"] for r in log) < 4  # both kinds of micro-batches happened


@pytest.mark.slow
@pytest.mark.parametrize("run", ["reshard", "reshard_torchrun"])
def test_saved_by_two_processes_resumed_by_one(runs, run):
    """Reshard: DCP loads the 2-process shards as whole tensors into one process (plain modules), or as
    the one shard of FSDP2 over a world of 1 (torchrun)."""
    la, lb = _losses(runs["straight"]), _losses(runs[run])
    assert la[:2] == lb[:2]  # written by the 2-process run before the copy
    state = Checkpointer.load_state(Checkpointer(runs[run] / "checkpoints").latest())
    assert state["step"] == 4 and state["world_size"] == 1 and state["checkpoint_format"] == DCP_FORMAT
    # step 3 is the first one after the resume: the weights are the saved ones exactly, only the loss's
    # mean over the batch is summed in another order (one mean of 4 vs the average of two means of 2)
    _assert_close_losses(la[2:], lb[2:])
    for name in ("student", "ema"):
        _assert_close_training(_weights(runs["straight"] / f"{name}.safetensors"),
                               _weights(runs[run] / f"{name}.safetensors"))


@pytest.mark.slow
def test_fsdp_matches_ddp_and_each_resumes_the_others_checkpoints(rec, runs, tmp_path):
    ddp, to_ddp = tmp_path / "ddp", tmp_path / "fsdp-then-ddp"
    _run(TORCHRUN + _distill_args(rec, ddp, "--steps", "2"))  # DDP, single-file checkpoint at step 2
    ddp_step2 = _weights(Checkpointer(ddp / "checkpoints").latest() / "student.safetensors")
    _run(TORCHRUN + _resume_args(ddp, "--steps", "4", "--parallel", "fsdp"))  # DDP checkpoint -> FSDP2
    # the fsdp run's step-2 checkpoint (copied before its resume) continued under DDP
    shutil.copytree(runs["reshard"], to_ddp)
    shutil.rmtree(to_ddp / "checkpoints" / "step_00000004")
    (to_ddp / "checkpoints" / "latest.json").write_text(json.dumps({"dir": "step_00000002", "step": 2}))
    _run(TORCHRUN + _resume_args(to_ddp, "--steps", "4", "--parallel", "ddp"))
    state = Checkpointer.load_state(Checkpointer(to_ddp / "checkpoints").latest())
    assert state["step"] == 4 and "optimizer" in state and state.get("checkpoint_format") is None

    straight = runs["straight"]
    export_checkpoint(straight, step=2, out=tmp_path / "fsdp-step2")
    _assert_close_training(_weights(tmp_path / "fsdp-step2" / "student.safetensors"), ddp_step2)
    for run in (ddp, to_ddp):
        _assert_close_losses(_losses(straight), _losses(run))
        for name in ("student", "ema"):
            _assert_close_training(_weights(straight / f"{name}.safetensors"), _weights(run / f"{name}.safetensors"))


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_is_what_load_student_reads(runs, tmp_path):
    run = runs["straight"]
    folder = Checkpointer(run / "checkpoints").latest()
    with pytest.raises(FileNotFoundError, match="export-checkpoint"):
        resolve_student_path(folder)
    from ardistill.cli import main
    assert main(["export-checkpoint", "--run-dir", str(run)]) == 0  # latest, into the checkpoint folder
    # the final weights were gathered from the shards at the end of the run: the same tensors
    for name in ("student", "ema"):
        _assert_same(_weights(folder / f"{name}.safetensors"), _weights(run / f"{name}.safetensors"))
    student = load_student(folder)  # EMA preferred, as for any checkpoint folder
    ref = load_student(run)
    for (k, a), (_, b) in zip(student.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    paths = export_checkpoint(run, step=2, out=tmp_path / "two")
    assert [p.name for p in paths] == ["student.safetensors", "ema.safetensors"]
    assert load_student(tmp_path / "two", prefer="student").cfg == ref.cfg


# ------------------------------------------------------------------------------------------------
# GAN fine-tuning and teacher training under fsdp, 2 processes


@pytest.fixture(scope="module")
def gan_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-gan")
    r = _recording(root, TINY_DIGITS, std=0.02)
    dc = DistillConfig(recording=r["recording"], teacher=r["teacher"], run_dir="unused", history_layers=1)
    save_student(root / "student.safetensors", build_distill_student(dc, r["teacher_model"], load_manifest(r["recording"])))
    return {**r, "student": str(root / "student.safetensors")}


@pytest.mark.slow
def test_two_process_fsdp_gan_finetuning_resumes_exactly(gan_setup, tmp_path):
    s = gan_setup
    common = ["finetune-gan", "--student", s["student"], "--recording", s["recording"], "--teacher", s["teacher"],
              "--batch-size", "4", "--gan-warmup", "1", "--ckpt-every", "1", "--log-every", "1", "--fakes", "free",
              "--no-progress", "--no-tensorboard", "--device", "cpu", "--parallel", "fsdp"]
    _run(TORCHRUN + common + ["--run-dir", str(tmp_path / "straight"), "--steps", "2"])
    _run(TORCHRUN + common + ["--run-dir", str(tmp_path / "part"), "--steps", "1"])
    _run(TORCHRUN + ["finetune-gan", "--resume", "--run-dir", str(tmp_path / "part"), "--steps", "2", "--no-progress"])
    state = Checkpointer.load_state(Checkpointer(tmp_path / "part" / "checkpoints").latest())
    assert state["step"] == 2 and state["checkpoint_format"] == DCP_FORMAT and "opt_g" not in state
    for name in ("student", "ema", "disc_heads"):
        _assert_same(_weights(tmp_path / "straight" / f"{name}.safetensors"),
                     _weights(tmp_path / "part" / f"{name}.safetensors"))
    log = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[0]["gan_weight"] == 0 and log[1]["gan_weight"] > 0
    paths = export_checkpoint(tmp_path / "part", step=2, out=tmp_path / "export")
    assert [p.name for p in paths] == ["student.safetensors", "ema.safetensors", "disc_heads.safetensors"]
    for p in paths:
        _assert_same(_weights(p), _weights(tmp_path / "part" / p.name))


@pytest.mark.slow
def test_two_process_fsdp_teacher_training_resumes_exactly_and_matches_one_process(tmp_path):
    from ardistill.training.teacher import TeacherTrainConfig, train_teacher
    common = ["train-teacher", "--model", "DiT-T/2", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "1",
              "--log-every", "1", "--checkpoint-every", "1", "--no-progress", "--parallel", "fsdp"]
    _run(TORCHRUN + common + ["--out", str(tmp_path / "straight"), "--steps", "2"])
    _run(TORCHRUN + common + ["--out", str(tmp_path / "part"), "--steps", "1"])
    _run(TORCHRUN + common + ["--out", str(tmp_path / "part"), "--steps", "2"])
    assert not (tmp_path / "part" / "train_state.pt").exists()
    state = Checkpointer.load_state(Checkpointer(tmp_path / "part" / "checkpoints").latest())
    assert state["step"] == 2 and state["checkpoint_format"] == DCP_FORMAT and state["world_size"] == 2
    _assert_same(_weights(tmp_path / "straight" / "teacher.safetensors"), _weights(tmp_path / "part" / "teacher.safetensors"))
    losses = [json.loads((tmp_path / r / "losses.json").read_text())["losses"] for r in ("straight", "part")]
    assert losses[0] == losses[1]
    # one process, the same global batches (every rank draws the whole batch and trains on its half)
    cfg = TeacherTrainConfig(model="DiT-T/2", batch_size=8, lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                             steps=2)
    one = train_teacher(cfg, tmp_path / "one", progress=False)
    one_losses = json.loads((tmp_path / "one" / "losses.json").read_text())["losses"]
    _assert_close_losses([l["loss"] for l in losses[0]], [l["loss"] for l in one_losses])
    _assert_close_training(_weights(tmp_path / "straight" / "teacher.safetensors"), _weights(one))
    paths = export_checkpoint(tmp_path / "part", out=tmp_path / "export")
    _assert_same(_weights(paths[0]), _weights(tmp_path / "part" / "teacher.safetensors"))


# ------------------------------------------------------------------------------------------------
# one process (fast): fsdp falls back to the plain module but keeps DCP checkpoints


def _cfg(rec, run_dir, **kw) -> DistillConfig:
    return tiny_distill_config(rec, run_dir, **{"steps": 4, "grad_accum": 2, "ckpt_every": 2, **kw})


def test_one_process_fsdp_is_the_plain_run_with_dcp_checkpoints(rec, tmp_path):
    """In one process fsdp trains the plain module (bit-identical to ddp) and writes DCP checkpoints that
    resume exactly; a checkpoint of either format resumes under the other."""
    ddp = distill(_cfg(rec, tmp_path / "ddp"))
    fsdp = distill(_cfg(rec, tmp_path / "fsdp", parallel="fsdp"))
    for name in ("student", "ema"):
        _assert_same(_weights(ddp.run_dir / f"{name}.safetensors"), _weights(fsdp.run_dir / f"{name}.safetensors"))
    state = Checkpointer.load_state(Checkpointer(fsdp.run_dir / "checkpoints").latest())
    assert state["checkpoint_format"] == DCP_FORMAT and (fsdp.run_dir / "checkpoints" / "step_00000004" / DCP_DIR).is_dir()
    # stop at step 2 under one mode, resume under the other: exact (one process, the same arithmetic)
    for first, then in (("ddp", "fsdp"), ("fsdp", "ddp"), ("fsdp", "fsdp")):
        run = tmp_path / f"{first}-{then}"
        distill(_cfg(rec, run, steps=2, parallel=first))
        distill(_cfg(rec, run, parallel=then), resume=True)
        for name in ("student", "ema"):
            _assert_same(_weights(ddp.run_dir / f"{name}.safetensors"), _weights(run / f"{name}.safetensors"))
        assert _losses(run) == _losses(ddp.run_dir)


def test_config_refuses_an_unknown_parallel_mode(rec, tmp_path):
    from ardistill.training.finetune_gan import GANConfig
    from ardistill.training.teacher import TeacherTrainConfig
    with pytest.raises(ValueError, match="parallel"):
        _cfg(rec, tmp_path, parallel="zero3")
    with pytest.raises(ValueError, match="parallel"):
        GANConfig(student="s", recording="r", teacher="t", run_dir="d", parallel="tp")
    with pytest.raises(ValueError, match="parallel"):
        TeacherTrainConfig(parallel="fsdp1")


def test_a_failed_sharded_write_leaves_no_partial_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, {}, {"step": 1})

    def broken(path):
        Path(path).mkdir()
        (Path(path) / "__0_0.distcp").write_bytes(b"half")
        raise RuntimeError("shard write failed")

    with pytest.raises(RuntimeError, match="shard write failed"):
        ckpt.save(2, {}, {"step": 2, "checkpoint_format": DCP_FORMAT}, sharded={DCP_DIR: broken})
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["latest.json", "step_00000001"]
    assert ckpt.latest().name == "step_00000001"


def test_a_sharded_checkpoint_without_its_metadata_is_unreadable(rec, tmp_path):
    run = distill(_cfg(rec, tmp_path / "run", parallel="fsdp")).run_dir
    newest = Checkpointer(run / "checkpoints").latest()
    (newest / DCP_DIR / ".metadata").unlink()
    with pytest.warns(UserWarning, match="has no"):
        folder, state = Checkpointer(run / "checkpoints").resume_point()
    assert folder.name == "step_00000002" and state["step"] == 2
