"""Presets: every shipped recipe resolves; contradictions are rejected naming the key; CLI --dry-run."""

from __future__ import annotations

import json

import pytest

from ardistill.cli import main
from ardistill.presets import PresetError, list_presets, load_preset, parse_assignment, read_preset, resolve

SHIPPED = ("imagenet256-ard", "imagenet256-step-distill", "digits-ard", "digits-step-distill")


def test_shipped_presets_are_listed_and_resolve():
    assert set(SHIPPED) <= set(list_presets())
    for name in list_presets():
        p = load_preset(name)
        d = p.to_dict()
        json.dumps(d)  # plain JSON
        assert d["name"] == name and d["derived"]["batch"]["global"] == d["distill"]["batch_size"]


def test_imagenet_preset_is_the_papers_setting():
    p = load_preset("imagenet256-ard")
    d = p.to_dict()
    assert d["teacher"]["arch"] == "DiT-XL/2" and d["teacher"]["config"]["depth"] == 28
    assert d["codec"]["scale"] == 0.18215 and d["codec"]["image_size"] == 256
    rec = p.record_config()
    assert (rec.solver, rec.teacher_steps, rec.cfg_scale, rec.num_steps) == ("ddim", 25, 1.5, 4)
    assert rec.guidance_channels == 3  # DiT's legacy forward_with_cfg, for exact reproduction
    assert d["derived"]["grid"]["positions"] == [0, 9, 14, 19, 25]
    assert d["derived"]["grid"]["times"][1:4] == [624.0, 416.0, 208.0]  # DDIM indices 15, 10, 5
    s = p.student_config()
    assert s.history_layers == 6 and s.mask == "M4" and s.block_times == (999.0, 749.25, 499.5, 249.75)
    dist = p.distill_config(recording="r", teacher="t", run_dir="o")
    assert (dist.lr, dist.weight_decay, dist.grad_clip, dist.ema_decay, dist.batch_size, dist.steps) == \
        (1e-4, 0.0, 1.0, 0.9999, 64, 300_000)
    assert d["derived"]["batch"] == {"global": 64, "world_size": 8, "micro_batch": 8, "grad_accum": 1}
    assert abs(d["derived"]["gflops_per_sample"]["ard_overhead"] - 0.0115) < 5e-4  # the paper's "1.1%"
    assert d["eval"]["num_samples"] == 50_000


def test_step_distill_extends_ard_with_no_history():
    a, b = load_preset("imagenet256-ard"), load_preset("imagenet256-step-distill")
    assert b.student_config().history_layers == 0 and b.derived["gflops_per_sample"]["ard_overhead"] == 0
    assert a.record_config() == b.record_config()  # one recording serves both
    assert "notes" in b.raw and b.raw["notes"] != a.raw["notes"]


def test_fewer_gpus_accumulate_gradients():
    assert load_preset("imagenet256-ard", world_size=2).derived["batch"] == \
        {"global": 64, "world_size": 2, "micro_batch": 8, "grad_accum": 4}
    assert load_preset("imagenet256-ard", world_size=2).distill_config("r", "t", "o").grad_accum == 4


@pytest.mark.parametrize("overrides, match", [
    ({"distill.batch_size": 60}, r"batch_size = 60 is not divisible by 8 processes x micro_batch 8"),
    ({"distill.grad_accum": 2}, r"64 != 8 processes x micro_batch 8 x grad_accum 2"),
    ({"student.history_layers": 29}, r"student.history_layers = 29 is outside \[0, depth = 28\]"),
    ({"record.positions": [0, 9, 14, 19, 26]}, r"positions must be 5 strictly increasing grid positions"),
    ({"record.positions": [0, 5, 10, 15, 25]}, r"record.positions \[0, 5, 10, 15, 25\] contradict record.grid 'ard'"),
    ({"student.num_steps": 3}, r"student.num_steps = 3 but the recording has record.num_steps = 4"),
    ({"record.guidance_channels": 5}, r"guidance_channels = 5 but the teacher has 4 channels"),
    ({"codec.image_size": 512}, r"codec.image_size = 512 but the teacher's input_size 32"),
    ({"codec.latent_channels": 16}, r"codec.latent_channels = 16 but the teacher has in_channels = 4"),
    ({"eval.base_seed": 0}, r"eval seeds \[0, 50000\) overlap"),
    ({"record.x0_preds": False}, r"target 'x0' needs record.x0_preds"),
    ({"distill.lr": -1.0}, r"lr and adam_eps must be > 0"),
    ({"distill.learning_rate": 1.0}, r"unknown keys in 'distill': \['learning_rate'\]"),
    ({"teacher.arch": "DiT-Q/2"}, r"teacher.arch 'DiT-Q/2' is not a registered DiT size"),
    ({"record.count": 32}, r"distill.batch_size = 64 exceeds record.count = 32"),
])
def test_contradictions_are_rejected_naming_the_key(overrides, match):
    with pytest.raises(PresetError, match=match) as e:
        load_preset("imagenet256-ard", overrides=overrides)
    assert "imagenet256-ard.json" in str(e.value)


