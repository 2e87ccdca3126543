"""The public-code-style reference student computes the same function as ARDStudent."""

import pytest
import torch

from tolerances import assert_paths_agree

from ardistill.models.dit import build_dit
from ardistill.models.naive_student import NaiveARDStudent, additive_mask
from ardistill.models.student import build_student
from tiny_teachers import random_from_global_rng

pytestmark = pytest.mark.numerics  # two implementations of one function: agreement to float32 rounding


def _teacher(patch=2, depth=3):
    # every weight random: adaLN-Zero init would make every output zero
    return random_from_global_rng(lambda: build_dit("DiT-T/2", patch_size=patch, input_size=8, in_channels=4,
                                                    num_classes=10, depth=depth), std=0.1)


CASES = [  # (S, history_layers, mask, patch, heads, output)
    (4, 1, "M4", 2, "shared", "direct"),
    (4, 2, "M2", 2, "per_step", "direct"),
    (3, 3, "M3", 4, "shared", "direct"),
    (4, 0, "M4", 2, "per_step", "direct"),  # step distillation
    (4, 2, "M1", 2, "shared", "direct"),
    (3, 2, "M4", 2, "per_step", "ode_step"),
]


@pytest.mark.parametrize("S,Nh,mask,patch,heads,output", CASES)
def test_naive_equals_ard_student(S, Nh, mask, patch, heads, output):
    teacher = _teacher(patch=patch)
    kw = dict(step_coeffs=[(0.9 - 0.1 * k, 0.3 + 0.1 * k) for k in range(S)]) if output == "ode_step" else {}
    student = build_student(teacher, num_steps=S, history_layers=Nh, mask=mask, heads=heads, output=output,
                            block_times=[999 * (S - k) / S for k in range(S)], **kw)
    for i, h in enumerate(student.heads):  # distinct heads, so a wrong head index would show
        torch.nn.init.normal_(h.linear.weight, std=0.1 * (i + 1))
        torch.nn.init.normal_(h.adaLN_modulation[-1].weight, std=0.1)
    naive = NaiveARDStudent(student.cfg)
    naive.load_state_dict(student.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, S, 4, 8, 8, generator=g)
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        ref, out = student(x, y), naive(x, y)
        assert ref.abs().mean() > 0.1  # a non-trivial function
        # full-mask per-token attention vs the block layout: two code paths, float32 rounding only
        assert_paths_agree(out, ref)
        # fewer blocks than steps (a prefix of the trajectory) agree too
        assert_paths_agree(naive(x[:, :2], y), student(x[:, :2], y))


def test_naive_gradients_match():
    teacher = _teacher()
    student = build_student(teacher, num_steps=4, history_layers=2, block_times=[999, 749.25, 499.5, 249.75])
    naive = NaiveARDStudent(student.cfg)
    naive.load_state_dict(student.state_dict())
    x, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 2])
    target = torch.randn_like(x)
    for m in (student, naive):
        torch.nn.functional.mse_loss(m(x, y), target).backward()
    gs, gn = dict(student.named_parameters()), dict(naive.named_parameters())
    for name, p in gs.items():
        if p.grad is None:
            assert gn[name].grad is None, name
            continue
        # two code paths: rtol 1e-4 is 840 ulps, atol 1e-6 covers elements near zero (measured: at most 2% of
        # this bound used, 4e-7 of each gradient's scale)
        torch.testing.assert_close(gn[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_additive_mask():
    m = additive_mask(torch.tensor([[True, False], [True, True]]))
    assert m[0, 0] == 0 and m[0, 1] == float("-inf") and m[1].eq(0).all()
