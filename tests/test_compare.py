"""The comparison driver (demo / sweep) end to end on a tiny random teacher, and the report files."""

import json

import numpy as np
import pytest
import torch

from ardistill.io.checkpoints import save_checkpoint_safetensors
from ardistill.comparison import CompareConfig, compare, comparison_variants, summarize, sweep_variants
from ardistill.models.dit import build_dit
from ardistill.evaluation.evaluate import fd_degradation_ratio
from tiny_teachers import random_from_global_rng


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    t = random_from_global_rng(lambda: build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10,
                                                 learn_sigma=False), std=0.02)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint_safetensors(t, path)
    return path


@pytest.mark.slow
def test_compare_writes_a_parseable_report(tiny_teacher, tmp_path, monkeypatch):
    cfg = CompareConfig(out=str(tmp_path / "demo"), teacher=str(tiny_teacher), train_count=40, eval_count=30,
                        teacher_steps=6, steps=3, batch_size=8, record_batch=16, latency_batch=4, latency_repeats=1,
                        seeds=(0, 1), progress=False)
    variants = {"step distillation": {"history_layers": 0}, "ARD": {"history_layers": 1}}
    import ardistill.io.weights as weights
    built, new_dit = [], weights._new_dit  # every teacher file read goes through _new_dit
    monkeypatch.setattr(weights, "_new_dit", lambda c: (built.append(c), new_dit(c))[1])
    report = compare(cfg, variants)
    assert len(built) == 1  # the teacher is loaded once: recording, 4 training runs, evaluation share it
    monkeypatch.setattr(weights, "_new_dit", new_dit)
    out = report.parent
    for name in ("report.md", "metrics.json", "grid.png", "trajectory_errors.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    names = [r["name"] for r in m["models"]]
    assert names[1].startswith("teacher") and any(n.startswith("ARD") for n in names)
    ard = next(r for r in m["models"] if r["name"].startswith("ARD"))
    assert len(ard["trajectory_errors"]["free_running"]) == 4
    assert np.isfinite(ard["fd"]) and 0 <= ard["precision"] <= 1
    s = m["summary"]
    assert s["ARD"]["seeds"] == [0, 1] and "fd_degradation_ratio" in s
    assert len(s["per_seed"]) == 4
    text = report.read_text()
    assert "| teacher" in text and "Per-step MSE" in text
    # the history-cut ablation is measured for the history student only
    cut = [r for r in s["per_seed"] if "history_cut" in r]
    assert {r["variant"] for r in cut} == {"ARD"} and len(cut) == 2
    assert set(cut[0]["history_cut"]) == {"mse_to_teacher", "mse_to_teacher_history_cut", "mse_with_vs_cut", "fd",
                                          "fd_teacher"}
    assert "History use at sampling" in text and "| ARD |" in text
    # rerunning resumes: nothing is recorded or trained again, the report is the same (the evaluation reruns
    # with the same kernels on the same inputs in one process, so exact equality is valid)
    first = json.loads((out / "metrics.json").read_text())["summary"]["per_seed"]
    compare(cfg, variants)
    again = json.loads((out / "metrics.json").read_text())["summary"]["per_seed"]
    assert [r["fd"] for r in first] == [r["fd"] for r in again]


def test_degradation_ratio_and_summary():
    assert fd_degradation_ratio(2.89, 10.25, 4.32) == pytest.approx(5.147, abs=1e-3)
    assert fd_degradation_ratio(1.0, 3.0, 0.5) == float("inf")
    rows = [{"variant": v, "seed": s, "fd": fd, "inception_score": 1.0, "precision": 0.5, "recall": 0.5}
            for v, s, fd in [("sd", 0, 10.0), ("sd", 1, 12.0), ("ard", 0, 4.0), ("ard", 1, 6.0)]]
    out = summarize(rows, ["sd", "ard"], teacher_fd=2.0)
    assert out["sd"]["fd"]["mean"] == 11.0 and out["sd"]["fd"]["std"] == pytest.approx(np.std([10, 12], ddof=1))
    assert out["fd_degradation_ratio"] == pytest.approx(9 / 3)
    assert out["fd_degradation_ratio_per_seed"] == pytest.approx([2.5, 4.0])  # (12-2)/(6-2), (10-2)/(4-2)


def test_sweep_variants_cover_the_ablations():
    assert list(sweep_variants("mask", 6)) == ["mask M1", "mask M2", "mask M3", "mask M4"]
    hl = sweep_variants("history_layers", 6)
    assert [v["history_layers"] for v in hl.values()] == [0, 1, 3, 6]
    op = sweep_variants("on_policy", 6, steps=100)
    assert len(op) == 6 and op["ARD on-policy p=0.5 from step 50"] == {"history_layers": 1, "on_policy_prob": 0.5,
                                                                       "on_policy_start": 50}
    with pytest.raises(ValueError, match="unknown sweep axis"):
        sweep_variants("depth", 6)


def test_comparison_variants_are_the_papers_comparison():
    v = comparison_variants(depth=4, steps=300)
    names = list(v)
    # the ratio pair first: step distillation, then ARD with the default N_h (6/28 of 4 layers -> 1)
    assert names[:2] == ["step distillation", "ARD (N_h=1)"]
    assert v["step distillation"] == {"history_layers": 0} and v["ARD (N_h=1)"] == {"history_layers": 1}
    assert v["ARD (N_h=2)"] == {"history_layers": 2} and v["ARD (N_h=4)"] == {"history_layers": 4}
    assert v["ARD (N_h=1), per-step heads"] == {"history_layers": 1, "heads": "per_step"}
    # the heads' control: step distillation with the same per-step heads
    assert v["step distillation, per-step heads"] == {"history_layers": 0, "heads": "per_step"}
    public = {"target": "x0", "time_labels": "uniform", "heads": "per_step", "mask": "M4"}
    assert v["ARD (N_h=1), public code's settings"] == {"history_layers": 1, **public}
    assert v["step distillation, public code's settings"] == {"history_layers": 0, **public}
    assert v["ARD (N_h=1), on-policy p=0.5 from step 150"] == {"history_layers": 1, "on_policy_prob": 0.5,
                                                               "on_policy_start": 150}
    assert v["ARD (N_h=1), on-policy p=0.5 from step 150, teacher-relabelled"] == {
        "history_layers": 1, "on_policy_prob": 0.5, "on_policy_start": 150, "on_policy_targets": "teacher"}
    assert len(v) == 10
    # depth 2, N_h 1: the sweep does not repeat N_h=2 (= all layers)
    assert [n for n in comparison_variants(2, 10) if n.startswith("ARD (N_h=") and "," not in n] == ["ARD (N_h=1)",
                                                                                                  "ARD (N_h=2)"]


def test_compare_refuses_an_unknown_gan_variant_before_any_work(tiny_teacher, tmp_path):
    cfg = CompareConfig(out=str(tmp_path / "x"), teacher=str(tiny_teacher), progress=False)
    with pytest.raises(ValueError, match="gan_variant 'ARD'"):
        compare(cfg, {"step distillation": {"history_layers": 0}}, gan=True, gan_variant="ARD")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compare_with_gan_row(tiny_teacher, tmp_path, monkeypatch):
    import ardistill.training.finetune_gan as fg
    for k, v in dict(steps=4, gan_warmup=1, batch_size=8).items():
        monkeypatch.setitem(fg.DIGITS_GAN_SETTINGS, k, v)
    cfg = CompareConfig(out=str(tmp_path / "gan"), teacher=str(tiny_teacher), train_count=40, eval_count=30,
                        teacher_steps=6, steps=3, batch_size=8, record_batch=16, latency_batch=4, latency_repeats=1,
                        progress=False, gan={"gan_factor": 2.0})
    # the fine-tuned variant is named (not the last one): as scripts/photos_study.py --gan does
    report = compare(cfg, {"step distillation": {"history_layers": 0}, "ARD": {"history_layers": 1},
                           "ARD (N_h=2)": {"history_layers": 2}}, gan=True, gan_variant="ARD")
    m = json.loads((report.parent / "metrics.json").read_text())
    assert [r["name"] for r in m["models"]][-2:] == ["ARD (R, control)", "ARD (R+G)"]
    students = tmp_path / "gan" / "students"
    assert not (students / "ard-n-h-2-seed0-gan").exists()
    assert "ARD (R+G)" in m["summary"] and (students / "ard-seed0-gan" / "ema.safetensors").is_file()
    # the control is the same fine-tuning with GAN weight 0
    control = json.loads((students / "ard-seed0-control" / "config.json").read_text())["gan"]
    gan_cfg = json.loads((students / "ard-seed0-gan" / "config.json").read_text())["gan"]
    assert control.pop("gan_factor") == 0.0 and gan_cfg.pop("gan_factor") == 2.0  # CompareConfig.gan reached it
    assert {k: v for k, v in control.items() if k != "run_dir"} == {k: v for k, v in gan_cfg.items() if k != "run_dir"}
    assert "GAN weight 0" in report.read_text() and "factor 2.0" in report.read_text()


def test_compare_gan_settings_are_validated_and_the_demo_flag_sets_the_factor():
    import argparse

    from ardistill.cli import _add_demo
    with pytest.raises(ValueError, match=r"\['student'\] are not GAN settings"):
        CompareConfig(gan={"student": "x"})
    with pytest.raises(ValueError, match="bogus"):
        CompareConfig(gan={"bogus": 1})
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    _add_demo(sub)
    from ardistill.cli import _compare_config
    args = sub.choices["demo"].parse_args(["--gan", "--gan-factor", "10"])
    assert _compare_config(args, {}, "runs/demo").gan == {"gan_factor": 10.0}


@pytest.mark.slow
def test_sweep_trains_a_shared_variant_once_and_writes_one_table(tiny_teacher, tmp_path):
    from ardistill.comparison import sweep
    cfg = CompareConfig(out=str(tmp_path / "sweep"), teacher=str(tiny_teacher), train_count=40, eval_count=30,
                        teacher_steps=6, steps=2, batch_size=8, record_batch=16, latency_batch=4, latency_repeats=1,
                        progress=False)
    table = sweep(cfg, axes=("mask", "heads"))
    # mask: M1-M4 with ARD's N_h; heads: SD/ARD x shared/per-step. "ARD heads=shared" is "mask M4" (the
    # default mask), so 7 distinct students are trained for 8 rows
    students = sorted((tmp_path / "sweep" / "students").glob("*-seed0"))
    assert len(students) == 7
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert len(rows) == 8 and {r["axis"] for r in rows} == {"mask", "heads"}
    m4 = next(r for r in rows if r["variant"] == "mask M4")
    shared = next(r for r in rows if r["variant"] == "ARD heads=shared")
    assert m4["fd"] == shared["fd"]  # one student, evaluated twice with the same kernels: exact
    assert table.read_text().count("\n| ") == 8 + 1  # header + 8 rows


def test_fd_to_teacher_is_zero_for_the_teacher_and_grows_with_a_shift():
    from ardistill.evaluation.evaluate import image_features, image_metrics

    class Net(torch.nn.Module):  # features = the pixels
        def forward(self, x):
            return x.flatten(1)

        def features(self, x):
            return x.flatten(1)

    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(300, 1, 2, 2, generator=g) - 0.5
    tf = image_features(teacher, Net())
    assert image_metrics(teacher, tf, Net(), teacher_features=tf).fd_teacher == pytest.approx(0.0, abs=1e-6)
    near = image_metrics(teacher + 0.1, tf, Net(), teacher_features=tf).fd_teacher
    far = image_metrics(teacher + 0.3, tf, Net(), teacher_features=tf).fd_teacher
    assert near == pytest.approx(4 * 0.1 ** 2, rel=1e-3) and far == pytest.approx(4 * 0.3 ** 2, rel=1e-3)
    assert np.isnan(image_metrics(teacher, tf, Net()).fd_teacher)


def test_demo_flags_reach_the_comparison_config():
    import argparse

    from ardistill.cli import _compare_args, _compare_config
    from ardistill.comparison import DEMO_PRESETS
    p = argparse.ArgumentParser()
    _compare_args(p, "runs/demo")
    args = p.parse_args(["--seeds", "0,1,2", "--steps", "50", "--on-policy-prob", "0.5", "--on-policy-start", "25",
                         "--target", "x0"])
    cfg = _compare_config(args, DEMO_PRESETS["full"], "runs/demo")
    assert cfg.seeds == (0, 1, 2) and cfg.steps == 50 and cfg.train_count == 8192 and cfg.out == "runs/full"
    assert cfg.student == {"on_policy_prob": 0.5, "on_policy_start": 25, "target": "x0"}


def test_benchmark_flag_picks_the_photos_presets():
    import argparse

    from ardistill.cli import _compare_args, _compare_config
    from ardistill.comparison import BENCHMARK_PRESETS, PHOTOS_PRESETS
    p = argparse.ArgumentParser()
    _compare_args(p, "runs/demo")
    args = p.parse_args(["--benchmark", "photos"])
    cfg = _compare_config(args, BENCHMARK_PRESETS["photos"]["quick"], "runs/demo")
    assert cfg.benchmark == "photos" and cfg.out == PHOTOS_PRESETS["quick"]["out"]
    assert cfg.steps == PHOTOS_PRESETS["quick"]["steps"]
    with pytest.raises(ValueError, match="benchmark"):
        CompareConfig(benchmark="cifar")


@pytest.mark.slow
def test_photos_demo_end_to_end_on_a_tiny_setting(tmp_path):
    """The photos quick preset, shrunk: shipped photos classifier, held-out photo crops, a tiny RGB teacher."""
    from dataclasses import replace

    from ardistill.comparison import PHOTOS_PRESETS
    t = random_from_global_rng(lambda: build_dit("DiT-T/2", input_size=16, in_channels=3, num_classes=10,
                                                 learn_sigma=False), std=0.02)
    save_checkpoint_safetensors(t, tmp_path / "teacher.safetensors")
    cfg = replace(CompareConfig(**PHOTOS_PRESETS["quick"]), out=str(tmp_path / "demo"),
                  teacher=str(tmp_path / "teacher.safetensors"), train_count=24, eval_count=20, teacher_steps=10,
                  steps=2, batch_size=8, record_batch=8, latency_batch=4, latency_repeats=1, progress=False)
    report = compare(cfg, {"step distillation": {"history_layers": 0}, "ARD": {"history_layers": 1}})
    m = json.loads((report.parent / "metrics.json").read_text())
    assert m["models"][0]["name"] == "held-out real photos (vs train split)"
    assert all(np.isfinite(r["fd"]) for r in m["models"])
    assert "FD (photos classifier)" in report.read_text()


@pytest.mark.slow
def test_photos_gan_rows_use_the_photos_as_real_data(tmp_path, monkeypatch):
    """demo --benchmark photos --gan: the discriminator's real images are the photo crops, not the digits."""
    from dataclasses import replace

    import ardistill.training.finetune_gan as fg
    from ardistill.comparison import PHOTOS_PRESETS
    for k, v in dict(steps=3, gan_warmup=1, batch_size=8).items():
        monkeypatch.setitem(fg.DIGITS_GAN_SETTINGS, k, v)
    torch.manual_seed(0)
    t = build_dit("DiT-T/2", input_size=16, in_channels=3, num_classes=10, learn_sigma=False)
    save_checkpoint_safetensors(t, tmp_path / "teacher.safetensors")
    cfg = replace(CompareConfig(**PHOTOS_PRESETS["quick"]), out=str(tmp_path / "demo"),
                  teacher=str(tmp_path / "teacher.safetensors"), train_count=24, eval_count=20, teacher_steps=6,
                  steps=2, batch_size=8, record_batch=8, latency_batch=4, latency_repeats=1, progress=False)
    report = compare(cfg, {"step distillation": {"history_layers": 0}, "ARD": {"history_layers": 1}}, gan=True)
    gan_cfg = json.loads((tmp_path / "demo" / "students" / "ard-seed0-gan" / "config.json").read_text())["gan"]
    assert gan_cfg["real"] == "photos"
    assert "ARD (R+G)" in report.read_text()


def test_a_teacher_of_another_shape_is_refused_before_any_work(tiny_teacher, tmp_path):
    cfg = CompareConfig(out=str(tmp_path / "x"), benchmark="photos", teacher=str(tiny_teacher), progress=False)
    with pytest.raises(ValueError, match="photos benchmark"):
        compare(cfg, {"step distillation": {"history_layers": 0}})
    assert not (tmp_path / "x" / "recordings").exists()


def test_report_grid_labels_each_row_with_its_model(tmp_path):
    from PIL import Image

    from ardistill.evaluation.report import labelled_grid, side_by_side_grid
    from ardistill.io.images import make_grid
    g = torch.Generator().manual_seed(0)
    rows = {name: torch.rand(5, 1, 8, 8, generator=g) * 2 - 1 for name in ("teacher", "step distillation", "ARD")}
    bare = make_grid(torch.cat(list(rows.values())), nrow=5, padding=1, scale=6)
    img = np.asarray(labelled_grid(rows))
    strip = img.shape[1] - bare.shape[1]  # the label strip, left of the samples
    assert img.shape[0] == bare.shape[0] and strip > 0
    assert np.array_equal(img[:, strip:], bare)  # the samples are the bare grid's, unchanged
    assert (img[:, :strip] == 255).mean() > 0.5  # a white strip...
    for r in range(3):  # ...with dark text in every row's band
        assert (img[1 + r * 49:(r + 1) * 49, :strip] < 128).sum() > 10, list(rows)[r]
    wider = np.asarray(labelled_grid({**rows, "ARD (N_h=1), S=3, a long name": rows["ARD"]}))
    assert wider.shape[1] > img.shape[1]  # the strip fits the longest name
    side_by_side_grid(rows, tmp_path / "grid.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), img)


def test_trajectory_error_figure_ticks_whole_student_steps():
    import matplotlib.pyplot as plt

    from ardistill.evaluation.evaluate import ModelResult
    from ardistill.evaluation.report import trajectory_errors_figure
    errs = {S: {"free_running": [0.01 * s for s in range(1, S + 1)], "teacher_forced": [0.01] * S} for S in (3, 4)}
    results = [ModelResult("teacher", 25), ModelResult("step distillation", 4, errors=errs[4]),
               ModelResult("ARD, S=3", 3, errors=errs[3])]
    fig = trajectory_errors_figure(results)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == [1, 2, 3, 4]  # no 1.5 or 2.5 between the steps
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
        assert len(ax.get_lines()) == 4  # free-running and teacher-forced for each student
    finally:
        plt.close(fig)
