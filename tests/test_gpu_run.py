"""bench/gpu_run.sh --tiny: the prepared GPU run end to end on the CPU, so the first GPU run does not die on a typo."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_tiny_end_to_end(tmp_path):
    out = tmp_path / "gr"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor")))
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--tiny", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("env.md", "gpu_check.json", "attention.json", "photos_step.json", "parallel.md",
                 "photos_ladder_gpu.csv", "photos_ladder_history_cut_gpu.csv", "gpu_run.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "photos_step.json").read_text())["median_s"].keys() == {"eager", "foreach", "compile"}
    par = (out / "parallel.md").read_text()
    assert "| ddp |" in par and "| fsdp |" in par
    rows = list(csv.DictReader(open(out / "photos_ladder_gpu.csv")))
    assert {(r["student"], r["steps"]) for r in rows} >= {("step distillation", "4"), ("ARD (N_h = 1)", "4"),
                                                          ("ARD (N_h = 1), GAN control", "6"),
                                                          ("ARD (N_h = 1), GAN (factor 1)", "6")}
    md = (out / "gpu_run.md").read_text()
    assert "## attention" in md and "## ladder" in md and "FD-degradation ratio" in md and "history cut" in md
