"""T5 prompt embeddings from a local folder: encoding, the prompt store (fp16 / bf16, resume), named errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from t2i_tiny import T5_WIDTH, write_tiny_pixart_pipeline, write_tiny_t5  # noqa: E402
from tolerances import assert_paths_agree  # noqa: E402

from ardistill.cli import main  # noqa: E402
from ardistill.data.prompts import PromptStore  # noqa: E402
from ardistill.data.t5 import T5PromptEncoder, embed_prompts_command  # noqa: E402

PROMPTS = ["a photo of a cat", "two red cars under the sky", "a big house", "dog", "a small blue tree on the house"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.mark.numerics
def test_encoder_masks_padding_and_batches_independently(t5):
    enc = T5PromptEncoder(t5, max_length=12)
    tokens, mask = enc.encode(PROMPTS)
    assert tokens.shape == (5, 12, T5_WIDTH) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(p.split()) + 1 for p in PROMPTS]  # words + </s>
    alone, alone_mask = enc.encode([PROMPTS[3]])  # the same prompt in another batch
    assert torch.equal(alone_mask, mask[3:4])
    n = int(mask[3].sum())
    assert_paths_agree(alone[0, :n], tokens[3, :n])  # a batch of 1 vs 5, other kernels: float32 rounding
    empty, empty_mask = enc.encode([""])
    assert int(empty_mask.sum()) == 1  # the empty prompt is one </s>: guidance's null text
    assert enc.identity()["width"] == T5_WIDTH and len(enc.identity()["sha256"]) == 64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_embed_prompts_writes_a_store_once_and_resumes(t5, tmp_path, dtype):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "store"
    s = embed_prompts_command(prompts, t5, out, max_length=12, dtype=dtype, batch_size=2, shard_size=2, device="cpu")
    assert s.count == 6 and s.encoded == 6 and s.status == "fresh"
    store = PromptStore(out, verify_checksums=True)
    assert store.prompts[1:] == PROMPTS and store.encoder["name"].startswith("t5:")
    tokens, mask = store.get_ids(["1"])
    ref, ref_mask = T5PromptEncoder(t5, max_length=12).encode([PROMPTS[1]])
    assert torch.equal(mask, ref_mask)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    torch.testing.assert_close(tokens, ref * ref_mask[..., None], atol=tol, rtol=tol)
    again = embed_prompts_command(prompts, t5, out, max_length=12, dtype=dtype, batch_size=2, shard_size=2,
                                  device="cpu")
    assert again.status == "complete" and again.encoded == 0
    with pytest.raises(ValueError, match="max_length"):  # other settings are refused, naming the field
        embed_prompts_command(prompts, t5, out, max_length=10, dtype=dtype, shard_size=2, device="cpu")


def test_pipeline_folder_and_cli(tmp_path, capsys):
    pipe = write_tiny_pixart_pipeline(tmp_path / "pixart")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)))
    rc = main(["embed-prompts", "--prompts", str(prompts), "--text-encoder", str(pipe), "--out",
               str(tmp_path / "s"), "--max-length", "16", "--device", "cpu"])
    assert rc == 0 and "6 prompts" in capsys.readouterr().out
    assert PromptStore(tmp_path / "s").row_of("p4") == 5


def test_errors_name_the_folder_or_the_package(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    rc = main(["embed-prompts", "--prompts", str(prompts), "--text-encoder", str(tmp_path / "no-t5"),
               "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert rc == 2 and "no-t5" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        T5PromptEncoder(tmp_path / "half")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'ardistill\[t5\]'"):
        T5PromptEncoder(tmp_path / "half")


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one(t5, tmp_path):
    import os
    import subprocess
    from pathlib import Path
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    embed_prompts_command(prompts, t5, tmp_path / "one", max_length=12, batch_size=2, shard_size=3, device="cpu")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ardistill",
           "embed-prompts", "--prompts", str(prompts), "--text-encoder", str(t5), "--out", str(tmp_path / "two"),
           "--max-length", "12", "--batch-size", "2", "--shard-size", "3", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "11 prompts" in proc.stdout
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]] and len(two["shards"]) == 4
