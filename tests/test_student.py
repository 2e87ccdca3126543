"""ARD student: cached sampler == teacher-forced forward, causality, init from the teacher, config."""


import pytest
import torch

from ardistill.sampling.diffusion import FlowProcess, VPProcess, student_grid
from ardistill.models.dit import build_dit
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import grid_times, solve
from ardistill.models.student import (ARDStudent, StudentConfig, block_times_for, build_student,
                               ode_step_coeffs)
from tiny_teachers import random_from_global_rng
from tolerances import assert_paths_agree


def _teacher(patch=2, depth=4, learn_sigma=True, prediction="eps", seed=0):
    # every weight random: adaLN-Zero init would make every output zero
    return random_from_global_rng(lambda: build_dit("DiT-T/2", patch_size=patch, input_size=8, in_channels=4,
                                                    num_classes=10, depth=depth, learn_sigma=learn_sigma,
                                                    prediction=prediction).eval(), std=0.1, seed=seed)


def _uniform_times(S):
    return [999 * (S - k) / S for k in range(S)]


CASES = [  # (S, history_layers, mask, patch, heads)
    (4, 2, "M4", 2, "shared"),
    (3, 4, "M2", 2, "per_step"),
    (5, 1, "M3", 4, "shared"),
    (4, 4, "M4", 4, "per_step"),
    (2, 3, "M4", 2, "shared"),
    (4, 0, "M4", 2, "per_step"),  # step distillation
    (4, 2, "M1", 2, "shared"),  # step distillation through the mask
    (1, 2, "M4", 2, "shared"),
]


@pytest.mark.numerics
@pytest.mark.parametrize("S,Nh,mask,patch,heads", CASES)
def test_cached_sampler_equals_teacher_forced(S, Nh, mask, patch, heads):
    teacher = _teacher(patch=patch)
    student = build_student(teacher, num_steps=S, history_layers=Nh, mask=mask, heads=heads,
                            block_times=_uniform_times(S)).eval()
    if heads == "per_step":  # make heads differ so a wrong head index would show
        for i, h in enumerate(student.heads):
            torch.nn.init.normal_(h.linear.weight, std=0.1 * (i + 1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 5, 9])
    outs = student.sample(noise, y, return_all=True)  # (B, S, C, H, W)
    assert outs.shape == (3, S, 4, 8, 8)
    assert torch.equal(outs[:, -1], student.sample(noise, y))  # the same sampler run twice: bit-equal
    inputs = torch.cat([noise[:, None], outs[:, :-1]], dim=1)
    with torch.no_grad():
        tf = student(inputs, y)
    # two code paths (one block at a time with cached K/V, all blocks under a mask): float32 rounding only
    assert_paths_agree(tf, outs)


@pytest.mark.parametrize("mask", ["M1", "M2", "M3", "M4"])
def test_causality_later_blocks_do_not_change_earlier_outputs(mask):
    teacher = _teacher()
    S = 4
    student = build_student(teacher, num_steps=S, history_layers=3, mask=mask, block_times=_uniform_times(S)).eval()
    x = torch.randn(2, S, 4, 8, 8)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        base = student(x, y)
        for k in range(1, S):
            x2 = x.clone()
            x2[:, k:] = torch.randn_like(x2[:, k:])
            out = student(x2, y)
            # same kernels, same shapes: the changed blocks reach earlier ones only through exact zeros
            # (masked attention weights), so bit-equality is valid
            assert torch.equal(out[:, :k], base[:, :k]), f"blocks < {k} changed with mask {mask}"


def test_history_actually_used_only_as_the_mask_says():
    teacher = _teacher()
    S = 4
    x = torch.randn(2, S, 4, 8, 8)
    y = torch.tensor([1, 2])
    x2 = x.clone()
    x2[:, 1] += 1.0  # change block 1 only
    # with one history layer, dependence is exactly the mask; with two, M2's window chains (1 -> 2 -> 3)
    expect_changed = {("M1", 1): [1], ("M2", 1): [1, 2], ("M3", 1): [1], ("M4", 1): [1, 2, 3],
                      ("M2", 2): [1, 2, 3], ("M3", 2): [1]}
    for (mask, nh), changed in expect_changed.items():
        st = build_student(teacher, num_steps=S, history_layers=nh, mask=mask, block_times=_uniform_times(S)).eval()
        with torch.no_grad():
            d = (st(x, y) - st(x2, y)).flatten(2).abs().amax(-1).amax(0)
        assert [k for k in range(S) if d[k] > 0] == changed, (mask, d)


