"""Prompt files and the prompt-embedding store: round trip, dtypes, resume, corruption named by shard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ardistill.data.prompts import (NULL_ID, CorruptPromptStoreError, Prompt, PromptStore, read_prompts,
                                    verify_prompt_store, write_prompt_store)
from ardistill.data.shard_files import shard_name

L, C = 6, 8


def toy_encoder(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in encoder: one token per word (hash-seeded), padded to L; nonzero padding values."""
    tokens = torch.full((len(prompts), L, C), 7.0)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        words = p.split()[:L]
        for j, w in enumerate(words):
            g = torch.Generator().manual_seed(sum(map(ord, w)) * 31 + j)
            tokens[i, j] = torch.randn(C, generator=g)
        mask[i, :len(words)] = True
    return tokens, mask


ENCODER = {"name": "toy", "sha256": "0" * 64, "width": C, "max_length": L}


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", prompt=" ".join(["word"] * (i % 4 + 1) + [str(i)])) for i in range(n)]


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("a 3 and a 7\n\nseven then one\n")
    assert read_prompts(tmp_path / "a.txt") == [Prompt("0", "a 3 and a 7"), Prompt("1", "seven then one")]
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "prompt": "two"}) + "\n" + json.dumps({"id": 5, "prompt": "one"}))
    assert read_prompts(tmp_path / "b.jsonl") == [Prompt("x", "two"), Prompt("5", "one")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "x", "prompt": "a"}) + "\n" + json.dumps({"id": "x", "prompt": "b"}))
    with pytest.raises(ValueError, match=r"c.jsonl:2: duplicate id 'x'"):
        read_prompts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(ValueError, match=r"d.jsonl:1: .*'id'"):
        read_prompts(tmp_path / "d.jsonl")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_by_row_and_id(tmp_path, dtype):
    items = prompts(11)
    s = write_prompt_store(tmp_path / "store", items, toy_encoder, ENCODER, dtype=dtype, shard_size=4, batch_size=3)
    assert s.count == 12 and s.encoded == 12 and s.status == "fresh"
    store = PromptStore(tmp_path / "store", verify_checksums=True)
    assert store.ids[0] == NULL_ID and store.ids[1:] == [p.id for p in items]
    assert [s["count"] for s in store.manifest["shards"]] == [4, 4, 4]
    ref_t, ref_m = toy_encoder([p.prompt for p in items])
    ref_t = ref_t * ref_m.unsqueeze(-1)  # padding is stored as zeros
    tokens, mask = store.get_ids(["p10", "p0", "p5"])
    want_t, want_m = ref_t[[10, 0, 5]], ref_m[[10, 0, 5]]
    assert torch.equal(mask, want_m) and mask.dtype == torch.bool
    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert torch.equal(tokens, want_t.to(cast).float())
    null_t, null_m = store.null(batch=2)
    assert null_t.shape == (2, L, C) and not null_m.any() and not null_t.any()
    with pytest.raises(KeyError, match="'nope'"):
        store.row_of("nope")


def test_resume_and_changed_settings(tmp_path):
    root = tmp_path / "store"
    calls = []

    def failing(p):
        calls.append(len(p))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return toy_encoder(p)

    with pytest.raises(RuntimeError, match="killed"):
        write_prompt_store(root, prompts(9), failing, ENCODER, shard_size=4, batch_size=4)
    assert (root / shard_name(0)).exists() and (root / shard_name(1)).exists() and not (root / "manifest.json").exists()
    s = write_prompt_store(root, prompts(9), toy_encoder, ENCODER, shard_size=4, batch_size=4)
    assert s.status == "resume" and s.encoded == 2  # only the last shard (rows 8, 9)
    fresh = write_prompt_store(tmp_path / "fresh", prompts(9), toy_encoder, ENCODER, shard_size=4, batch_size=4)
    for k in range(3):
        assert (root / shard_name(k)).read_bytes() == (tmp_path / "fresh" / shard_name(k)).read_bytes()
    assert write_prompt_store(root, prompts(9), toy_encoder, ENCODER, shard_size=4, batch_size=4).status == "complete"
    with pytest.raises(ValueError, match="dtype"):
        write_prompt_store(root, prompts(9), toy_encoder, ENCODER, dtype="float32", shard_size=4, batch_size=4)
    assert fresh.count == 10


def test_corrupt_shard_is_rejected_by_name(tmp_path):
    root = tmp_path / "store"
    write_prompt_store(root, prompts(9), toy_encoder, ENCODER, shard_size=4, batch_size=4)
    verify_prompt_store(root)
    p = root / shard_name(1)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptPromptStoreError, match=r"shard-000001.npy: checksum mismatch"):
        PromptStore(root, verify_checksums=True)
    PromptStore(root)  # the cheap open checks sizes and headers only
    p.write_bytes(bytes(raw[:-10]))
    with pytest.raises(CorruptPromptStoreError, match=r"shard-000001.npy: truncated"):
        PromptStore(root)


def test_encoder_shape_mismatch_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"returned tokens \(3, 6, 8\).*expects \(B, 6, 16\)"):
        write_prompt_store(tmp_path / "s", prompts(2), toy_encoder, dict(ENCODER, width=16))
