"""Students trained with the public ARD code (models_ARD.py layout) load into ARDStudent and compute
what the public forward and its KV-cached ``infer`` compute (re-implemented in tests/reference_impl.py);
the "public-ard" recipe builds the same student from a teacher."""

from __future__ import annotations

import argparse

import pytest
import torch

from ardistill.io.checkpoints import CheckpointError
from ardistill.io.student_io import import_public_ard, load_student, public_ard_layout, save_student
from ardistill.models.dit import DiT, DiTConfig, dit_config
from ardistill.models.student import STUDENT_RECIPES, public_ard_student, recipe_student_config
from reference_impl import Ref, ard_forward, ard_infer
from tiny_teachers import TINY_DIT
from tolerances import assert_paths_agree

TINY = dict(TINY_DIT, depth=3)
HEADS = ("final_layer", "final_layer2", "final_layer3", "final_layer4")


def _public_state(seed: int = 0, learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """A models_ARD.DiT state dict for a tiny size: DiT's keys plus final_layer2..4, all random."""
    teacher = DiT(DiTConfig(**TINY, learn_sigma=learn_sigma))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in teacher.state_dict().items():
        names = [k.replace("final_layer", h, 1) for h in HEADS] if k.startswith("final_layer.") else [k]
        for name in names:
            sd[name] = v.clone() if k == "pos_embed" else torch.randn(v.shape, generator=g) * 0.1
    return sd


def _ckpt(sd, stack=2):
    # what train_ARD.py saves (args is its argparse.Namespace; --stack is N_h)
    return {"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-T/2", stack=stack, image_size=64)}


@pytest.fixture
def public(tmp_path):
    sd = _public_state()
    torch.save(_ckpt(sd), tmp_path / "0300000.pt")
    return tmp_path / "0300000.pt", sd


@pytest.mark.numerics
def test_import_config_and_forward_match_the_public_code(public):
    path, sd = public
    student = import_public_ard(path)
    cfg = student.cfg
    assert (cfg.num_steps, cfg.history_layers, cfg.heads, cfg.time_labels, cfg.target, cfg.mask) == \
        (4, 2, "per_step", "uniform", "x0", "M4")
    assert cfg.block_times == (999.0, 749.25, 499.5, 249.75)
    assert cfg.teacher == DiTConfig(**TINY, learn_sigma=True)  # the teacher it came from (DiT-XL/2 for real files)
    ref = Ref(sd, 4, 2, 8)
    g = torch.Generator().manual_seed(2)
    zT, z15, z10, z5 = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(4))
    y, t = torch.tensor([0, 5, 9]), torch.full((3,), 999.0)
    with torch.no_grad():
        want = ard_forward(ref, 4, z5, z10, z15, zT, t, 2, y)
        got = student(torch.stack([zT, z15, z10, z5], dim=1), y)
    assert want[3].abs().mean() > 0.05
    for k in range(4):  # ours vs the public code's forward (re-implemented): two code paths, float32 rounding
        assert_paths_agree(got[:, k], want[k], msg=f"block {k}")


@pytest.mark.numerics
@pytest.mark.parametrize("stack", [0, 2, 3])
def test_cached_sampling_matches_public_infer(tmp_path, stack):
    sd = _public_state(seed=stack)
    torch.save(_ckpt(sd, stack=stack), tmp_path / "s.pt")
    student = import_public_ard(tmp_path / "s.pt")
    zT, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 10])  # 10 = null
    with torch.no_grad():
        want = ard_infer(Ref(sd, 4, 2, 8), 4, zT, torch.full((2,), 999.0), stack, y)
        got = student.sample(zT, y, return_all=True)
    for k in range(4):  # two samplers of 4 steps: each output carries the rounding of up to 4 passes
        assert_paths_agree(got[:, k], want[k], gain=4, msg=f"step {k + 1}")


def test_load_student_reads_public_pt_and_round_trips(tmp_path, public):
    path, _ = public
    student = load_student(path)  # was "not a readable safetensors file: header too large"
    again_model = load_student(path, prefer="model")
    assert student.cfg == again_model.cfg
    save_student(tmp_path / "ours.safetensors", student)
    ours = load_student(tmp_path / "ours.safetensors")
    x, y = torch.randn(1, 4, 4, 8, 8), torch.tensor([2])
    with torch.no_grad():
        assert torch.equal(ours(x, y), student(x, y))  # the same class, weights read back from a file: bit-equal
    # the layout writer is the importer's inverse (learned-sigma rows are not used and come back as zeros)
    layout = public_ard_layout(student)
    assert set(layout) == set(torch.load(path, weights_only=False)["ema"])


