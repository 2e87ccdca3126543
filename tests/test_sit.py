"""SiT and REPA flow teachers: the process conventions, the .pt loaders, and parity of our fixed-grid
Euler/Heun with transcriptions of SiT's samplers (torchdiffeq's fixed-grid euler / heun2 on SiT's grid) and
REPA's euler_sampler (tests/reference_impl.py)."""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch

from tolerances import assert_paths_agree
from ardistill.io.checkpoints import (CheckpointError, load_any_teacher, load_sit_pt, load_teacher,
                                      save_checkpoint_safetensors)
from ardistill.models.dit import DiTConfig
from ardistill.models.student import ode_step_coeffs
from ardistill.sampling.diffusion import (FLOW_CONVENTIONS, FlowProcess, VPProcess, named_process, process_for)
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import grid_times, randn_from_seeds, resolve_heun_last_step, solve
from reference_impl import Ref, repa_euler, sit_heun_euler_last, sit_ode
from tiny_teachers import TINY_DIT as TINY


def _random_state(learn_sigma: bool, seed: int = 0, projectors: bool = False) -> dict[str, torch.Tensor]:
    """An original-layout SiT (or REPA SiT) state dict with every weight random (the fixed pos_embed kept)."""
    from ardistill.models.dit import DiT
    model = DiT(DiTConfig(**TINY, learn_sigma=learn_sigma))
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v if k == "pos_embed" else torch.randn(v.shape, generator=g) * 0.1) for k, v in model.state_dict().items()}
    if projectors:  # REPA's build_mlp(hidden, projector_dim, z_dim): Linear, SiLU, Linear, SiLU, Linear
        for i, z in enumerate((12, 20)):
            for j, (o, n) in enumerate(((32, 64), (32, 32), (z, 32))):
                sd[f"projectors.{i}.{2 * j}.weight"] = torch.randn(o, n, generator=g)
                sd[f"projectors.{i}.{2 * j}.bias"] = torch.randn(o, generator=g)
    return sd


def _sit_args(**kw):
    return argparse.Namespace(**{**dict(model="SiT-T/2", path_type="Linear", prediction="velocity", image_size=64), **kw})


def _repa_args(**kw):
    return argparse.Namespace(**{**dict(model="SiT-T/2", path_type="linear", prediction="v", enc_type="dinov2-vit-b",
                                        proj_coeff=0.5, encoder_depth=1, qk_norm=False), **kw})


# ------------------------------------------------------------------------------------------------
# The process conventions


@pytest.mark.parametrize("direction,sign", list(itertools.product(("noise_at_1", "data_at_1"),
                                                                  ("noise_minus_data", "data_minus_noise"))))
