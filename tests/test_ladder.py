"""The convergence ladder (ardistill.ladder, scripts/photos_ladder.py) at tiny size on the photos benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ardistill.io.checkpoints import save_checkpoint_safetensors
from ardistill.io.student_io import read_student_file
from ardistill.ladder import (CSV_FIELDS, LadderConfig, LadderRun, convergence, convergence_table, degradation_ratios, error_accumulation, error_table,
                              gan_arms, gan_table, ladder_rows, ladder_runs, prepare, ratio_table, read_csv, row_order, run_arm, run_rung, teacher_row,
                              train_to, write_csv)
from ardistill.ladder.history import (history_cut_json, history_cut_rows, history_cut_table, history_swap_table,
                                     write_history_csv)
from ardistill.models.dit import build_dit
from tiny_teachers import random_from_global_rng

ROOT = Path(__file__).resolve().parents[1]


def _teacher(path: Path) -> Path:
    t = random_from_global_rng(lambda: build_dit("DiT-T/2", input_size=16, in_channels=3, num_classes=10,
                                                 learn_sigma=False), std=0.02)
    save_checkpoint_safetensors(t, path)
    return path


def _cfg(tmp_path: Path, **kw) -> LadderConfig:
    base = dict(out=str(tmp_path / "ladder"), teacher_name="tiny", teacher=str(_teacher(tmp_path / "t.safetensors")),
                rungs=(3, 6), students={"step distillation": [0], "ARD (N_h = 1)": [0]}, train_count=24,
                eval_count=16, train_eval_count=8, teacher_steps=6, batch_size=8, warmup_steps=2, ckpt_every=2)
    base.update(kw)
    return LadderConfig(**base)


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="rungs"):
        LadderConfig(out="x", teacher_name="t", rungs=(10, 5))
    with pytest.raises(ValueError, match="unknown"):
        LadderConfig(out="x", teacher_name="t", students={"GAN please": [0]})
    with pytest.raises(ValueError, match="warmup"):
        LadderConfig(out="x", teacher_name="t", rungs=(50, 100), warmup_steps=100)
    with pytest.raises(ValueError, match="train_eval_count"):
        LadderConfig(out="x", teacher_name="t", train_count=10, train_eval_count=20)
    with pytest.raises(ValueError, match="gan_factors"):
        LadderConfig(out="x", teacher_name="t", gan_factors=(0.0, 1.0))  # the control is always run
    with pytest.raises(ValueError, match="gan_students"):
        LadderConfig(out="x", teacher_name="t", gan_factors=(1.0,), gan_students={"ARD (N_h = 1)": [5]})
    with pytest.raises(ValueError, match="gan_from"):
        LadderConfig(out="x", teacher_name="t", rungs=(300, 1000), gan_factors=(1.0,), gan_from=500)
    # without a GAN stage the GAN students need not be among the ladder's
    LadderConfig(out="x", teacher_name="t", students={"ARD (N_h = 1)": [3]})


def test_gan_arms_start_from_the_base_rung_with_the_papers_proportions(tmp_path):
    cfg = LadderConfig(out=str(tmp_path), teacher_name="t", teacher=str(tmp_path / "t.safetensors"),
                       rungs=(300, 1000, 10000), gan_factors=(0.3, 10.0), gan_steps=500)
    arms = gan_arms(cfg)
    assert [(a.base.student, a.factor) for a in arms] == [("step distillation", 0.0), ("step distillation", 0.3),
                                                         ("step distillation", 10.0), ("ARD (N_h = 1)", 0.0),
                                                         ("ARD (N_h = 1)", 0.3), ("ARD (N_h = 1)", 10.0)]
    assert [a.run_dir.name for a in arms[3:]] == ["ard-n-h-1-seed0-from10000-control", "ard-n-h-1-seed0-from10000-gan0p3",
                                                  "ard-n-h-1-seed0-from10000-gan10"]
    assert [a.name(cfg) for a in arms[3:]] == ["ARD (N_h = 1), GAN control", "ARD (N_h = 1), GAN (factor 0.3)",
                                               "ARD (N_h = 1), GAN (factor 10)"]
    from ardistill.ladder import gan_config
    g, c = gan_config(cfg, arms[5]), gan_config(cfg, arms[3])
    assert Path(g.student) == arms[5].base.rung_weights(10000) and arms[5].total_steps == 10500
    assert (g.gan_factor, g.gan_warmup, g.steps, g.lr, g.d_lr, g.seed) == (10.0, 100, 500, 1e-4, 1e-3, 0)
    # the control differs from a GAN arm in the factor alone
    assert {k for k, v in c.to_dict().items() if g.to_dict()[k] != v} == {"gan_factor", "run_dir"}
    assert LadderConfig(out="x", teacher_name="t", rungs=(300, 1000), gan_factors=(1.0,), gan_from=300).gan_base_steps == 300


def test_rows_are_ordered_with_the_gan_stage_after_its_base():
    names = ["ARD (N_h = 1), GAN (factor 10)", "step distillation, GAN control", "ARD (N_h = 1)",
             "ARD (N_h = 1), GAN (factor 3)", "teacher", "step distillation", "ARD (N_h = 1), GAN control",
             "step distillation, per-step heads", "step distillation, S=2"]
    rows = [{"teacher": "t", "student": n, "seed": 0, "steps": 1} for n in names]
    assert [r["student"] for r in sorted(rows, key=row_order)] == [
        "teacher", "step distillation", "step distillation, GAN control", "ARD (N_h = 1)",
        "ARD (N_h = 1), GAN control", "ARD (N_h = 1), GAN (factor 3)", "ARD (N_h = 1), GAN (factor 10)",
        "step distillation, per-step heads", "step distillation, S=2"]


def test_gan_table_compares_each_arm_with_its_control_and_with_step_distillation():
    rows = [{"teacher": "t", "student": "teacher", "seed": "", "steps": 0, "fd": 100.0, "fd_to_teacher": 0.0}]
    for name, fds in (("step distillation, GAN control", (150.0, 170.0)), ("ARD (N_h = 1), GAN control", (140.0, 140.0)),
                      ("ARD (N_h = 1), GAN (factor 3)", (110.0, 114.0))):
        rows += [{"teacher": "t", "student": name, "seed": s, "steps": 1100, "fd": fd, "fd_to_teacher": fd - 90}
                 for s, fd in enumerate(fds)]
    table = gan_table(rows)
    assert "| t | step distillation, GAN control | 1100 | 2 | 160.0 | 70.0 | - | 1.00 |" in table
    assert "| t | ARD (N_h = 1), GAN control | 1100 | 2 | 140.0 | 50.0 | - | 1.50 |" in table
    assert "| t | ARD (N_h = 1), GAN (factor 3) | 1100 | 2 | 112.0 | 22.0 | -28.0 | 5.00 |" in table


@pytest.mark.slow
def test_gan_stage_runs_from_the_last_rung_resumes_and_refuses_other_settings(tmp_path):
    cfg = _cfg(tmp_path, rungs=(3,), train_count=16, eval_count=8, train_eval_count=4, gan_factors=(1.0,),
               gan_students={"ARD (N_h = 1)": [0]}, gan_steps=2, gan_warmup=0.0)
    prepare(cfg, "eval")
    prepare(cfg, "train")
    teacher_row(cfg)
    control, arm = gan_arms(cfg)
    with pytest.raises(ValueError, match="has not reached rung 3"):
        run_arm(cfg, arm)
    base = ladder_runs(cfg)[1]
    run_rung(cfg, base, 3)
    rows = {a.factor: run_arm(cfg, a) for a in (control, arm)}
    for f, row in rows.items():
        assert row["steps"] == 5 and math.isfinite(row["fd"]) and row["student"] == ("ARD (N_h = 1), GAN control" if f == 0
                                                                                      else "ARD (N_h = 1), GAN (factor 1)")
        assert row["wall_s"] > read_json_row(base.rung_json(3))["wall_s"]  # the base run's time is included
    # the GAN arm and its control start from the same weights and differ only by the GAN
    saved = {a.factor: json.loads((a.run_dir / "arm.json").read_text()) for a in (control, arm)}
    assert saved[0.0]["student"] == saved[1.0]["student"] == str(base.rung_weights(3))
    assert saved[1.0]["gan_factor"] == 1.0 and saved[0.0]["gan_factor"] == 0.0
    a = read_student_file(arm.as_run(cfg).rung_weights(5))[1]
    c = read_student_file(control.as_run(cfg).rung_weights(5))[1]
    s = read_student_file(base.rung_weights(3))[1]
    assert any(not torch.equal(a[k], c[k]) for k in a) and any(not torch.equal(c[k], s[k]) for k in c)
    # finished arms are kept; rows join the table after their base run's
    assert run_arm(cfg, arm) == rows[1.0]
    names = [r["student"] for r in ladder_rows([cfg])]
    assert names == ["teacher", "ARD (N_h = 1)", "ARD (N_h = 1), GAN control", "ARD (N_h = 1), GAN (factor 1)"]
    # another GAN recipe in the same folders is refused, not mixed in
    arm.as_run(cfg).rung_json(5).unlink()
    arm.as_run(cfg).rung_weights(5).unlink()
    other = _cfg(tmp_path, rungs=(3,), train_count=16, eval_count=8, train_eval_count=4, gan_factors=(1.0,),
                 gan_students={"ARD (N_h = 1)": [0]}, gan_steps=2, gan_warmup=0.0, gan_lr=3e-4)
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        run_arm(other, gan_arms(other)[1])


def read_json_row(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_ladder_rungs_equal_runs_stopped_there_and_rows_are_complete(tmp_path):
    cfg = _cfg(tmp_path)
    prepare(cfg, "eval")
    prepare(cfg, "train")
    trow = teacher_row(cfg)
    assert trow["student"] == "teacher" and math.isfinite(trow["fd"])
    runs = ladder_runs(cfg)
    assert [r.student for r in runs] == ["step distillation", "ARD (N_h = 1)"]
    for steps in cfg.rungs:
        for run in runs:
            row = run_rung(cfg, run, steps)
            assert row["steps"] == steps and math.isfinite(row["fd"]) and row["wall_s"] > 0
            for key in ("mse_free", "mse_forced", "mse_free_train", "mse_forced_train"):
                assert len(row[key].split()) == cfg.num_steps
    # the 6-step rung (3 steps, then resumed to 6) is the run trained straight to 6: the same steps replayed
    # with the same kernels on the same inputs, so bit-equality is the right check here
    straight = LadderRun("ARD (N_h = 1)", 0, tmp_path / "straight")
    w = train_to(cfg, straight, 6)
    a = read_student_file(w)[1]
    b = read_student_file(runs[1].rung_weights(6))[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the 3-step rung's weights were kept, and differ from the 6-step ones
    c = read_student_file(runs[1].rung_weights(3))[1]
    assert any(not torch.equal(b[k], c[k]) for k in b)
    # a finished rung is not trained again; a rung below the run's position without weights is refused
    assert run_rung(cfg, runs[0], 3) == run_rung(cfg, runs[0], 3)
    runs[0].rung_weights(3).unlink()
    runs[0].rung_json(3).unlink()
    with pytest.raises(ValueError, match="past the rung"):
        run_rung(cfg, runs[0], 3)

    rows = ladder_rows([cfg])
    assert [(r["student"], r["steps"]) for r in rows] == [("teacher", 0), ("step distillation", 6),
                                                         ("ARD (N_h = 1)", 3), ("ARD (N_h = 1)", 6)]
    path = write_csv(rows, tmp_path / "ladder.csv")
    assert path.read_text().splitlines()[0] == ",".join(CSV_FIELDS)
    back = read_csv(path)
    d = degradation_ratios(back)
    assert [x["steps"] for x in d] == [6]  # the only budget both students have
    assert "| tiny | shared | 6 |" in ratio_table(back)

    # the history-cut ablation: ARD's evaluated rungs only, its "with history" side is the rung's own
    # sampling (same FD, same final-step MSE), cached beside the weights (that a cut history changes the
    # samples of a student that uses it is tested in test_student.py; this random teacher's students do not)
    cut = history_cut_rows([cfg], progress=None)
    assert [(r["student"], r["steps"]) for r in cut] == [("ARD (N_h = 1)", 3), ("ARD (N_h = 1)", 6)]
    for r in cut:
        own = run_rung(cfg, runs[1], r["steps"])
        assert r["fd"] == pytest.approx(own["fd"], rel=1e-4)
        assert r["mse_to_teacher"] == pytest.approx(float(own["mse_free"].split()[-1]), rel=1e-4)
        assert r["mse_with_vs_cut"] >= 0 and math.isfinite(r["fd_to_teacher_history_cut"])  # how much: test_student
        assert (r["mse_free"], r["mse_forced"]) == (own["mse_free"], own["mse_forced"])
        for key in ("mse_teacher_history", "mse_other_history"):  # their meaning: test_student.py
            assert len(r[key].split()) == cfg.num_steps and min(float(x) for x in r[key].split()) >= 0
    stamp = history_cut_json(runs[1], 6).stat().st_mtime_ns
    assert history_cut_rows([cfg], progress=None) == cut and history_cut_json(runs[1], 6).stat().st_mtime_ns == stamp
    other = history_cut_json(runs[1], 3)
    other.write_text(other.read_text().replace(cut[0]["weights_sha256"], "0" * 64))  # stale: weights changed
    assert history_cut_rows([cfg], progress=None) == cut and json.loads(other.read_text()) == cut[0]
    older = {k: v for k, v in cut[0].items() if k != "mse_other_history"}  # a row of an older version
    other.write_text(json.dumps(older))
    assert history_cut_rows([cfg], progress=None) == cut and json.loads(other.read_text()) == cut[0]
    table = history_cut_table(read_csv(write_history_csv(cut, tmp_path / "cut.csv")))
    assert "| tiny | ARD (N_h = 1) | 6 | 1 |" in table
    assert "| tiny | ARD (N_h = 1) | 6 | 1 |" in history_swap_table(read_csv(tmp_path / "cut.csv"))
    # neither the cached ablation rows beside the rungs nor any other json there are read as rung rows
    (runs[0].run_dir / "rungs" / "step_00000006.notes.json").write_text("{}")
    assert ladder_rows([cfg]) == rows


def test_a_changed_ladder_is_refused(tmp_path):
    cfg = _cfg(tmp_path, train_count=8, eval_count=8, train_eval_count=4)
    prepare(cfg, "eval")
    with pytest.raises(ValueError, match="other settings"):
        prepare(_cfg(tmp_path, train_count=8, eval_count=8, train_eval_count=4, lr=1e-3), "eval")
    prepare(_cfg(tmp_path, train_count=8, eval_count=8, train_eval_count=4, rungs=(3, 6, 9)), "eval")  # more rungs: fine


def test_a_setting_added_later_keeps_an_old_ladder(tmp_path):
    cfg = _cfg(tmp_path, train_count=8, eval_count=8, train_eval_count=4)
    prepare(cfg, "eval")
    saved = Path(cfg.out) / "ladder.json"
    old = json.loads(saved.read_text())
    del old["precision"]  # a ladder started before the field existed ran with its default
    saved.write_text(json.dumps(old))
    prepare(cfg, "eval")
    old["precision"] = "bf16"  # but a recorded non-default value still counts as a change
    saved.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="precision"):
        prepare(cfg, "eval")


def test_degradation_ratio_is_the_papers():
    rows = [{"teacher": "t", "student": "teacher", "seed": "", "steps": 0, "fd": 100.0, "fd_to_teacher": 0.0}]
    for seed, sd, ard in ((0, 150.0, 110.0), (1, 170.0, 120.0)):
        rows.append({"teacher": "t", "student": "step distillation", "seed": seed, "steps": 10, "fd": sd,
                     "fd_to_teacher": sd - 90})
        rows.append({"teacher": "t", "student": "ARD (N_h = 1)", "seed": seed, "steps": 10, "fd": ard,
                     "fd_to_teacher": ard - 90})
    (d,) = degradation_ratios(rows)
    assert d["ratio"] == pytest.approx((160 - 100) / (115 - 100))
    assert d["ratio_range"] == pytest.approx((3.5, 5.0))
    assert d["ratio_to_teacher"] == pytest.approx(70 / 25)


def test_error_accumulation_splits_the_final_error_into_training_and_sampling():
    """Final step only; free / forced and held-out / train are averaged over seeds, per student and budget;
    CSV strings and rung-json lists read the same; a budget with one student has no row."""
    rows = [{"teacher": "t", "student": "teacher", "seed": "", "steps": 0, "mse_free": "", "mse_forced": ""}]
    for seed, k in ((0, 1.0), (1, 2.0)):
        rows.append({"teacher": "t", "student": "step distillation", "seed": seed, "steps": 10,
                     "mse_free": f"0.5 {3 * k}", "mse_forced": f"0.5 {k}", "mse_free_train": f"0.5 {1.5 * k}"})
        rows.append({"teacher": "t", "student": "ARD (N_h = 1)", "seed": seed, "steps": 10,
                     "mse_free": [0.5, 2 * k], "mse_forced": [0.5, k], "mse_free_train": [0.5, 2 * k]})
    rows.append({"teacher": "t", "student": "ARD (N_h = 1)", "seed": 0, "steps": 20, "mse_free": "1 1",
                 "mse_forced": "1 1", "mse_free_train": "1 1"})
    (d,) = error_accumulation(rows)
    assert d["steps"] == 10 and d["sd_seeds"] == d["ard_seeds"] == 2
    assert (d["sd_forced"], d["sd_free"], d["ard_free"]) == pytest.approx((1.5, 4.5, 3.0))
    assert (d["sd_accumulation"], d["ard_accumulation"]) == pytest.approx((3.0, 2.0))
    assert (d["sd_generalisation"], d["ard_generalisation"]) == pytest.approx((2.0, 1.0))
    assert "| t | shared | 10 | 1.50000 | 1.50000 | 4.50000 | 3.00000 | 3.00 | 2.00 | 2.00 | 1.00 |" in error_table(rows)


def test_convergence_gives_each_students_log_log_slope_between_rungs():
    """Seed means per rung; slope = log(y_n / y_prev) / log(n / prev); the first rung and non-positive
    values have none; GAN arms and the teacher row are left out; students in the table's order."""
    rows = [{"teacher": "t", "student": "teacher", "seed": "", "steps": 0, "fd": 100.0, "fd_to_teacher": 0.0}]
    for seed in (0, 1):
        for n, ftt, fd in ((100, 400.0, 300.0), (1000, 40.0, 130.0), (10000, 40.0, 110.0)):
            rows.append({"teacher": "t", "student": "ARD (N_h = 1)", "seed": seed, "steps": n,
                         "fd_to_teacher": ftt + seed, "fd": fd + seed})
    rows.append({"teacher": "t", "student": "step distillation", "seed": 0, "steps": 100, "fd_to_teacher": 9.0,
                 "fd": 99.0})  # below the teacher's FD: no slope from it
    rows.append({"teacher": "t", "student": "step distillation", "seed": 0, "steps": 1000, "fd_to_teacher": 1.0,
                 "fd": 110.0})
    rows.append({"teacher": "t", "student": "step distillation, GAN (factor 1)", "seed": 0, "steps": 1100,
                 "fd_to_teacher": 1.0, "fd": 50.0})
    c = convergence(rows)
    assert [(d["student"], d["steps"]) for d in c] == [("step distillation", 100), ("step distillation", 1000),
                                                       ("ARD (N_h = 1)", 100), ("ARD (N_h = 1)", 1000),
                                                       ("ARD (N_h = 1)", 10000)]
    sd0, sd1, a0, a1, a2 = c
    assert math.isnan(sd0["fd_to_teacher_slope"]) and sd1["fd_to_teacher_slope"] == pytest.approx(-math.log10(9))
    assert sd0["excess"] == pytest.approx(-1.0) and math.isnan(sd1["excess_slope"])
    assert a1["seeds"] == 2 and a1["fd_to_teacher"] == pytest.approx(40.5)
    assert a1["fd_to_teacher_slope"] == pytest.approx(math.log(40.5 / 400.5) / math.log(10))
    assert a2["fd_to_teacher_slope"] == pytest.approx(0.0)  # a plateau
    assert (a2["excess"], a2["excess_slope"]) == pytest.approx((10.5, math.log(10.5 / 30.5) / math.log(10)))
    table = convergence_table(rows)
    assert "| t | ARD (N_h = 1) | 10000 | 2 | 40.50 | +0.00 | 10.5 | -0.46 |" in table
    assert "| t | step distillation | 1000 | 1 | 1.00 | -0.95 | 10.0 | - |" in table


