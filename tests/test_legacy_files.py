"""Files written by the code before the issue-24 refactor (tests/fixtures/legacy-29a1cb1) still load and compute
what that code computed: teachers, trajectory and prompt stores, students and a training checkpoint to resume.

The fixtures were made by tests/fixtures/make_legacy.py at commit 29a1cb1; ``expected.safetensors`` holds that
code's outputs. Outputs are compared with the cross-path tolerance (another CPU may round differently).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tolerances import assert_paths_agree

LEGACY = Path(__file__).parent / "fixtures" / "legacy-29a1cb1"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(LEGACY / "expected.safetensors"))


def _agree(actual: torch.Tensor, want: torch.Tensor, gain: float = 1.0):
    """Within float32 rounding: the old outputs were computed on another code path (and maybe another CPU)."""
    assert actual.shape == want.shape
    assert_paths_agree(actual, want, gain=gain)


@pytest.mark.numerics
def test_class_teacher_loads_and_computes_the_same(expected):
    from ardistill.io.checkpoints import load_any_teacher
    teacher = load_any_teacher(LEGACY / "class" / "teacher.safetensors").eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 3, 5])
    with torch.no_grad():
        _agree(teacher(x, t, y), expected["class.teacher.out"])


@pytest.mark.numerics
def test_text_teacher_loads_and_computes_the_same(expected):
    from ardistill.io.pixart import load_any_text_teacher
    teacher = load_any_text_teacher(LEGACY / "text" / "teacher.safetensors").eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([0.1, 0.5, 0.9])
    text, mask = expected["text.student.text"], expected["text.student.mask"]
    with torch.no_grad():
        _agree(teacher(x, t, text, mask), expected["text.teacher.out"])


@pytest.mark.parametrize("task", ["class", "text"])
def test_recordings_read_the_same(task, expected):
    from ardistill.data.prompts import TextTrajectoryDataset
    from ardistill.data.trajectory_dataset import TrajectoryDataset
    ds = (TrajectoryDataset if task == "class" else TextTrajectoryDataset)(LEGACY / task / "rec")
    item = ds[5]
    keys = sorted(k.split(".", 3)[3] for k in expected if k.startswith(f"{task}.rec.item5."))
    assert sorted(item) == keys
    for k in keys:
        assert torch.equal(item[k], expected[f"{task}.rec.item5.{k}"]), k  # stored data: bit for bit


@pytest.mark.numerics
@pytest.mark.parametrize("task", ["class", "text"])
def test_students_load_and_sample_the_same(task, expected):
    from ardistill.io.student_io import load_student
    student = load_student(LEGACY / task / "run" / "ema.safetensors").eval()
    noise = expected[f"{task}.student.noise"]
    cond = ((expected["class.student.y"],) if task == "class"
            else (expected["text.student.text"], expected["text.student.mask"]))
    # S = 2 sampling steps: the rounding of two forward passes (tests/tolerances.py, gain)
    _agree(student.sample(noise, *cond, return_all=True), expected[f"{task}.student.sample"], gain=2.0)


@pytest.mark.parametrize("task", ["class", "text"])
def test_an_old_training_run_resumes(task, tmp_path):
    from ardistill.training.distill import DistillConfig, distill
    run = tmp_path / "run"
    shutil.copytree(LEGACY / task / "run", run)
    cfg = DistillConfig(recording=str(LEGACY / task / "rec"), teacher=str(LEGACY / task / "teacher.safetensors"),
                        run_dir=str(run), steps=3, batch_size=4, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1,
                        tensorboard=False, progress=False, history_layers=1)
    result = distill(cfg, resume=True)
    assert result.step == 3 and torch.isfinite(torch.tensor(result.loss))