@pytest.mark.numerics
def test_flow_conventions_round_trip(direction, sign):
    p = FlowProcess(time_direction=direction, velocity_sign=sign, time_scale=1.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = p.q_sample(x0, t, eps)
    out = p.training_target(x0, eps, t)  # what a perfect network of this convention outputs
    assert torch.allclose(out, (1 if sign == "noise_minus_data" else -1) * (eps - x0))
    assert torch.allclose(p.x0_from_output(x_t, t, out).float(), x0, atol=1e-6)
    assert torch.allclose(p.eps_from_output(x_t, t, out).float(), eps, atol=1e-6)
    assert torch.allclose(p.velocity_from_output(out), eps - x0)  # dx/dt in the process's time
    want = t if direction == "noise_at_1" else 1 - t
    assert torch.allclose(p.model_time(t), want.float())


def test_named_conventions_and_errors():
    sit, repa, flow = named_process("sit"), named_process("repa"), named_process("flow")
    t = torch.tensor([1.0, 0.25], dtype=torch.float64)  # the process's time: 1 = noise
    assert sit.model_time(t).tolist() == [0.0, 0.75]  # SiT: 0 = noise, unscaled
    assert repa.model_time(t).tolist() == [1.0, 0.25]  # REPA: 1 = noise, unscaled
    assert flow.model_time(t).tolist() == [1000.0, 250.0]  # ours / SD3: 1 = noise, x 1000
    assert (sit.velocity_sign, repa.velocity_sign) == ("data_minus_noise", "noise_minus_data")
    assert set(FLOW_CONVENTIONS) == {"flow", "sit", "repa"} and isinstance(named_process("vp"), VPProcess)
    with pytest.raises(ValueError, match="time_direction"):
        FlowProcess(time_direction="forward")
    with pytest.raises(ValueError, match="velocity_sign"):
        FlowProcess(velocity_sign="minus")
    with pytest.raises(ValueError, match="unknown process 'edm'"):
        named_process("edm")
    with pytest.raises(ValueError, match="process 'sit' does not fit prediction 'eps'"):
        DiTConfig(**TINY, process="sit")
    assert process_for(DiTConfig(**TINY, prediction="velocity", process="sit")) == sit
    assert process_for("velocity") == flow and process_for(DiTConfig(**TINY)) == VPProcess()
    assert "process" not in DiTConfig(**TINY).to_dict()  # older configs keep their exact form
    # one ODE jump of the student's "ode_step" output carries the convention's sign
    assert ode_step_coeffs(sit, [1.0, 0.5, -1.0]) == ((1.0, 0.5), (1.0, 0.5))
    assert ode_step_coeffs(repa, [1.0, 0.5, -1.0]) == ((1.0, -0.5), (1.0, -0.5))


@pytest.mark.numerics
def test_training_target_matches_the_ode():
    # A network that outputs the training target of the exact straight path lands on x0 in one Euler step.
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for name in FLOW_CONVENTIONS:
        p = named_process(name)
        fn = lambda x, t_model, y, p=p: p.training_target(x0, eps, None).float()  # noqa: E731
        out = solve(fn, p, eps, torch.zeros(2, dtype=torch.long), 1, "euler")
        assert torch.allclose(out.sample, x0, atol=1e-6), name


# ------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture
def sit_pt(tmp_path):
    sd = _random_state(learn_sigma=True)
    torch.save(sd, tmp_path / "SiT-tiny.pt")
    return tmp_path / "SiT-tiny.pt", sd


@pytest.mark.numerics
def test_bare_sit_pt_loads_with_sit_convention(sit_pt):
    path, sd = sit_pt
    model = load_sit_pt(path)
    assert model.cfg == DiTConfig(**TINY, learn_sigma=True, prediction="velocity", process="sit")
    ref = Ref(sd, 4, 2, 8)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 9, 10])
    with torch.no_grad():
        assert_paths_agree(model(x, t, y), ref.forward(x, t, y))  # our DiT vs SiT's model code: two paths
    # a bare SiT file has DiT's keys and shapes: only the caller can say it is SiT
    assert load_any_teacher(path).cfg.process is None
    assert load_any_teacher(path, process="sit").cfg == model.cfg


def test_sit_training_checkpoint_is_detected(tmp_path):
    model_sd, ema_sd = _random_state(True, seed=1), _random_state(True, seed=2)
    torch.save({"model": model_sd, "ema": ema_sd, "opt": {}, "args": _sit_args()}, tmp_path / "0050000.pt")
    ema = load_any_teacher(tmp_path / "0050000.pt")  # args.path_type says SiT
    assert ema.cfg.process == "sit" and torch.equal(ema.blocks[0].attn.qkv.weight, ema_sd["blocks.0.attn.qkv.weight"])
    raw = load_sit_pt(tmp_path / "0050000.pt", which="model")
    assert torch.equal(raw.blocks[1].mlp.fc2.weight, model_sd["blocks.1.mlp.fc2.weight"])
    torch.save({"ema": ema_sd, "args": _sit_args(path_type="GVP")}, tmp_path / "gvp.pt")
    with pytest.raises(CheckpointError, match=r"gvp.pt: args.path_type = 'GVP'"):
        load_sit_pt(tmp_path / "gvp.pt")
    torch.save({"ema": ema_sd, "args": _sit_args(prediction="noise")}, tmp_path / "noise.pt")
    with pytest.raises(CheckpointError, match=r"args.prediction = 'noise'"):
        load_any_teacher(tmp_path / "noise.pt")