@pytest.mark.slow
def test_script_runs_the_ladder_and_continues(tmp_path):
    teacher = _teacher(tmp_path / "t.safetensors")
    cmd = [sys.executable, str(ROOT / "scripts" / "photos_ladder.py"), "--out", str(tmp_path / "runs"),
           "--ladder", f"tiny={teacher}:3,6", "--jobs", "2", "--csv", str(tmp_path / "l.csv"),
           "--figure", str(tmp_path / "l.png"), "--train-count", "16", "--eval-count", "8", "--train-eval-count", "8",
           "--warmup-steps", "1", "--ckpt-every", "2", "--seeds", "step distillation=0;ARD (N_h = 1)=0",
           "--max-rung", "3", "--batch-size", "8", "--teacher-steps", "6"]
    # a figure that cannot be written (its folder is a file) does not stop the jobs: each failure is
    # reported, every rung is trained and tabled, and only the last publish fails the command
    (tmp_path / "blocked").write_text("")
    bad = [a if a != str(tmp_path / "l.png") else str(tmp_path / "blocked" / "l.png") for a in cmd]
    res = subprocess.run(bad, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "training goes on" in res.stderr
    assert {int(r["steps"]) for r in read_csv(tmp_path / "l.csv")} == {0, 3}
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)  # nothing to train: publishes
    assert (tmp_path / "l.png").is_file()
    # continued to the last rung, with the GAN stage there (one factor and the control, from ARD's run)
    gan = ["--gan-factors", "1", "--gan-seeds", "ARD (N_h = 1)=0", "--gan-steps", "2"]
    out = subprocess.run(cmd[:-6] + ["--batch-size", "8", "--teacher-steps", "6"] + gan, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    rows = read_csv(tmp_path / "l.csv")
    assert sorted(int(r["steps"]) for r in rows) == [0, 3, 3, 6, 6, 8, 8]
    assert [r["student"] for r in rows if int(r["steps"]) == 8] == ["ARD (N_h = 1), GAN control",
                                                                   "ARD (N_h = 1), GAN (factor 1)"]
    assert "rung 3 done" not in out  # the finished rungs were kept
    assert "FD-degradation ratio" in out and "FD-degradation ratio vs SD control" in out
    assert (tmp_path / "l.png").stat().st_size > 0
    status = subprocess.run(cmd[:-6] + ["--batch-size", "8", "--teacher-steps", "6"] + gan + ["--status"], check=True,
                            capture_output=True, text=True, timeout=600).stdout
    assert "| tiny | ARD (N_h = 1), GAN (factor 1) | 0 | 8 | 8 | done |" in status
    assert "Wall time at 2 parallel jobs, in the scheduler's order: 0.0 hours." in status


def test_figure_draws_the_ladder_its_error_accumulation_and_the_gan_stage(tmp_path):
    from ardistill.ladder import plot_ladder
    rows = [{"teacher": "t", "student": "teacher", "seed": "", "steps": 0, "fd": 100.0, "fd_to_teacher": 0.0}]
    for name, steps, fd in (("step distillation", 10, 150.0), ("step distillation", 30, 130.0),
                            ("step distillation, GAN control", 33, 125.0), ("step distillation, GAN (factor 1)", 33, 120.0),
                            ("step distillation, GAN (factor 3)", 33, 118.0), ("ARD (N_h = 1)", 10, 140.0)):
        rows.append({"teacher": "t", "student": name, "seed": 0, "steps": steps, "fd": fd, "fd_to_teacher": fd - 95,
                     "mse_free": f"0.1 {fd / 1000}", "mse_forced": "0.1 0.05"})
    path = plot_ladder(rows, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    h, w = mpimg.imread(path).shape[:2]
    assert h > 2 * w  # three rows of panels: FD to teacher, error accumulation, the GAN stage
    plot_ladder(rows[:3] + rows[-1:], tmp_path / "g.png")
    h, w = mpimg.imread(tmp_path / "g.png").shape[:2]
    assert w < h < 2 * w  # no GAN rows: two rows
    from ardistill.ladder.figure import curve_label
    assert curve_label("step distillation", [300, 10000], [2, 1]) == "step distillation (2 seeds; 1 at 10,000)"
    assert curve_label("ARD (N_h = 1)", [300], [1]) == "ARD (N_h = 1) (1 seed)"


def test_a_ladder_spec_can_sample_in_other_step_counts(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("photos_ladder", ROOT / "scripts" / "photos_ladder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.parse_ladder("T-S2=/t.safetensors:300,1000,S=2", tmp_path, num_steps=4)
    assert (cfg.teacher_name, cfg.teacher, cfg.rungs, cfg.num_steps) == ("T-S2", "/t.safetensors", (300, 1000), 2)
    assert cfg.row_name("ARD (N_h = 1)") == "ARD (N_h = 1), S=2"
    assert mod.parse_ladder("T:300", tmp_path, num_steps=4).row_name("ARD (N_h = 1)") == "ARD (N_h = 1)"
    with pytest.raises(SystemExit, match="rungs must be step counts"):
        mod.parse_ladder("T:300,S2", tmp_path, num_steps=4)
    # the S = 2 pair has its own rows in the ratio table
    rows = [{"teacher": "T-S2", "student": "teacher", "seed": "", "steps": 0, "fd": 100.0, "fd_to_teacher": 0.0}]
    rows += [{"teacher": "T-S2", "student": f"{n}, S=2", "seed": 0, "steps": 300, "fd": fd, "fd_to_teacher": fd - 90}
             for n, fd in (("step distillation", 160.0), ("ARD (N_h = 1)", 120.0))]
    assert "| T-S2 | shared, S = 2 | 300 | 100.0 | 160.0 ± 0.0 | 120.0 ± 0.0 |" in ratio_table(rows)


@pytest.mark.slow
def test_resume_check_compares_two_codes_continuing_a_run(tmp_path):
    cfg = _cfg(tmp_path, rungs=(3,), train_count=16, eval_count=8, train_eval_count=4,
               students={"ARD (N_h = 1)": [0]})
    prepare(cfg, "eval")
    prepare(cfg, "train")
    run = ladder_runs(cfg)[0]
    train_to(cfg, run, 3)
    cmd = [sys.executable, str(ROOT / "scripts" / "ladder_resume_check.py"), "--ladder-out", cfg.out, "--run",
           run.run_dir.name, "--student", "ARD (N_h = 1)", "--steps", "2", "--old-src", str(ROOT / "src"),
           "--new-src", str(ROOT / "src")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 resumed steps" in res.stdout and "bit-identical: True" in res.stdout
    # the run itself is untouched (the check works on copies)
    assert json.loads((run.run_dir / "checkpoints" / "latest.json").read_text())["dir"].endswith("3")
    # a path without the package is refused (an installed ardistill would otherwise be compared with itself)
    res = subprocess.run(cmd[:-1] + [str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "the new code" in res.stdout and "no ardistill package" in res.stdout


def test_status_says_where_each_run_stands_and_the_time_to_go(tmp_path):
    """Rungs done, checkpoint, the median of the recent logged speeds, and an estimate (the ladder's median
    speed) for a job that has not logged yet; a GAN arm counts from its base rung. Reads files only."""
    from ardistill.ladder.status import ladder_status, status_table
    cfg = LadderConfig(out=str(tmp_path / "l"), teacher_name="tiny", rungs=(3, 6), warmup_steps=1, batch_size=8,
                       students={"step distillation": [0], "ARD (N_h = 1)": [0]}, gan_factors=(1.0,), gan_steps=4)
    sd, ard = ladder_runs(cfg)
    (sd.run_dir / "rungs").mkdir(parents=True)
    sd.rung_json(3).write_text("{}")
    (sd.run_dir / "checkpoints").mkdir()
    (sd.run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"dir": "step_00000004", "step": 4}))
    # 16 samples/s (2 s a step at batch 8) in the median of the recent windows; an old slow window is ignored
    speeds = [1.0] + [16.0] * 6 + [4.0] * 4
    (sd.run_dir / "log.jsonl").write_text("".join(json.dumps({"step": i, "samples_per_s": v}) + "\n"
                                                  for i, v in enumerate(speeds)))
    st = {(d["student"], d["seed"]): d for d in ladder_status([cfg])}
    a = st[("step distillation", 0)]
    assert (a["rungs_done"], a["step"], a["next_rung"], a["steps_to_end"]) == ([3], 4, 6, 2)
    assert a["s_per_step"] == pytest.approx(8 / 16) and not a["estimated"]
    assert a["seconds_to_end"] == pytest.approx(1.0)
    b = st[("ARD (N_h = 1)", 0)]  # never ran: 6 steps at the ladder's median speed
    assert b["estimated"] and (b["step"], b["steps_to_end"]) == (0, 6) and b["seconds_to_end"] == pytest.approx(3.0)
    arm = st[("ARD (N_h = 1), GAN (factor 1)", 0)]
    assert (arm["step"], arm["next_rung"], arm["steps_to_end"]) == (6, 10, 4)
    assert len(st) == 6 and "To go: 0.0 job-hours" in status_table(list(st.values()))
    from ardistill.ladder.status import wall_seconds
    # the whole ladder at 0.5 s/step, 2 jobs at a time: SD's 2 steps (0-1 s), then its arms one after the
    # other (1-3, 3-5) beside ARD's 6 steps (0-3) and its first arm (3-5); its second arm alone (5-7)
    assert wall_seconds([cfg], 2) == pytest.approx(7.0)
    assert "Wall time at 2 parallel jobs, in the scheduler's order: 0.0 hours" in \
        status_table(list(st.values()), wall=(2, wall_seconds([cfg], 2)))


def test_schedule_orders_rungs_before_gan_arms_and_replays_the_wall_time(tmp_path):
    """Lowest rung index first; a run queues again after each rung; a GAN arm starts once its base rung
    is evaluated (on disk or in the replay); evaluated rungs are not pending; the replay's total is the
    hand-computed one; an arm whose base rung cannot come is an error."""
    from ardistill.ladder.schedule import next_jobs, pending_jobs, simulate
    cfg = LadderConfig(out=str(tmp_path / "l"), teacher_name="tiny", rungs=(3, 6), warmup_steps=1, batch_size=8,
                       students={"step distillation": [0], "ARD (N_h = 1)": [0]}, gan_factors=(1.0,), gan_steps=2)
    sd, ard = ladder_runs(cfg)
    pending = pending_jobs([cfg])
    sd_key, ard_key = ("rung", 0, "step distillation", 0), ("rung", 0, "ARD (N_h = 1)", 0)
    arms = sorted(k for k in pending if k[0] == "gan")
    assert len(pending) == 6 and pending[sd_key].todo == [3, 6] and len(arms) == 4
    assert next_jobs(pending, set(), 3) == [ard_key, sd_key]  # arms wait for their base rung
    (sd.run_dir / "rungs").mkdir(parents=True)
    for n in (3, 6):
        sd.rung_json(n).write_text("{}")
    done_sd = pending_jobs([cfg])
    assert sd_key not in done_sd and next_jobs(done_sd, {ard_key}, 3) == [
        ("gan", 0, "step-distillation-seed0-from6-control"), ("gan", 0, "step-distillation-seed0-from6-gan1")]
    for n in (3, 6):
        sd.rung_json(n).unlink()
    # SD 1 s/step, ARD 2 s/step, arms 1 s/step, 2 jobs: SD 0-3-6 (rung 3 then 6), ARD 0-6 (rung 3) then 6-12
    # (rung 6; it sorts before SD's arms, which start at 6 and 8 in the other slot), ARD's arms 12-14
    speed = {k: (2.0 if k == ard_key else 1.0) for k in pending}
    at = {k: (6 if k[0] == "gan" else 0) for k in pending}
    assert simulate(pending, 2, at, speed) == pytest.approx(14.0)
    assert simulate(pending, 1, at, speed) == pytest.approx(3 + 6 + 3 + 6 + 4 * 2)
    assert pending[sd_key].todo == [3, 6]  # the replay leaves the jobs as they were
    with pytest.raises(ValueError, match="nothing can run"):
        simulate({k: j for k, j in pending.items() if k != ard_key}, 2, at, speed)


def test_history_swap_table_reads_the_final_step_of_each_per_step_column():
    """Seed means of the final step; excess removed = (free - teacher's history) / (free - forced); change =
    another image's history over free-running, minus 1."""
    rows = [{"teacher": "t", "student": "ARD (N_h = 1)", "seed": s, "steps": "10", "mse_to_teacher": 1.0,
             "mse_to_teacher_history_cut": 2.0, "mse_with_vs_cut": 1.0, "fd": 5.0, "fd_history_cut": 6.0,
             "fd_to_teacher": 1.0, "fd_to_teacher_history_cut": 2.0, "mse_forced": f"0.1 {1 + s}",
             "mse_free": f"0.2 {4 + s}", "mse_teacher_history": f"0.2 {3 + s}", "mse_other_history": f"0.3 {4.5 + s}"}
            for s in (0, 1)]
    # final step means: forced 1.5, free 4.5, teacher's history 3.5 (removes 1/3), another image's 5.0 (+11.1%)
    assert "| t | ARD (N_h = 1) | 10 | 2 | 1.50000 | 4.50000 | 3.50000 | +33% | 5.00000 | +11.1% |" in \
        history_swap_table(rows)
    # no excess over teacher-forced (e.g. a one-step student): nothing to remove, no division
    one = dict(rows[0], steps="20", mse_forced="0.2", mse_free="0.2", mse_teacher_history="0.2",
               mse_other_history="0.2")
    assert "| t | ARD (N_h = 1) | 20 | 1 | 0.20000 | 0.20000 | 0.20000 | - | 0.20000 | +0.0% |" in \
        history_swap_table(rows + [one])
