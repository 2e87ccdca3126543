"""Text recordings: records hold prompt-store rows, guidance uses the stored empty prompt, bytes match the ODE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ardistill.data.prompts import Prompt, PromptStore, store_id, write_prompt_store
from ardistill.data.prompts import trim_text
from ardistill.data.record import TextRecordConfig, record_text
from ardistill.data.trajectory_dataset import TrajectoryDataset
from ardistill.data.trajectory_format import Layout, load_manifest, verify
from ardistill.models.text_dit import TextDiT
from ardistill.sampling.diffusion import VPProcess
from ardistill.sampling.guidance import make_text_model_fn
from ardistill.sampling.ode import randn_from_seeds, solve
from tiny_teachers import ToyPromptEncoder, random_text_dit

L, C = 6, 32
S, T = 2, 4
# a start token, then one hash-seeded token per word; padded with 9s to L
encoder = ToyPromptEncoder(width=C, length=L, pad=9.0, position_stride=97)


def teacher() -> TextDiT:
    return random_text_dit(std=0.1)


@pytest.fixture
def store(tmp_path):
    items = [Prompt(f"p{i}", p) for i, p in enumerate(["a 3 and a 7", "seven then one", "two", "four on the left"])]
    write_prompt_store(tmp_path / "prompts", items, encoder, encoder.identity(), dtype="float32", shard_size=3)
    return tmp_path / "prompts"


def test_text_recording_references_rows_and_matches_the_guided_ode(tmp_path, store):
    model = teacher()
    cfg = TextRecordConfig(count=7, num_steps=S, teacher_steps=T, cfg_scale=3.0, dtype="float32", shard_size=4,
                           batch_size=4, prompt_rows=(2, 4, 1))
    summary = record_text(model, store, tmp_path / "rec", cfg, progress=False)
    assert summary.count == 7 and summary.status == "fresh"
    m = verify(tmp_path / "rec")
    assert m["sampler"]["cfg_scale"] == 3.0 and m["prompts"]["rows"] == [2, 4, 1]
    assert m["prompts"]["store_sha256"] == store_id(store) and "labels" not in m
    # a record holds the seed, the prompt row and the states: never the text embedding
    lay = Layout.from_dict(m["layout"])
    assert lay.condition == "prompt" and lay.record_bytes == 16 + (2 * S + 1) * 1 * 8 * 16 * 4

    ds = TrajectoryDataset(tmp_path / "rec")
    b = ds.batch([4, 5, 6])  # shard 1, one micro-batch
    assert b["prompt"].tolist() == [4, 1, 2] and "label" not in b
    ps = PromptStore(store)
    text, mask = trim_text(*ps.get([4, 1, 2]))
    null_t, null_m = trim_text(*ps.null())
    fn = make_text_model_fn(model, null_t, null_m, 3.0)
    ref = solve(fn, VPProcess(), randn_from_seeds([4, 5, 6], (1, 8, 16)), (text, mask), T, "ddim",
                record_at=m["grid"]["positions"])
    # the recording's own micro-batch, solved again: the same kernels on the same inputs, so bit-equal
    assert torch.equal(b["inputs"], ref.states[:, :S]) and torch.equal(b["targets"], ref.states[:, 1:])


def test_rerun_is_complete_and_other_settings_are_refused(tmp_path, store):
    model = teacher()
    cfg = TextRecordConfig(count=3, num_steps=S, teacher_steps=T, cfg_scale=2.0, shard_size=4, batch_size=4)
    record_text(model, store, tmp_path / "rec", cfg, progress=False)
    assert load_manifest(tmp_path / "rec")["prompts"]["rows"] == [1, 2, 3, 4]  # every prompt, not the null row
    assert record_text(model, store, tmp_path / "rec", cfg, progress=False).status == "complete"
    with pytest.raises(ValueError, match="cfg_scale"):
        record_text(model, store, tmp_path / "rec", TextRecordConfig(**{**vars(cfg), "cfg_scale": 1.0}), progress=False)
    with pytest.raises(ValueError, match="prompt_rows"):
        record_text(model, store, tmp_path / "x", TextRecordConfig(count=2, num_steps=S, teacher_steps=T,
                                                                   prompt_rows=(0,)), progress=False)
    with pytest.raises(ValueError, match="class-conditional"):
        TextRecordConfig(count=2, classes=(1,))


def test_a_corrupt_prompt_store_stops_the_recording(tmp_path, store):
    p = store / "shard-000001.npy"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x55
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-000001.npy: checksum mismatch"):
        record_text(teacher(), store, tmp_path / "rec", TextRecordConfig(count=2, num_steps=S, teacher_steps=T),
                    progress=False)
    assert not (tmp_path / "rec").exists()
    assert np.load(store / "shard-000000.npy", mmap_mode="r").shape == (3,)