@pytest.mark.numerics
def test_repa_checkpoint_drops_projectors_with_a_message(tmp_path):
    sd = _random_state(learn_sigma=False, projectors=True)
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": _repa_args(), "steps": 4000000}, tmp_path / "repa.pt")
    with pytest.warns(UserWarning, match=r"repa.pt: ignoring REPA's projector heads \(12 tensors"):
        model = load_any_teacher(tmp_path / "repa.pt")
    assert model.cfg == DiTConfig(**TINY, learn_sigma=False, prediction="velocity", process="repa")
    ref = Ref(sd, 4, 2, 4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]), torch.tensor([1, 10])
    with torch.no_grad():
        assert_paths_agree(model(x, t, y), ref.forward(x, t, y))  # our DiT vs SiT's model code: two paths
    with pytest.raises(CheckpointError, match=r"asked to load it as 'sit' but the file is a 'repa' checkpoint"):
        load_sit_pt(tmp_path / "repa.pt", process="sit")
    # REPA's --legacy layout: blocks after encoder_depth named decoder_blocks.<i>
    legacy = {(k.replace("blocks.1.", "decoder_blocks.0.") if k.startswith("blocks.1.") else k): v for k, v in sd.items()}
    torch.save({"ema": legacy, "args": _repa_args(cfg_prob=0.1)}, tmp_path / "legacy.pt")
    with pytest.warns(UserWarning, match="projector"):
        old = load_sit_pt(tmp_path / "legacy.pt")
    assert torch.equal(old.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    # q/k-normalised attention is another architecture: named, not loaded
    qk = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(16), "blocks.0.attn.k_norm.weight": torch.ones(16)})
    torch.save({"ema": qk, "args": _repa_args()}, tmp_path / "qk.pt")
    with pytest.raises(CheckpointError, match=r"qk.pt: .*q/k normalisation.*blocks.0.attn.k_norm.weight"):
        load_sit_pt(tmp_path / "qk.pt")


def test_wrong_or_missing_keys_are_named(tmp_path):
    sd = _random_state(learn_sigma=True)
    bad = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}
    bad["blocks.1.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: 1 missing keys: blocks.1.attn.proj.bias; "
                                              r"1 unexpected keys: blocks.1.extra.weight"):
        load_sit_pt(tmp_path / "bad.pt")
    torch.save({k: v for k, v in sd.items() if k != "pos_embed"}, tmp_path / "nopos.pt")
    with pytest.raises(CheckpointError, match=r"nopos.pt: cannot infer the DiT config: key 'pos_embed' is missing"):
        load_sit_pt(tmp_path / "nopos.pt")
    with pytest.raises(ValueError, match="process must be one of"):
        load_sit_pt(tmp_path / "bad.pt", process="flow")


def test_sit_teacher_round_trips_through_our_format(tmp_path, sit_pt):
    model = load_sit_pt(sit_pt[0])
    save_checkpoint_safetensors(model, tmp_path / "sit.safetensors")
    again = load_teacher(tmp_path / "sit.safetensors")
    assert again.cfg == model.cfg and again.cfg.process == "sit"


# ------------------------------------------------------------------------------------------------
# Sampling parity with the reference samplers


# Tolerance of ours against SiT's sampler (torchdiffeq on SiT's grid): the two are different code paths in
# float32, not bit-equal. SiT's grid is float32 linspace(0, 1) and its Heun stage time is t0 + dt in float32,
# ours is 1 - t in float64 rounded once to float32 (the network's time can differ by one float32 ulp, 6e-8);
# its step is y0 + dt * (k1 / 2 + k2 / 2) with dt a float32 tensor, ours x + (t_next - t_cur) / 2 * (v + v2)
# with a float64 step rounded to float32. Each step thus adds rounding of a few 1e-8 (states of size ~1-10),
# and the random network carries it from evaluation to evaluation. Measured max |diff| over cfg 1 and 4,
# 5, 6 and 10 steps, Euler and Heun: 1.2e-6, i.e. 2-3 float32 ulps of states that reach 4.5. atol 1e-5
# (plus rtol 1e-5 of the value) leaves a margin of 8x or more, and is still 500x below what the choice of
# the last interval changes (5.4e-3 at 10 steps, 2.2e-2 at 5; test_sit_heun_last_step_is_the_whole_difference).
SIT_TOL = dict(rtol=1e-5, atol=1e-5)


def _sit_ours(sit_pt, steps, solver, cfg_scale, **kw):
    model = load_sit_pt(sit_pt[0])
    noise, y = randn_from_seeds([0, 1, 2], (4, 8, 8)), torch.tensor([3, 7, 9])
    return solve(make_model_fn(model, cfg_scale, guidance_channels=3), process_for(model.cfg), noise, y, steps, solver,
                 **kw), noise, y


