"""ODE solvers against exact answers: Gaussian data has a closed-form denoiser and ODE end point.

Data x0 ~ N(mu, s^2) per dimension. VP: x_t = a x0 + b eps (a = sqrt(abar), b = sqrt(1 - abar)), so
x_t ~ N(a mu, a^2 s^2 + b^2) and E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). Flow: x_t = (1 - t) x0 + t eps,
x_t ~ N((1 - t) mu, (1 - t)^2 s^2 + t^2), v = E[eps - x0 | x_t]. Along the probability-flow ODE the
standardised state z = (x_t - m_t) / sd_t is constant, so the end point is mu + s z.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ardistill.sampling.diffusion import FlowProcess, VPProcess, named_process
from ardistill.sampling.ode import (CLEAN_TIME, default_heun_last_step, grid_times, randn_from_seeds,
                                    recorded_heun_last_step, resolve_heun_last_step, solve, solve_segment)

VP = VPProcess()
SHAPE = (2, 4, 4)
_g = torch.Generator().manual_seed(0)
MU = torch.randn(SHAPE, generator=_g, dtype=torch.float64) * 1.5
S = torch.rand(SHAPE, generator=_g, dtype=torch.float64) * 1.3 + 0.2
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # DiT's linear schedule, written out again


def vp_eps(x, t_model, y):
    """Exact eps-prediction E[eps | x_t] for Gaussian data; t_model is the integer timestep."""
    a = torch.from_numpy(ABAR[t_model.long().numpy()]).view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def flow_velocity(x, t_model, y):
    """Exact velocity E[eps - x0 | x_t]; the network time is t * 1000."""
    t = (t_model.double() / 1000).view(-1, 1, 1, 1)
    r = (x - (1 - t) * MU) / ((1 - t) ** 2 * S**2 + t**2)
    return t * r - (MU + (1 - t) * S**2 * r)


def _noise(n=16):
    return randn_from_seeds(list(range(n)), SHAPE, dtype=torch.float64)


def vp_exact_end(noise):
    a = ABAR[999]
    return MU + S * (noise - a**0.5 * MU) / (a * S**2 + 1 - a) ** 0.5


def _err(sample, exact):
    return (sample - exact).abs().max().item()


@pytest.mark.numerics
def test_vp_solvers_converge_to_the_exact_end_point():
    noise, y = _noise(), torch.zeros(16, dtype=torch.long)
    exact = vp_exact_end(noise)
    err = {(s, n): _err(solve(vp_eps, VP, noise, y, n, s).sample, exact)
           for s in ("ddim", "euler", "heun") for n in (25, 50, 100)}
    for n in (25, 50, 100):
        assert err["heun", n] < err["euler", n] / 4  # Heun is much more accurate at the same steps
        assert err["ddim", n] == pytest.approx(err["euler", n], abs=1e-9)
    assert 0.4 < err["euler", 50] / err["euler", 25] < 0.6  # first order
    assert err["heun", 50] / err["heun", 25] < 0.3  # second order
    assert err["heun", 100] < 2e-3


@pytest.mark.numerics
def test_flow_solvers_converge_to_the_exact_end_point():
    noise, y = _noise(), torch.zeros(16, dtype=torch.long)
    exact = MU + S * noise  # z = x_1 at t = 1 (mean 0, sd 1)
    err = {(s, n): _err(solve(flow_velocity, FlowProcess(), noise, y, n, s).sample, exact)
           for s in ("euler", "heun") for n in (25, 50)}
    assert err["heun", 25] < err["euler", 25] / 10 and err["heun", 50] < err["euler", 50] / 10
    assert 0.4 < err["euler", 50] / err["euler", 25] < 0.6
    assert err["heun", 50] / err["heun", 25] < 0.3 and err["heun", 50] < 3e-3


@pytest.mark.numerics
def test_flow_heun_corrected_on_every_interval_converges_at_second_order():
    # heun_last_step="heun" (SiT's heun2): the last interval is a trapezoid too, ending at t = 0
    noise, y = _noise(), torch.zeros(16, dtype=torch.long)
    exact = MU + S * noise
    err = {(last, n): _err(solve(flow_velocity, FlowProcess(), noise, y, n, "heun", heun_last_step=last).sample, exact)
           for last in ("euler", "heun") for n in (25, 50)}
    assert err["heun", 50] / err["heun", 25] < 0.3  # measured 0.27
    assert err["heun", 25] < err["euler", 25] / 2 and err["heun", 50] < err["euler", 50] / 2  # measured 3.4-3.6x


@pytest.mark.numerics
def test_ddim_equals_euler_for_vp():
    noise, y = _noise(4), torch.zeros(4, dtype=torch.long)
    for steps in (5, 25):
        ddim = solve(vp_eps, VP, noise, y, steps, "ddim", record_at=list(range(steps + 1)))
        euler = solve(vp_eps, VP, noise, y, steps, "euler", record_at=list(range(steps + 1)))
        torch.testing.assert_close(ddim.states, euler.states, atol=1e-10, rtol=1e-10)


@pytest.mark.numerics
def test_ddim_step_matches_the_formula():
    noise, y = _noise(3), torch.zeros(3, dtype=torch.long)
    res = solve(vp_eps, VP, noise, y, 5, "ddim", record_at=[0, 1])
    assert res.times == [999, 749]  # space_timesteps(1000, "5") = 0, 250, 500, 749, 999
    a0, a1 = ABAR[999], ABAR[749]
    eps = vp_eps(noise, torch.full((3,), 999), y)
    x0 = (noise - (1 - a0) ** 0.5 * eps) / a0**0.5
    torch.testing.assert_close(res.x0_preds[:, 0], x0)
    torch.testing.assert_close(res.states[:, 1], a1**0.5 * x0 + (1 - a1) ** 0.5 * eps)


def test_model_sees_the_process_time():
    seen = []

    def spy(fn):
        def f(x, t, y):
            seen.append(t.tolist())
            return fn(x, t, y)
        return f

    noise, y = _noise(2), torch.zeros(2, dtype=torch.long)
    solve(spy(vp_eps), VP, noise, y, 5, "ddim")
    assert [s[0] for s in seen] == [999, 749, 500, 250, 0] and all(len(set(s)) == 1 for s in seen)
    seen.clear()
    res = solve(spy(flow_velocity), FlowProcess(), noise, y, 4, "heun")
    assert [s[0] for s in seen] == pytest.approx([1000, 750, 750, 500, 500, 250, 250])
    assert res.nfe == 7  # Heun: 2 evaluations per step, none for the correction at t = 0
    seen.clear()
    res = solve(spy(flow_velocity), FlowProcess(), noise, y, 4, "heun", heun_last_step="heun")
    assert [s[0] for s in seen] == pytest.approx([1000, 750, 750, 500, 500, 250, 250, 0])  # corrected at t = 0
    assert res.nfe == 8


@pytest.mark.numerics
def test_record_at_positions_states_and_x0_preds():
    steps = 6
    noise, y = _noise(3), torch.zeros(3, dtype=torch.long)
    full = solve(vp_eps, VP, noise, y, steps, "ddim", record_at=list(range(steps + 1)))
    assert full.positions == list(range(steps + 1))
    assert full.times == grid_times(VP, steps) and full.times[-1] == CLEAN_TIME
    assert full.states.shape == (3, steps + 1, *SHAPE) and full.x0_preds.shape == full.states.shape
    assert torch.equal(full.states[:, 0], noise)  # position 0 is the noise
    assert torch.equal(full.states[:, -1], full.sample) and torch.equal(full.x0_preds[:, -1], full.sample)
    assert full.nfe == steps
    for i, t in enumerate(VP.timesteps(steps)):
        tt = torch.full((3,), t)
        x0 = VP.x0_from_eps(full.states[:, i], tt, vp_eps(full.states[:, i], tt, y))
        torch.testing.assert_close(full.x0_preds[:, i], x0)
        a_next = ABAR[int(full.times[i + 1])] if i + 1 < steps else 1.0  # the last step lands on the clean sample
        eps = vp_eps(full.states[:, i], tt, y)
        torch.testing.assert_close(full.states[:, i + 1], a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps)
    part = solve(vp_eps, VP, noise, y, steps, "ddim", record_at=[6, 2, 0])
    assert part.positions == [0, 2, 6]
    torch.testing.assert_close(part.states, full.states[:, [0, 2, 6]])
    torch.testing.assert_close(part.x0_preds, full.x0_preds[:, [0, 2, 6]])
    none = solve(vp_eps, VP, noise, y, steps, "ddim")
    assert none.states is None and none.positions == [] and torch.equal(none.sample, full.sample)


def test_solver_errors():
    noise, y = _noise(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        solve(vp_eps, VP, noise, y, 5, "rk4")
    with pytest.raises(ValueError, match="'ddim' is for the VP"):
        solve(flow_velocity, FlowProcess(), noise, y, 5, "ddim")
    with pytest.raises(ValueError, match="record_at"):
        solve(vp_eps, VP, noise, y, 5, "ddim", record_at=[0, 6])
    with pytest.raises(ValueError, match="heun_last_step 'heun' is for flow processes"):
        solve(vp_eps, VP, noise, y, 5, "heun", heun_last_step="heun")
    with pytest.raises(ValueError, match="heun_last_step is a choice of solver 'heun', not of 'euler'"):
        solve(flow_velocity, FlowProcess(), noise, y, 5, "euler", heun_last_step="euler")
    with pytest.raises(ValueError, match="unknown heun_last_step 'rk'"):
        solve_segment(flow_velocity, FlowProcess(), noise, y, 5, "heun", 0, 5, heun_last_step="rk")


def test_heun_last_step_defaults_per_teacher_family():
    # what each family's own sampler does: SiT's heun2 corrects every interval; EDM / REPA skip the last one
    assert default_heun_last_step(named_process("sit")) == "heun"
    assert default_heun_last_step(FlowProcess(time_direction="data_at_1", velocity_sign="data_minus_noise",
                                              time_scale=1.0, shift=3.0)) == "heun"  # the convention decides
    for name in ("repa", "flow", "vp"):
        assert default_heun_last_step(named_process(name)) == "euler", name
    assert resolve_heun_last_step("heun", named_process("sit")) == "heun"
    assert resolve_heun_last_step("heun", named_process("sit"), "euler") == "euler"
    assert resolve_heun_last_step("heun", VP) == "euler"
    assert resolve_heun_last_step("euler", named_process("sit")) is None  # no choice for Euler / DDIM
    assert resolve_heun_last_step("ddim", VP) is None
    # manifests: a Heun recording without the field was made with the Euler last step
    assert recorded_heun_last_step({"solver": "heun"}) == "euler"
    assert recorded_heun_last_step({"solver": "heun", "heun_last_step": "heun"}) == "heun"
    assert recorded_heun_last_step({"solver": "ddim"}) is None


def test_randn_from_seeds_depends_only_on_the_seed():
    a = randn_from_seeds([5, 7, 9], (2, 3))
    b = randn_from_seeds([7], (2, 3))
    c = randn_from_seeds([1, 2, 3, 7, 11], (2, 3))
    assert a.shape == (3, 2, 3)
    assert torch.equal(a[1], b[0]) and torch.equal(a[1], c[3])
    assert not torch.equal(a[0], a[1])
    assert torch.equal(randn_from_seeds(torch.tensor([9, 5]), (2, 3))[1], a[0])
    assert randn_from_seeds([5], (2, 3), dtype=torch.float64).dtype == torch.float64
