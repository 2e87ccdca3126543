"""Distillation on a text recording: a TextARDStudent learns, saves, reloads, resumes exactly, rolls out on-policy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ardistill.data.prompts import Prompt, TextTrajectoryDataset, write_prompt_store
from ardistill.data.record import TextRecordConfig, record_text
from ardistill.io.checkpoints import TEXT_TEACHER_KIND, save_model
from ardistill.io.student_io import load_student, read_student_file
from ardistill.models.student import TextARDStudent, TextStudentConfig
from ardistill.training.distill import distill, on_policy_inputs
from tiny_teachers import ToyPromptEncoder, flow_text_teacher, tiny_distill_config

C = 32
encoder = ToyPromptEncoder(width=C)  # 5 tokens: "<s>" and up to 4 words


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text_distill")
    teacher = flow_text_teacher()
    save_model(teacher, teacher.cfg.to_dict(), root / "teacher.safetensors", kind=TEXT_TEACHER_KIND)
    items = [Prompt(str(i), p) for i, p in enumerate(["a 1 and a 2", "three then four", "five", "six left seven right"])]
    write_prompt_store(root / "prompts", items, encoder, encoder.identity())
    record_text(teacher, root / "prompts", root / "rec", TextRecordConfig(
        count=12, num_steps=3, teacher_steps=6, solver="euler", cfg_scale=2.0, shard_size=8, batch_size=4, dtype="float32"),
        progress=False)
    return {"recording": str(root / "rec"), "teacher": str(root / "teacher.safetensors"), "root": root}


_cfg = tiny_distill_config  # (rec, run_dir, **overrides) -> DistillConfig


def test_text_distillation_learns_saves_and_resumes_exactly(rec, tmp_path):
    kw = dict(on_policy_prob=0.5, history_layers=1)
    full = distill(_cfg(rec, tmp_path / "full", steps=30, **kw))
    log = [float(x.split(",")[1]) for x in (tmp_path / "full" / "log.csv").read_text().splitlines()[1:]]
    assert log[-1] < 0.7 * log[0], log
    cfg, _, meta = read_student_file(full.ema_path)
    assert isinstance(cfg, TextStudentConfig) and meta["kind"] == "ard-text-student"
    student = load_student(tmp_path / "full")
    assert student.arch.conditioning == "text" and student.cfg.history_layers == 1

    part = _cfg(rec, tmp_path / "part", **kw)
    distill(replace(part, steps=3))
    distill(part, resume=True)
    straight = distill(_cfg(rec, tmp_path / "straight", **kw))
    for name in ("student", "ema"):  # resume replays the same steps with the same kernels: exact by construction
        a, b = load_file(str(tmp_path / "part" / f"{name}.safetensors")), load_file(str(straight.run_dir / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_inputs_roll_out_with_the_caption(rec):
    ds = TextTrajectoryDataset(rec["recording"])
    b = ds.batch([0, 5, 7])
    assert b["text"].shape[:2] == b["text_mask"].shape and b["text_mask"][:, 0].all()
    student = load_student_from_teacher(rec)
    x = on_policy_inputs(student, b["inputs"], b["text"], b["text_mask"])
    assert torch.equal(x[:, 0], b["inputs"][:, 0])
    outs = student.sample(b["inputs"][:, 0], b["text"], b["text_mask"], return_all=True)
    assert torch.equal(x[:, 1:], outs[:, :-1])  # on_policy_inputs calls this same sampler: bit-equal


def load_student_from_teacher(rec) -> TextARDStudent:
    from ardistill.data.trajectory_format import load_manifest
    from ardistill.training.distill import build_distill_student, load_distill_teacher
    m = load_manifest(rec["recording"])
    return build_distill_student(_cfg(rec, "unused"), load_distill_teacher(rec["teacher"], m), m).eval()


def test_a_moved_or_changed_prompt_store_is_named(rec, tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt store of recording"):
        TextTrajectoryDataset(rec["recording"], prompt_store=tmp_path / "nowhere")
    other = tmp_path / "other"
    write_prompt_store(other, [Prompt("0", "x")], encoder, {"name": "toy", "sha256": "0" * 64, "width": C, "max_length": 5})
    with pytest.raises(ValueError, match="not the one recording"):
        TextTrajectoryDataset(rec["recording"], prompt_store=other)


def test_a_damaged_prompt_shard_is_named_at_open(rec, tmp_path):
    """Training draws captions from the whole store within its first batches: its shards are hashed when the
    text recording is opened, so a damaged one is named before any step (not when a batch reaches it)."""
    import shutil

    from ardistill.data.prompts import CorruptPromptStoreError
    from ardistill.data.shard_files import shard_name
    store = tmp_path / "prompts"
    shutil.copytree(rec["root"] / "prompts", store)
    p = store / shard_name(0)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF  # same size: only the checksum sees it
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptPromptStoreError, match=r"shard-000000.npy: checksum mismatch"):
        TextTrajectoryDataset(rec["recording"], prompt_store=store)
    TextTrajectoryDataset(rec["recording"], prompt_store=store, verify_shards=False)  # the opt-out skips it