@pytest.mark.numerics
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("method,steps", [("euler", 6), ("heun2", 5), ("heun2", 10)])
def test_sit_ode_matches_sits_torchdiffeq_sampler(sit_pt, method, steps, cfg_scale):
    """SiT's sample.py --sampling-method {euler, heun2} --num-sampling-steps steps + 1 (time points) against our
    solver with its defaults for a SiT teacher: Heun corrects on every interval (heun_last_step "heun")."""
    path, sd = sit_pt
    ours, noise, y = _sit_ours(sit_pt, steps, "euler" if method == "euler" else "heun", cfg_scale)
    with torch.no_grad():
        ref = sit_ode(Ref(sd, 4, 2, 8), 4, noise, y, 10, cfg_scale, steps, method)
    assert ours.nfe == (steps if method == "euler" else 2 * steps)  # heun2: two evaluations on every interval
    assert (ref - noise).abs().mean() > 0.1  # the sampler moved the state
    torch.testing.assert_close(ours.sample, ref, **SIT_TOL)
    # all-channel guidance is another function: the option is what makes the two agree
    if cfg_scale != 1.0:
        model = load_sit_pt(path)
        other = solve(make_model_fn(model, cfg_scale), process_for(model.cfg), noise, y, steps,
                      "euler" if method == "euler" else "heun").sample
        assert (other - ref)[:, 3].abs().max() > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sit_heun_last_step_is_the_whole_difference(sit_pt, cfg_scale):
    """heun_last_step="euler" (EDM's and REPA's Heun) is REPA's euler_sampler(heun=True) loop on SiT's network;
    it agrees with SiT's heun2 bit for bit up to the last interval and differs from it there only."""
    steps, sd = 10, sit_pt[1]
    full, noise, y = _sit_ours(sit_pt, steps, "heun", cfg_scale, record_at=list(range(steps + 1)))
    skip, _, _ = _sit_ours(sit_pt, steps, "heun", cfg_scale, record_at=list(range(steps + 1)), heun_last_step="euler")
    with torch.no_grad():
        ref = sit_heun_euler_last(Ref(sd, 4, 2, 8), 4, noise, y, 10, cfg_scale, steps)
    assert skip.nfe == 2 * steps - 1 and full.nfe == 2 * steps
    torch.testing.assert_close(skip.sample, ref, **SIT_TOL)
    assert torch.equal(skip.states[:, :-1], full.states[:, :-1])  # the same states up to the last interval
    assert (skip.sample - full.sample).abs().max() > 1e-3  # the last interval's correction (5e-3), >> SIT_TOL


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_sit_reference_is_torchdiffeq(sit_pt, method):
    """The transcription of torchdiffeq's fixed-grid solvers is the package, bit for bit (same operations in the
    same order); our solver matches the package within SIT_TOL. Skipped where torchdiffeq is not installed
    (pip install torchdiffeq; it is a test extra, not a dependency)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    steps, sd = 5, sit_pt[1]
    ours, noise, y = _sit_ours(sit_pt, steps, "euler" if method == "euler" else "heun", 4.0)
    with torch.no_grad():
        package = sit_ode(Ref(sd, 4, 2, 8), 4, noise, y, 10, 4.0, steps, method, odeint=torchdiffeq.odeint)
        written = sit_ode(Ref(sd, 4, 2, 8), 4, noise, y, 10, 4.0, steps, method)
    assert torch.equal(package, written)
    torch.testing.assert_close(ours.sample, package, **SIT_TOL)


@pytest.mark.numerics
@pytest.mark.parametrize("heun", [False, True])
def test_repa_euler_matches_reference(tmp_path, heun):
    sd = _random_state(learn_sigma=False, seed=4, projectors=True)
    torch.save({"ema": sd, "args": _repa_args()}, tmp_path / "repa.pt")
    with pytest.warns(UserWarning):
        model = load_sit_pt(tmp_path / "repa.pt")
    noise, y = randn_from_seeds([5, 6], (4, 8, 8)), torch.tensor([0, 4])
    ours = solve(make_model_fn(model, 1.8), process_for(model.cfg), noise, y, 8, "heun" if heun else "euler").sample
    with torch.no_grad():
        ref = repa_euler(Ref(sd, 4, 2, 4), noise, y, 10, 1.8, 8, heun=heun)
    # 8 steps (16 evaluations with Heun) of a guided output (2w - 1 = 2.6): gain 8 * 2.6 ~ 21
    assert_paths_agree(ours, ref, gain=21)


def test_record_and_student_from_a_sit_teacher(tmp_path, sit_pt):
    from ardistill.data.record import RecordConfig, record
    from ardistill.data.trajectory_format import load_manifest
    from ardistill.training.distill import DistillConfig, build_distill_student
    teacher = load_sit_pt(sit_pt[0])
    rec = RecordConfig(count=4, num_steps=2, teacher_steps=4, solver="heun", cfg_scale=1.5, guidance_channels=3,
                       shard_size=4, batch_size=4, dtype="float32")
    record(teacher, tmp_path / "rec", rec, progress=False)
    manifest = load_manifest(tmp_path / "rec")
    assert manifest["sampler"]["process"]["time_direction"] == "data_at_1"
    assert manifest["sampler"]["heun_last_step"] == "heun"  # SiT's own heun2 corrects every interval
    assert manifest["grid"]["times"] == grid_times(process_for(teacher.cfg), 4)[::2]  # positions 0, 2, 4
    for labels, want in (("true", (0.0, 0.5)), ("uniform", (0.0, 0.5))):
        cfg = DistillConfig(recording=str(tmp_path / "rec"), teacher="-", run_dir="-", time_labels=labels)
        student = build_distill_student(cfg, teacher, manifest)
        assert student.cfg.block_times == want  # SiT's network time: 0 = noise


def test_sit_and_repa_presets():
    from ardistill.presets import load_preset
    sit, repa = load_preset("imagenet256-sit-ard"), load_preset("imagenet256-repa-ard")
    assert sit.teacher_config().process == "sit" and repa.teacher_config().process == "repa"
    assert not repa.teacher_config().learn_sigma and sit.teacher_config().learn_sigma
    assert (sit.record_config().solver, sit.record_config().teacher_steps, sit.record_config().guidance_channels) \
        == ("heun", 50, 3)
    assert sit.derived["grid"]["positions"] == [0, 19, 29, 39, 50]
    assert (repa.record_config().solver, repa.record_config().teacher_steps, repa.record_config().guidance_channels) \
        == ("euler", 50, None)
    # Heun's last interval: SiT's preset says heun2's (100 evaluations for 50 intervals), which is also the SiT
    # family's default; a REPA recording switched to --solver heun takes REPA's euler_sampler(heun=True) rule
    assert sit.record_config().heun_last_step == "heun" and repa.record_config().heun_last_step is None
    assert resolve_heun_last_step("heun", process_for(sit.teacher_config())) == "heun"
    assert resolve_heun_last_step("heun", process_for(repa.teacher_config())) == "euler"
    assert sit.student_config().block_times == (0.0, 0.25, 0.5, 0.75)  # k/S labels in SiT's time (0 = noise)
    assert repa.student_config().block_times == (1.0, 0.75, 0.5, 0.25)
    assert repa.derived["grid"]["positions"] == [0, 19, 29, 39, 50]


def test_cli_import_teacher(tmp_path, sit_pt, capsys):
    from ardistill.cli import main
    out = tmp_path / "sit.safetensors"
    assert main(["import-teacher", "--pt", str(sit_pt[0]), "--process", "sit", "--out", str(out)]) == 0
    assert "process='sit'" in capsys.readouterr().out
    assert load_any_teacher(out).cfg == load_sit_pt(sit_pt[0]).cfg  # every later command reads the convention
    assert main(["import-teacher", "--pt", str(tmp_path / "absent.pt"), "--out", str(out)]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_cli_heun_last_step(tmp_path, capsys):
    """--heun-last-step on `record` (presets: SiT's says "heun"; another solver drops it) and `sample`."""
    import json
    from ardistill.cli import main

    def dry(*args):
        assert main(["record", "--preset", "imagenet256-sit-ard", "--dry-run", "--count", "1000", *args]) == 0
        return json.loads(capsys.readouterr().out)["record"]

    assert dry()["heun_last_step"] == "heun"
    assert dry("--heun-last-step", "euler")["heun_last_step"] == "euler"
    assert dry("--solver", "euler")["heun_last_step"] is None  # the preset's Heun choice went with its solver
    assert main(["record", "--preset", "imagenet256-ard", "--dry-run", "--solver", "heun", "--heun-last-step",
                 "heun"]) == 2  # a DiT (VP) teacher
    assert "record.heun_last_step: heun_last_step 'heun' is for flow processes" in capsys.readouterr().err
    out = str(tmp_path / "grid.png")  # the shipped digits teacher is a VP (DiT) teacher
    assert main(["sample", "--solver", "heun", "--heun-last-step", "heun", "--seeds", "0", "--steps", "2",
                 "--out", out]) == 2
    assert "is for flow processes" in capsys.readouterr().err
    assert main(["sample", "--solver", "euler", "--heun-last-step", "euler", "--seeds", "0", "--steps", "2",
                 "--out", out]) == 2
    assert "heun_last_step is a choice of solver 'heun', not of 'euler'" in capsys.readouterr().err
