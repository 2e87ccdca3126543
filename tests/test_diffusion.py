"""Timestep respacing, schedules, eps <-> x0 <-> x_t conversions, student grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ardistill.sampling.diffusion import FlowProcess, VPProcess, make_process, process_for, space_timesteps, student_grid

# DiT's space_timesteps(1000, "25"): stride 999/24 = 41.625 with Python's round (half to even:
# 166.5 -> 166, 499.5 -> 500, 832.5 -> 832).
DIT_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791,
          832, 874, 916, 957, 999]


def test_space_timesteps_25_is_dits_list():
    assert space_timesteps(1000, "25") == DIT_25
    assert space_timesteps(1000, [25]) == DIT_25
    assert VPProcess().timesteps(25) == DIT_25[::-1]  # sampling order: noisiest first


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))
    with pytest.raises(ValueError, match="exactly 999"):
        space_timesteps(1000, "ddim999")  # no integer stride gives 999 steps
    # two sections of 15 steps: 2 steps in [0, 14], 3 in [15, 29]
    assert space_timesteps(30, "2,3") == [0, 14, 15, 22, 29]
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, "1000") == list(range(1000))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(30, "16,1")


@pytest.mark.numerics
def test_vp_schedule_is_dits_linear_schedule():
    abar = VPProcess().alphas_cumprod
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-12)
    assert abar[0] == pytest.approx(1 - 1e-4)
    assert abar[-1] == pytest.approx(4.04e-5, rel=0.01)
    t = torch.tensor([0, 624, 999])
    np.testing.assert_allclose(VPProcess().abar(t).numpy(), abar[[0, 624, 999]])
    assert VPProcess().model_time(torch.tensor([624.0], dtype=torch.float64)).tolist() == [624]


@pytest.mark.numerics  # float64: the tolerances are 1e3-1e4 float64 ulps
def test_vp_conversions_round_trip():
    p = VPProcess()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 208, 624, 999])
    x_t = p.q_sample(x0, t, eps)
    a = torch.from_numpy(p.alphas_cumprod[[0, 208, 624, 999]]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(p.x0_from_eps(x_t, t, eps), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(p.x0_from_output(x_t, t, eps), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(p.eps_from_x0(x_t, t, x0), eps, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(p.eps_from_output(x_t, t, eps), eps)
    torch.testing.assert_close(p.training_target(x0, eps, t), eps)
    torch.testing.assert_close(p.sigma(t), ((1 - a) / a).sqrt().flatten())


@pytest.mark.numerics
def test_flow_conversions_round_trip():
    p = FlowProcess()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = p.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t[2], eps[2])  # t = 1: pure noise
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0: data
    v = p.training_target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(p.x0_from_output(x_t, t, v), x0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p.eps_from_output(x_t, t, v), eps, atol=1e-12, rtol=1e-12)
    assert p.model_time(torch.tensor([0.25], dtype=torch.float64)).tolist() == [250.0]


def test_flow_grid_and_shift():
    assert FlowProcess().timesteps(4) == [1.0, 0.75, 0.5, 0.25]
    shifted = FlowProcess(shift=3.0).timesteps(4)
    assert shifted[0] == 1.0 and shifted[2] == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert all(a > b for a, b in zip(shifted, shifted[1:]))


def test_make_process_and_process_for():
    assert isinstance(make_process("vp"), VPProcess) and isinstance(make_process("flow", shift=2.0), FlowProcess)
    assert isinstance(process_for("eps"), VPProcess) and isinstance(process_for("velocity"), FlowProcess)
    with pytest.raises(ValueError, match="'ve'"):
        make_process("ve")


def test_student_grid():
    # Public ARD code, T = 25, S = 4: DDIM indices 15, 10, 5 -> t = 624, 416, 208 -> positions 9, 14, 19.
    pos = student_grid(25, 4)
    assert pos == [0, 9, 14, 19, 25]
    assert [VPProcess().timesteps(25)[i] for i in pos[1:-1]] == [624, 416, 208]
    assert student_grid(25, 4, "uniform") == [0, 6, 13, 19, 25]
    assert student_grid(25, 1) == [0, 25]
    assert student_grid(10, 10, "uniform") == list(range(11))
    for S in (2, 3, 5):
        g = student_grid(25, S)
        assert len(g) == S + 1 and g[0] == 0 and g[-1] == 25 and g == sorted(set(g))
    with pytest.raises(ValueError, match="student steps 26"):
        student_grid(25, 26)
    with pytest.raises(ValueError, match="unknown grid kind"):
        student_grid(25, 4, "cosine")