def test_errors_name_the_keys(tmp_path):
    sd = _public_state()
    no3 = {k: v for k, v in sd.items() if not k.startswith("final_layer3.")}
    torch.save(_ckpt(no3), tmp_path / "no3.pt")
    with pytest.raises(CheckpointError, match=r"no3.pt: final layers \['final_layer3'\] are missing"):
        import_public_ard(tmp_path / "no3.pt")
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    missing["final_layer4.extra"] = torch.zeros(2)
    torch.save(_ckpt(missing), tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: 1 missing keys: blocks.1.mlp.fc2.bias; "
                                              r"1 unexpected keys: final_layer4.extra"):
        import_public_ard(tmp_path / "missing.pt")
    wrong = dict(sd, **{"final_layer2.linear.weight": torch.zeros(5, 64)})
    torch.save(_ckpt(wrong), tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong.pt: 1 shape mismatches: final_layer2.linear.weight \(file \(5, 64\)"):
        import_public_ard(tmp_path / "wrong.pt")
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare.pt: the number of history layers is not in the file"):
        import_public_ard(tmp_path / "bare.pt")
    assert import_public_ard(tmp_path / "bare.pt", history_layers=1).cfg.history_layers == 1
    torch.save(_ckpt(sd), tmp_path / "stack2.pt")
    with pytest.raises(CheckpointError, match=r"history_layers=1 contradicts the file's args.stack = 2"):
        import_public_ard(tmp_path / "stack2.pt", history_layers=1)
    teacher_sd = {k: v for k, v in sd.items() if not k.startswith(HEADS[1:])}
    torch.save(teacher_sd, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=r"teacher.pt: only final_layer.*teacher checkpoint"):
        load_student(tmp_path / "teacher.pt")


def test_public_ard_recipe_builds_the_same_student(random_dit):
    teacher = random_dit(depth=3)
    student = public_ard_student(teacher, history_layers=2)
    cfg = student.cfg
    assert {k: getattr(cfg, k) for k in STUDENT_RECIPES["public-ard"]} == STUDENT_RECIPES["public-ard"]
    assert cfg.block_times == (999.0, 749.25, 499.5, 249.75) and len(student.heads) == 4
    # the recipe computes the block times from the teacher's process: S = 3, or a SiT teacher
    assert recipe_student_config("public-ard", teacher.cfg, num_steps=3, history_layers=2).block_times == (999.0, 666.0, 333.0)
    sit = dit_config("DiT-XL/2", prediction="velocity", process="sit")
    assert recipe_student_config("public-ard", sit).block_times == (0.0, 0.25, 0.5, 0.75)
    with pytest.raises(ValueError, match="unknown student recipe 'ard'"):
        recipe_student_config("ard", teacher.cfg)


def test_presets_name_the_recipe():
    from ardistill.presets import PresetError, load_preset
    p = load_preset("imagenet256-ard")
    s = p.student_config()
    assert p.derived["student_recipe"] == "public-ard"
    assert (s.target, s.time_labels, s.heads, s.mask) == ("x0", "uniform", "per_step", "M4")
    assert s.block_times == (999.0, 749.25, 499.5, 249.75)
    # a field the section sets wins over the recipe
    assert load_preset("imagenet256-ard", overrides={"student.heads": "shared"}).student_config().heads == "shared"
    with pytest.raises(PresetError, match=r"student.recipe 'ard' is not a named recipe"):
        load_preset("imagenet256-ard", overrides={"student.recipe": "ard"})


def test_cli_import_student(tmp_path, public, capsys):
    from ardistill.cli import main
    out = tmp_path / "student.safetensors"
    assert main(["import-student", "--pt", str(public[0]), "--out", str(out)]) == 0
    assert "heads='per_step'" in capsys.readouterr().out
    assert load_student(out).cfg == import_public_ard(public[0]).cfg
    torch.save(public[1], tmp_path / "bare.pt")
    assert main(["import-student", "--pt", str(tmp_path / "bare.pt"), "--out", str(out)]) == 2
    assert "pass history_layers" in capsys.readouterr().err
