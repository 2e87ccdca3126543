"""Recording job: seeds and labels, grid, determinism, resume after a crash, torchrun, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ardistill.data.shard_runs as shard_runs
import ardistill.data.shard_runs as shard_runs
from ardistill.io.checkpoints import save_checkpoint_safetensors
from ardistill.data.record import RecordConfig, build_plan, record, weights_sha256
from ardistill.data.shard_files import MANIFEST, PLAN, PROGRESS_DIR, shard_name
from ardistill.data.trajectory_dataset import TrajectoryDataset
from ardistill.data.trajectory_format import load_manifest, verify
from tiny_teachers import random_dit
from tolerances import assert_paths_agree

SMALL = dict(count=21, num_steps=3, teacher_steps=6, shard_size=8, batch_size=4, cfg_scale=1.5)




def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.npy"))}


def manifest_without_time(root: Path) -> dict:
    m = json.loads((root / MANIFEST).read_text())
    m.pop("created")
    return m


def test_seeds_labels_and_class_balance(tmp_path, random_dit):
    teacher = random_dit()
    record(teacher, tmp_path / "a", RecordConfig(**{**SMALL, "count": 30, "base_seed": 100}), progress=False)
    ds = TrajectoryDataset(tmp_path / "a")
    rec = ds.records(range(30))
    assert rec["seed"].tolist() == list(range(100, 130))
    assert np.bincount(rec["label"], minlength=10).tolist() == [3] * 10  # 30 over 10 classes
    record(teacher, tmp_path / "b", RecordConfig(**{**SMALL, "classes": (7, 2)}), progress=False)
    labels = TrajectoryDataset(tmp_path / "b").records(range(21))["label"]
    assert labels.tolist() == [7, 2] * 10 + [7]
    with pytest.raises(ValueError, match=r"classes \[10\] are outside the teacher's 10 classes"):
        record(teacher, tmp_path / "c", RecordConfig(**{**SMALL, "classes": (1, 10)}), progress=False)


def test_plan_names_the_teacher_and_the_ard_grid(random_dit):
    teacher = random_dit()
    plan = build_plan(teacher, RecordConfig(count=8), torch.device("cpu"))
    # the public ARD code: S = 4 of DDIM-25 keeps DDIM indices 15, 10, 5 (t = 624, 416, 208)
    assert plan["grid"]["positions"] == [0, 9, 14, 19, 25]
    assert plan["grid"]["times"] == [999.0, 624.0, 416.0, 208.0, -1.0]
    assert plan["teacher"]["config"] == teacher.cfg.to_dict()
    assert plan["teacher"]["weights_sha256"] == weights_sha256(teacher) != weights_sha256(random_dit(seed=1))
    assert plan["sampler"] == {"process": plan["sampler"]["process"], "solver": "ddim", "teacher_steps": 25,
                               "cfg_scale": 1.5, "guidance_channels": None}
    with pytest.raises(ValueError, match="positions must be 5 strictly increasing"):
        RecordConfig(count=8, positions=(0, 9, 9, 19, 25))


def test_sharding_does_not_change_the_data(tmp_path, random_dit):
    teacher = random_dit()
    record(teacher, tmp_path / "a", RecordConfig(**SMALL), progress=False)
    record(teacher, tmp_path / "b", RecordConfig(**{**SMALL, "shard_size": 4}), progress=False)
    a, b = TrajectoryDataset(tmp_path / "a").records(range(21)), TrajectoryDataset(tmp_path / "b").records(range(21))
    assert len(list((tmp_path / "b").glob("shard-*.npy"))) == 6
    assert a.tobytes() == b.tobytes()  # same micro-batches (shard sizes are multiples of the batch size)


@pytest.mark.numerics
def test_batch_size_changes_bits_only(tmp_path, random_dit):
    # Batch composition changes matmul rounding on CPU, so batch size is part of the settings; the
    # data agree to float32 rounding.
    teacher = random_dit()
    record(teacher, tmp_path / "a", RecordConfig(**{**SMALL, "dtype": "float32"}), progress=False)
    record(teacher, tmp_path / "b", RecordConfig(**{**SMALL, "dtype": "float32", "batch_size": 3}), progress=False)
    a, b = TrajectoryDataset(tmp_path / "a").records(range(21)), TrajectoryDataset(tmp_path / "b").records(range(21))
    # The random teacher's states reach 870, where the former elementwise atol 1e-4 is about one ulp (6e-5):
    # states near zero were held to bit-equality (measured 75% of that bound used on AVX-512). A trajectory
    # carries the rounding of 6 guided steps, each 2w - 1 = 2 times one pass's: gain 12, relative to the scale.
    assert_paths_agree(a["states"], b["states"], gain=12)
    assert_paths_agree(a["x0_preds"], b["x0_preds"], gain=12)


def test_crash_then_resume_writes_what_an_uninterrupted_run_writes(tmp_path, random_dit, monkeypatch):
    teacher = random_dit()
    cfg = RecordConfig(**SMALL)
    record(teacher, tmp_path / "ref", cfg, progress=False)

    real_write, calls = shard_runs.write_shard, []

    def crash_on_third(root, k, start, records):
        calls.append(k)
        if len(calls) == 3:
            # what a kill during the write leaves: a half-written temp file, never a shard
            (Path(root) / f".{shard_name(k)}.x1y2.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        return real_write(root, k, start, records)

    monkeypatch.setattr(shard_runs, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        record(teacher, tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(shard_runs, "write_shard", real_write)
    run = tmp_path / "run"
    assert not (run / MANIFEST).exists() and (run / PLAN).exists()
    assert len(shard_runs.read_progress(run)) == 2
    with pytest.raises(FileNotFoundError, match="unfinished"):
        TrajectoryDataset(run)
    # a kill between a shard's rename and its listing leaves an unlisted shard: it is recorded again
    (run / shard_name(2)).write_bytes(b"not listed")

    summary = record(teacher, run, cfg, progress=False)
    assert summary.status == "resume" and summary.recorded == 21 - 16
    assert shard_bytes(run) == shard_bytes(tmp_path / "ref")
    assert manifest_without_time(run) == manifest_without_time(tmp_path / "ref")
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST] + [shard_name(k) for k in range(3)]
    # killed after the manifest was written but before the clean-up: complete, leftovers removed
    (run / PLAN).write_text("{}")
    (run / PROGRESS_DIR).mkdir()
    (run / PROGRESS_DIR / "rank-00000.json").write_text("{}")
    again = record(teacher, run, cfg, progress=False)
    assert again.status == "complete" and again.recorded == 0
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST] + [shard_name(k) for k in range(3)]


def test_resume_with_other_settings_is_refused(tmp_path, random_dit, monkeypatch):
    teacher = random_dit()
    monkeypatch.setattr(shard_runs, "write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        record(teacher, tmp_path, RecordConfig(**SMALL), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"unfinished recording with other settings \(numerics.batch_size: 4 -> 8\)"):
        record(teacher, tmp_path, RecordConfig(**{**SMALL, "batch_size": 8}), progress=False)
    with pytest.raises(ValueError, match="teacher.weights_sha256"):
        record(random_dit(seed=5), tmp_path, RecordConfig(**SMALL), progress=False)


def test_heun_recording_names_its_last_interval(tmp_path, random_dit):
    """A Heun recording's manifest says which last interval made it (resolved per teacher family); a manifest
    written before the field existed means the Euler last step, so rerunning it is still 'complete'."""
    from ardistill.sampling.diffusion import process_for
    from ardistill.sampling.guidance import make_model_fn
    from ardistill.sampling.ode import randn_from_seeds, solve
    heun = {**SMALL, "count": 8, "solver": "heun", "dtype": "float32"}
    vp, sit = random_dit(), random_dit(prediction="velocity", process="sit")
    assert "heun_last_step" not in build_plan(vp, RecordConfig(**SMALL), torch.device("cpu"))["sampler"]
    assert build_plan(vp, RecordConfig(**heun), torch.device("cpu"))["sampler"]["heun_last_step"] == "euler"
    with pytest.raises(ValueError, match="heun_last_step 'heun' is for flow processes"):
        build_plan(vp, RecordConfig(**heun, heun_last_step="heun"), torch.device("cpu"))
    with pytest.raises(ValueError, match="heun_last_step must be one of .* with solver 'heun'"):
        RecordConfig(**SMALL, heun_last_step="euler")
    for name, teacher, want in (("vp", vp, "euler"), ("sit", sit, "heun")):
        out = tmp_path / name
        record(teacher, out, RecordConfig(**heun), progress=False)
        m = load_manifest(out)
        assert m["sampler"]["heun_last_step"] == want  # SiT's heun2 corrects the last interval, EDM's Heun does not
        noise = randn_from_seeds(list(range(4)), (4, 8, 8))
        ref = solve(make_model_fn(teacher, 1.5), process_for(teacher.cfg), noise,
                    torch.tensor(m["labels"]["classes"][:4]), 6, "heun", heun_last_step=want)
        assert np.array_equal(TrajectoryDataset(out).records(range(4))["states"][:, -1], ref.sample.numpy())
        # a manifest from before the field: the Euler last step
        old = json.loads((out / MANIFEST).read_text())
        del old["sampler"]["heun_last_step"]
        (out / MANIFEST).write_text(json.dumps(old))
        if want == "euler":
            assert record(teacher, out, RecordConfig(**heun), progress=False).status == "complete"
        else:
            with pytest.raises(ValueError, match=r"sampler.heun_last_step: 'euler' -> 'heun'"):
                record(teacher, out, RecordConfig(**heun), progress=False)
            assert record(teacher, out, RecordConfig(**heun, heun_last_step="euler"), progress=False).status \
                == "complete"


# ------------------------------------------------------------------------------------------------
# Subprocess tests: the real command line, several processes, a real SIGKILL

CLI = dict(count=96, num_steps=4, teacher_steps=20, shard_size=8, batch_size=4, cfg_scale=1.5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process recording of a saved tiny teacher; returns (teacher path, folder)."""
    tmp = tmp_path_factory.mktemp("record_cli")
    teacher = random_dit(seed=3)  # all weights random: adaLN-Zero would make every trajectory trivial
    path = save_checkpoint_safetensors(teacher, tmp / "teacher.safetensors")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record(teacher, tmp / "ref", RecordConfig(**CLI), progress=False)
    finally:
        torch.set_num_threads(n)
    return path, tmp / "ref"


