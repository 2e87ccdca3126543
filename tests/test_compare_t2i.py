"""`ardistill demo --task t2i` end to end on a tiny setting: report, metrics, captioned grid, resume."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from PIL import Image

from ardistill.comparison import T2IConfig, compare_t2i, t2i_variants
from ardistill.data.text_encoder import digits_text_encoder
from ardistill.io.checkpoints import TEXT_TEACHER_KIND, save_model
from ardistill.io.images import save_captioned_grid
from tiny_teachers import flow_text_teacher


def _teacher_file(path):
    enc = digits_text_encoder(width=32)
    t = flow_text_teacher(caption_channels=enc.width)
    save_model(t, t.cfg.to_dict(), path, kind=TEXT_TEACHER_KIND, extra_metadata={"text_encoder": enc.spec()})
    return path


def test_variants_pair_step_distillation_and_ard_for_every_s():
    assert list(t2i_variants(28, (4, 3), extra_step_distillation=False)) == [
        "step distillation", "ARD (N_h=6)", "ARD (N_h=6), S=3"]
    v = t2i_variants(28, (4, 3))
    assert v == {"step distillation": {"history_layers": 0, "num_steps": 4},
                 "ARD (N_h=6)": {"history_layers": 6, "num_steps": 4},
                 "step distillation, S=3": {"history_layers": 0, "num_steps": 3},
                 "ARD (N_h=6), S=3": {"history_layers": 6, "num_steps": 3}}


@pytest.mark.numerics  # end to end, but the only check of the evaluation's cached vs forced errors (issue 22)
def test_demo_t2i_end_to_end_tiny(tmp_path):
    cfg = T2IConfig(out=str(tmp_path / "t2i"), teacher=str(_teacher_file(tmp_path / "teacher.safetensors")),
                    train_prompts=12, train_count=16, eval_count=8, real_count=24, num_steps=2, extra_steps=(3,),
                    teacher_steps=4, solver="euler", cfg_scale=2.0, record_batch=8, steps=2, batch_size=4,
                    extra_step_distillation=True,
                    warmup_steps=0, grid_columns=4, latency_batch=4, progress=False)
    report = compare_t2i(cfg)
    md = report.read_text()
    for row in ("teacher (EULER-4, cfg 2.0)", "step distillation", "ARD (N_h=1)", "ARD (N_h=1), S=3",
                "real held-out pairs"):
        assert f"| {row} |" in md, row
    m = json.loads((report.parent / "metrics.json").read_text())
    rows = {r["model"]: r for r in m["rows"]}
    for name in ("step distillation", "ARD (N_h=1), S=3"):
        for sname in ("seen", "held-out"):
            s = rows[name]["sets"][sname]
            assert 0 <= s["adherence"] <= 1 and s["fd"] >= 0 and s["fd_teacher"] >= 0
            assert len(s["trajectory_errors"]["free_running"]) == rows[name]["steps"]
    # at step 1 both students read only the noise: free-running equals teacher-forced, up to float32 rounding.
    # The two numbers come from two code paths (the KV-cached sampler, the masked teacher-forced pass) whose
    # outputs agree to ~1e-6 of their scale, and each MSE is a float32 mean over 8 x 128 squared differences
    # (it differs by one ulp, 1.2e-7, on AVX-512 CPUs). To first order |dMSE| <= 2 sqrt(MSE) max|d output|;
    # with max|d output| <= 1e-5 x max|state| (tests/tolerances.py) and |state| <= 4 that is below 1e-4 x MSE
    # (MSE ~ 1.4), while a later block leaking into block 0 would move it by 1e-2 or more.
    te = rows["ARD (N_h=1)"]["sets"]["seen"]["trajectory_errors"]
    free, forced = te["free_running"][0], te["teacher_forced"][0]
    assert abs(free - forced) <= 1e-4 * max(free, forced), (free, forced)
    grid = Image.open(report.parent / "grid.png")
    assert grid.width > 4 * 16 * 6 and grid.height > 5 * 8 * 6  # 4 columns, 5 rows and the caption band
    assert _row_labels_drawn(grid, rows=5, row_height=8 * 6, padding=2)  # each row's model name, left of it
    # a distilled text student samples captions from its file alone (its encoder spec is in the metadata)
    from ardistill.cli import main
    png = tmp_path / "student.png"
    main(["generate", "--student", str(tmp_path / "t2i" / "students" / "ard-n-h-1-seed0"), "--out", str(png),
          "--prompt", "a 4 and a 1", "--prompt", "seven then two", "--num-samples", "2"])
    assert Image.open(png).width > 2 * 16 * 8
    # rerunning skips every finished stage and writes the same numbers: the evaluation is recomputed with the
    # same kernels on the same inputs (files read back) in the same process, so exact equality is valid
    again = json.loads((compare_t2i(cfg).parent / "metrics.json").read_text())
    assert [r["sets"]["seen"]["adherence"] for r in again["rows"]] == [r["sets"]["seen"]["adherence"] for r in m["rows"]]


def _row_labels_drawn(grid, rows: int, row_height: int, padding: int, width: int = 10) -> bool:
    """Dark text in the first ``width`` columns of every row of a captioned grid (where its name starts)."""
    img = np.asarray(grid.convert("L"))
    bands = [img[padding + r * (row_height + padding):padding + r * (row_height + padding) + row_height, :width]
             for r in range(rows)]
    return all((band < 128).sum() > 5 for band in bands)


def test_captioned_grid_labels_each_row_with_its_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = {name: torch.rand(4, 1, 8, 16, generator=g) * 2 - 1 for name in ("teacher", "step distillation", "ARD")}
    path = save_captioned_grid(rows, ["a 1 and a 2", "three then four", "5 6", "seven, eight"], tmp_path / "grid.png")
    grid = Image.open(path)
    assert _row_labels_drawn(grid, rows=3, row_height=8 * 6, padding=2)
    assert not _row_labels_drawn(grid, rows=4, row_height=8 * 6, padding=2)  # no fourth row, no fourth label
    shorter = Image.open(save_captioned_grid({"T": rows["teacher"]}, ["a", "b", "c", "d"], tmp_path / "one.png"))
    assert grid.width > shorter.width  # the label strip fits the longest name