def test_positions_without_grid_key_need_only_be_valid():
    raw, _ = read_preset("imagenet256-ard")
    del raw["record"]["grid"]
    raw["record"]["positions"] = [0, 5, 10, 15, 25]
    assert resolve(raw).derived["grid"]["positions"] == [0, 5, 10, 15, 25]


def test_preset_file_path_and_extends_cycle(tmp_path, monkeypatch):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"name": "a", "extends": "b"}))
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "extends": "a"}))
    monkeypatch.setenv("ARDISTILL_CONFIGS", str(tmp_path))
    with pytest.raises(PresetError, match="cycle"):
        load_preset("a")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"extends": "digits-ard", "distill": {"steps": 7}}))
    assert load_preset(str(mine)).distill_config("r", "t", "o").steps == 7
    with pytest.raises(PresetError, match="unknown preset"):
        load_preset("no-such-preset")
    (tmp_path / "bad.json").write_text(json.dumps({"teacher": {}, "extra": 1}))
    with pytest.raises(PresetError, match=r"unknown sections \['extra'\]"):
        load_preset("bad")


def test_parse_assignment():
    assert parse_assignment("distill.lr=2e-4") == ("distill.lr", 2e-4)
    assert parse_assignment("record.positions=[0,1,2]") == ("record.positions", [0, 1, 2])
    assert parse_assignment("eval.reference=ref.npz") == ("eval.reference", "ref.npz")
    with pytest.raises(PresetError):
        parse_assignment("distill.lr")


def test_cli_dry_runs_print_the_resolved_config(capsys):
    assert main(["presets", "digits-ard", "--set", "distill.steps=9"]) == 0
    assert json.loads(capsys.readouterr().out)["distill"]["steps"] == 9
    assert main(["distill", "--preset", "imagenet256-ard", "--dry-run", "--lr", "2e-4", "--grad-accum", "2",
                 "--run-dir", "runs/x"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["distill"]["lr"] == 2e-4 and d["derived"]["batch"]["micro_batch"] == 4
    assert d["paths"]["run_dir"] == "runs/x"
    assert main(["record", "--preset", "imagenet256-ard", "--dry-run", "--num-steps", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["record"]["num_steps"] == 3 and d["record"]["count"] == 1_280_000
    assert len(d["derived"]["grid"]["positions"]) == 4
    assert main(["record", "--preset", "imagenet256-ard", "--dry-run", "--positions", "0,5,10,15,25"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["grid"]["positions"] == [0, 5, 10, 15, 25]
    assert main(["record", "--preset", "imagenet256-ard", "--dry-run", "--guidance-channels", "5"]) == 2
    assert "guidance_channels = 5" in capsys.readouterr().err
    assert main(["record", "--teacher", "t", "--out", "o"]) == 2
    assert "--count is required" in capsys.readouterr().err


def test_presets_ship_inside_the_package():
    import ardistill
    from pathlib import Path
    from ardistill.presets import config_dirs, list_presets
    pkg = Path(ardistill.__file__).resolve().parent
    assert config_dirs()[-1] == pkg / "configs"
    assert {"digits-ard", "imagenet256-ard"} <= set(list_presets())
