"""`distill --compile`: the compiled training forward trains the same student as eager (float32 tolerance)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ardistill.models.dit import DiT, DiTConfig
from ardistill.training.distill import RUNTIME_FIELDS, DistillConfig, distill
from tiny_teachers import TINY_DIT, random_dit, random_from_global_rng, record_tiny

TINY = dict(TINY_DIT, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> dict:
    return record_tiny(tmp_path_factory.mktemp("compile"), random_dit(TINY, std=0.05, seed_torch=True))


def test_compile_is_a_runtime_setting():
    # it decides how a step is computed, not what: a run may be resumed with or without it
    assert "compile" in RUNTIME_FIELDS


@pytest.mark.slow
@pytest.mark.numerics
def test_compiled_training_matches_eager(rec, tmp_path):
    """Inductor fuses and reorders float32 arithmetic, so the two runs are not bit-equal: after 4 AdamW steps
    at lr 1e-3 (each moves a weight by at most ~1e-3), rounding of order 1e-7 relative per op can change a
    weight by far less than 1e-4 of its scale; the per-step losses agree to 1e-5 relative."""
    base = dict(recording=rec["recording"], teacher=rec["teacher"], steps=4, batch_size=4, lr=1e-3, ema_decay=0.9,
                ckpt_every=4, log_every=1, tensorboard=False, progress=False, history_layers=1)
    eager = distill(DistillConfig(run_dir=str(tmp_path / "eager"), **base))
    comp = distill(DistillConfig(run_dir=str(tmp_path / "compiled"), compile=True, **base))
    la = [json.loads(x)["loss"] for x in (tmp_path / "eager" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "compiled" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    a, b = load_file(str(eager.student_path)), load_file(str(comp.student_path))
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-3)
        assert (a[k] - b[k]).abs().max() <= 1e-4 * scale, k


@pytest.mark.slow
@pytest.mark.numerics
def test_compiled_sampler_matches_eager(tmp_path):
    """`generate --compile`: the KV-cached sampler through torch.compile gives the eager samples within float32
    rounding (fused kernels reorder sums: 4 steps of a depth-2 network, gain 4 in tests/tolerances.py's terms)."""
    from ardistill.generate import sample_student
    from ardistill.models.student import build_student
    from tolerances import assert_paths_agree
    teacher = random_from_global_rng(lambda: DiT(DiTConfig(**TINY)), std=0.1)
    student = build_student(teacher, num_steps=4, history_layers=1, block_times=[999, 749, 499, 249]).eval()
    labels = torch.tensor([0, 3, 5, 9, 1, 2])
    eager = sample_student(student, list(range(6)), labels, batch_size=6)
    compiled = sample_student(student, list(range(6)), labels, batch_size=6, compile=True)
    assert_paths_agree(compiled, eager, gain=4)
    assert eager.abs().max() > 1e-2  # the samples are not trivially zero