def test_history_cut_sampling_is_the_same_weights_under_mask_m1():
    teacher = _teacher()
    S = 4
    st = build_student(teacher, num_steps=S, history_layers=2, mask="M4", block_times=_uniform_times(S)).eval()
    m1 = build_student(teacher, num_steps=S, history_layers=2, mask="M1", block_times=_uniform_times(S)).eval()
    m1.load_state_dict(st.state_dict())
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 5, 9])
    cut = st.sample(noise, y, return_all=True, history=False)
    assert torch.equal(cut, m1.sample(noise, y, return_all=True))  # the same weights and kernels: bit-equal
    full = st.sample(noise, y, return_all=True)
    assert torch.equal(cut[:, 0], full[:, 0]) and not torch.allclose(cut[:, 1:], full[:, 1:])


def test_weights_initialised_from_teacher_and_heads_drop_sigma():
    teacher = _teacher(learn_sigma=True)
    st = build_student(teacher, num_steps=4, history_layers=2, heads="per_step", block_times=_uniform_times(4))
    tsd = teacher.state_dict()
    for k, v in st.state_dict().items():
        if k.startswith("heads."):
            continue
        assert torch.equal(v, tsd[k]), k
    # the head outputs the teacher's first C (eps) channels
    p, C, D = 2, 4, 64
    w_t = tsd["final_layer.linear.weight"].view(p * p, 2 * C, D)[:, :C].reshape(-1, D)
    for h in st.heads:
        assert torch.equal(h.linear.weight, w_t)
        assert torch.equal(h.adaLN_modulation[1].weight, tsd["final_layer.adaLN_modulation.1.weight"])


@pytest.mark.numerics
def test_single_block_student_without_history_is_the_teacher_eps_head():
    """With S = 1 and the teacher's time, the student's first output is the teacher's eps (no guidance)."""
    teacher = _teacher(learn_sigma=True)
    st = build_student(teacher, num_steps=1, history_layers=0, block_times=[999.0]).eval()
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 4])
    with torch.no_grad():
        eps = teacher(x, torch.full((2,), 999), y)[:, :4]
        assert_paths_agree(st.sample(x, y), eps)  # the student's and the teacher's forward: two code paths


@pytest.mark.numerics
@pytest.mark.parametrize("process,solver", [(VPProcess(), "ddim"), (FlowProcess(), "euler")])
def test_ode_step_output_at_init_reproduces_teacher_solver(process, solver):
    """output='ode_step' with S = T and true times is exactly the teacher's unguided solver at init."""
    pred = "eps" if isinstance(process, VPProcess) else "velocity"
    teacher = _teacher(prediction=pred, depth=2)
    for p in teacher.parameters():
        if p.requires_grad:
            p.data.mul_(0.2)  # keep the random teacher's trajectory bounded
    T = 6
    gt = grid_times(process, T)
    st = build_student(teacher, num_steps=T, history_layers=0, output="ode_step",
                       block_times=block_times_for(gt, T, "true", process.model_time),
                       step_coeffs=ode_step_coeffs(process, gt)).eval()
    noise = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    ref = solve(make_model_fn(teacher, 1.0), process, noise, y, T, solver).sample
    got = st.sample(noise, y)
    # the student's sampler and the teacher's solver are two code paths; the final state carries the rounding
    # of T = 6 steps, each relative to the state's scale (measured 2.3e-7 of it in all)
    assert_paths_agree(got, ref, gain=T)


def test_block_times_true_and_uniform():
    times = [999.0, 624.0, 416.0, 208.0, -1.0]
    assert block_times_for(times, 4, "true") == (999.0, 624.0, 416.0, 208.0)
    assert block_times_for(times, 4, "uniform") == (999.0, 749.25, 499.5, 249.75)
    with pytest.raises(ValueError, match="expected num_steps"):
        block_times_for(times, 3, "true")


def test_public_code_grid_matches_ard_md():
    g = student_grid(25, 4, "ard")
    gt = grid_times(VPProcess(), 25)
    assert g == [0, 9, 14, 19, 25]
    assert [gt[i] for i in g[:-1]] == [999, 624, 416, 208]


