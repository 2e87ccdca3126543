"""Shard checks of issue 22: torchrun ranks share the hashing; demo and sweep pass --no-verify-shards on."""

from __future__ import annotations

from pathlib import Path

import pytest

import ardistill.data.sharded_records as sharded_records
from ardistill.data.record import RecordConfig, record
from ardistill.data.shard_files import CorruptRecordingError, shard_name
from ardistill.data.sharded_records import verify_split
from ardistill.data.trajectory_dataset import TrajectoryDataset


@pytest.fixture
def recording(tmp_path, random_dit) -> Path:
    rec = tmp_path / "rec"
    record(random_dit(), rec, RecordConfig(count=21, num_steps=3, teacher_steps=6, shard_size=4, batch_size=4),
           progress=False)
    return rec


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(raw))


def _run_ranks(rec: Path, world: int, monkeypatch):
    """What ``world`` torchrun ranks do, in one process: rank r hashes its share inside verify_split, and the
    gather hands it the other ranks' results (computed beforehand, as the collective would deliver them)."""
    datasets = [TrajectoryDataset(rec) for _ in range(world)]
    others = [TrajectoryDataset(rec).verify_share(r, world) for r in range(world)]
    hashed: list[str] = []
    real = sharded_records.sha256_file
    monkeypatch.setattr(sharded_records, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    outcomes = []
    for r, d in enumerate(datasets):
        try:
            verify_split([d], r, world, gather=lambda mine, r=r: [mine if q == r else others[q] for q in range(world)])
            outcomes.append(None)
        except CorruptRecordingError as e:
            outcomes.append(str(e))
    return datasets, hashed, outcomes


def test_ranks_hash_each_shard_once_between_them(recording, monkeypatch):
    datasets, hashed, outcomes = _run_ranks(recording, 2, monkeypatch)
    assert sorted(hashed) == [shard_name(k) for k in range(6)]  # 21 records in shards of 4: each hashed once
    assert outcomes == [None, None]
    hashed.clear()
    for d in datasets:  # every shard counts as verified on every rank: reading hashes nothing more
        d.batch(list(range(21)))
    assert hashed == []


def test_a_bad_shard_found_by_one_rank_stops_every_rank(recording, monkeypatch):
    _flip(recording / shard_name(3))  # rank 1's share of 2
    _, _, outcomes = _run_ranks(recording, 2, monkeypatch)
    assert all(o is not None and shard_name(3) in o and "checksum mismatch" in o for o in outcomes), outcomes
    assert outcomes[0] == outcomes[1]


def test_single_process_still_checks_lazily(recording, monkeypatch):
    hashed: list[str] = []
    real = sharded_records.sha256_file
    monkeypatch.setattr(sharded_records, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    d = TrajectoryDataset(recording)
    assert hashed == []
    d.batch([0, 1])
    assert hashed == [shard_name(0)]


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_demo_and_sweep_pass_no_verify_shards_to_their_stages(command):
    from ardistill.cli import _compare_config, build_parser
    args = build_parser().parse_args([command, "--no-verify-shards"])
    cfg = _compare_config(args, {}, "runs/x")
    assert cfg.student["verify_shards"] is False and cfg.gan["verify_shards"] is False
    on = _compare_config(build_parser().parse_args([command]), {}, "runs/x")
    assert "verify_shards" not in on.student and "verify_shards" not in on.gan


def test_the_opt_out_does_not_change_which_student_a_sweep_reuses(recording):
    from ardistill.comparison import training_key
    base = dict(recording=str(recording), teacher="t.safetensors", steps=5)
    assert training_key(base) == training_key({**base, "verify_shards": False}) == training_key({**base, "compile": True})