def cli_args(teacher: Path, out: Path) -> list[str]:
    return ["-m", "ardistill", "record", "--teacher", str(teacher), "--out", str(out), "--device", "cpu",
            "--no-progress", *[a for k, v in CLI.items() for a in (f"--{k.replace('_', '-')}", str(v))]]


def env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(reference, tmp_path):
    teacher, ref = reference
    out = tmp_path / "two"
    # torch.distributed.run takes "-m ardistill" as the module each worker runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *cli_args(teacher, out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "96 trajectories in 12 shard(s)" in proc.stdout
    # two processes but no collective in the arithmetic: each shard is computed by one rank in the same
    # micro-batches as in the single process, with the same kernels on the same inputs: bit-equality is valid
    assert shard_bytes(out) == shard_bytes(ref)
    assert manifest_without_time(out) == manifest_without_time(ref)
    verify(out)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_byte_identical(reference, tmp_path):
    teacher, ref = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, *cli_args(teacher, out)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = out / PROGRESS_DIR / "rank-00000.json"
    deadline = time.monotonic() + 120
    while not progress.exists():  # the first shard has landed and is listed
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard was written within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert not (out / MANIFEST).exists(), "the run finished before the kill; the test needs a longer recording"
    listed = len(shard_runs.read_progress(out))
    assert 1 <= listed < 12

    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"this run recorded {96 - 8 * listed}" in done.stdout
    assert shard_bytes(out) == shard_bytes(ref)
    assert manifest_without_time(out) == manifest_without_time(ref)
    assert load_manifest(out)["count"] == 96
    verify(out)