def test_config_validation_names_the_field():
    tc = _teacher().cfg
    bad = [dict(history_layers=5), dict(mask="M5"), dict(target="eps"), dict(heads="two"),
           dict(num_steps=0), dict(time_labels="k"), dict(block_times=[1.0, 2.0]),
           dict(output="ode_step", target="x0"), dict(output="ode_step")]
    for kw in bad:
        args = dict(teacher=tc, num_steps=4, history_layers=2, block_times=_uniform_times(4))
        args.update(kw)
        if "num_steps" in kw:
            args["block_times"] = []
        with pytest.raises(ValueError, match="StudentConfig"):
            StudentConfig(**args)


def test_config_round_trip():
    cfg = StudentConfig(teacher=_teacher().cfg, num_steps=3, history_layers=1, mask="M2", heads="per_step",
                        block_times=_uniform_times(3), output="ode_step",
                        step_coeffs=[(1.0, 0.5)] * 3)
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    import json
    assert StudentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_teacher_rejects_other_teacher():
    t1, t2 = _teacher(), _teacher(depth=2)
    cfg = StudentConfig(teacher=t2.cfg, num_steps=2, history_layers=1, block_times=_uniform_times(2))
    with pytest.raises(ValueError, match="teacher config"):
        ARDStudent.from_teacher(t1, cfg)


def test_gradients_flow_and_checkpointing_matches():
    teacher = _teacher(depth=2)
    kw = dict(num_steps=3, history_layers=1, block_times=_uniform_times(3))
    a = build_student(teacher, **kw).train()
    b = build_student(teacher, grad_checkpointing=True, **kw).train()
    x, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([1, 2])
    la, lb = a(x, y).square().mean(), b(x, y).square().mean()
    la.backward()
    lb.backward()
    # checkpointing recomputes the same forward with the same kernels, so these agree bit for bit in practice;
    # the tolerances are loose and harmless
    assert torch.allclose(la, lb)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            assert pa.grad is not None, n
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_history_swap_errors_pair_the_students_own_state_with_the_teachers_history():
    """Step 0 is the teacher-forced error (its input is the noise) and, with the teacher's history, step 1
    the free-running one (its history is the same noise); a student without history gets its
    free-running errors whatever the history; on a 'teacher' trajectory that is the student's own
    rollout the teacher's history gives ~0; with history, another trajectory's history changes every step
    from 1 and the teacher's every step from 2."""
    from ardistill.evaluation.evaluate import EvalTrajectories, history_swap_errors, trajectory_errors
    teacher = _teacher()
    S, g = 4, torch.Generator().manual_seed(3)
    ev = EvalTrajectories(states=torch.randn(6, S + 1, 4, 8, 8, generator=g), labels=torch.arange(6) % 10)
    ard = build_student(teacher, num_steps=S, history_layers=2, block_times=_uniform_times(S)).eval()
    sd = build_student(teacher, num_steps=S, history_layers=0, block_times=_uniform_times(S)).eval()
    for student in (ard, sd):
        e = trajectory_errors(student, ev)
        o = history_swap_errors(student, ev, batch_size=4)  # batches of 4 and 2
        x = history_swap_errors(student, ev, "other", batch_size=4)
        assert o[0] == pytest.approx(e["teacher_forced"][0], rel=1e-5) and x[0] == pytest.approx(o[0], rel=1e-5)
        assert o[1] == pytest.approx(e["free_running"][1], rel=1e-5)
        if student is sd:
            assert o == pytest.approx(e["free_running"], rel=1e-5) and x == pytest.approx(o, rel=1e-5)
        else:
            assert all(abs(a - b) > 1e-3 * b for a, b in zip(o[2:], e["free_running"][2:]))
            assert all(abs(a - b) > 1e-3 * b for a, b in zip(x[1:], e["free_running"][1:]))
        with torch.no_grad():
            own = torch.cat([ev.noise[:, None], student.sample(ev.noise, ev.labels, return_all=True)], dim=1)
        assert max(history_swap_errors(student, EvalTrajectories(states=own, labels=ev.labels))) < 1e-8
    with pytest.raises(ValueError, match="history must be one of"):
        history_swap_errors(sd, ev, "noise")