def test_rerun_of_a_finished_recording_rewrites_a_damaged_shard(tmp_path, random_dit, capsys):
    """A rerun of `record` is how a user makes sure a recording is complete: it checks every shard's
    checksum and records the damaged ones again (byte-identical: the recording is deterministic)."""
    teacher = random_dit()
    cfg = RecordConfig(**SMALL)
    run = tmp_path / "run"
    record(teacher, run, cfg, progress=False)
    good = shard_bytes(run)
    manifest = manifest_without_time(run)
    intact = record(teacher, run, cfg, progress=False)
    assert intact.status == "complete" and intact.recorded == 0 and "checksum verified" in str(intact)
    # flip one byte in the middle of shard 1 (same size: only the checksum can tell)
    data = bytearray((run / shard_name(1)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / shard_name(1)).write_bytes(bytes(data))
    summary = record(teacher, run, cfg, progress=False)
    err = capsys.readouterr().err
    assert summary.status == "repair" and summary.recorded == 8, summary
    assert shard_name(1) in err and "checksum" in err
    assert shard_bytes(run) == good
    assert manifest_without_time(run) == manifest
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST] + [shard_name(k) for k in range(3)]
    verify(run)  # the deep check passes again
    # a missing shard of a finished recording is recorded again too
    (run / shard_name(2)).unlink()
    assert record(teacher, run, cfg, progress=False).status == "repair"
    assert shard_bytes(run) == good
