"""Block-sparse history attention (FlexAttention) == the dense-mask SDPA path, and the runtime choice between them.

FlexAttention runs under torch.compile; on this CPU build compiling one shape takes ~10-20 s (less
once inductor's on-disk cache holds it), so the default run compiles one shape (the student at S = 4,
N = 16: the four masks share it, their rule is a kernel input) and the other shapes are slow tests.
FlexAttention has no backward on the CPU (pytorch/pytorch#148752), so flex-vs-SDPA *gradients* are
compared in the ``gpu`` test only; on the CPU we test that "flex" refuses a pass that needs
gradients and that "auto" then takes SDPA.

Tolerance (float32, both paths): the two kernels compute the same softmax(q k^T / sqrt(hd)) v with a
different summation order (flex: online softmax over 16-token tiles; SDPA: its CPU kernel) and, for
flex, without ever adding the masked scores. Each attention output differs by a few float32 ulps
(measured: 8e-7 on O(1) outputs, one layer); through <= 4 layers and the head, outputs of size ~3
differed by <= 1.2e-6 here. ATOL = 1e-5 (~40 ulps at that scale, ~8x the largest difference seen)
is rounding; a mask error (one block pair wrongly (in)visible) moves outputs by > 1e-2 (see
test_student.test_history_actually_used_only_as_the_mask_says), three orders of magnitude above it.
"""

from __future__ import annotations

import pytest
import torch

from ardistill.models import attention as A
from ardistill.models.attention import flex_cpu_supported
from ardistill.models.dit import build_dit
from ardistill.models.masks import MASKS, attended_pairs, token_mask
from ardistill.models.student import StudentConfig, build_student
from tiny_teachers import random_from_global_rng, random_text_dit

ATOL = 1e-5  # see the module docstring
DEPTH = 4

# inductor's CPU FlexAttention kernel needs PyTorch's AVX2 / AVX-512 kernels: not under ATEN_CPU_CAPABILITY=default
# (scripts/test_numerics_isa.sh default) nor on an older CPU, where "auto" takes SDPA (tested below)
NEEDS_CPU_FLEX = pytest.mark.skipif(not flex_cpu_supported(),
                                    reason=f"FlexAttention on the CPU needs AVX2/AVX-512 kernels, this process runs "
                                           f"{torch.backends.cpu.get_cpu_capability()}")


def _teacher(depth=DEPTH, seed=0):
    # every weight random: adaLN-Zero init would make every output zero
    return random_from_global_rng(lambda: build_dit("DiT-T/2", patch_size=2, input_size=8, in_channels=4,
                                                    num_classes=10, depth=depth).eval(), std=0.1, seed=seed)


def _student(S, Nh, mask, attention=None):
    s = build_student(_teacher(), num_steps=S, history_layers=Nh, mask=mask,
                      block_times=[999 * (S - k) / S for k in range(S)]).eval()
    if attention is not None:
        s.attention = attention
    return s


def _inputs(S, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, 4, 8, 8, generator=g), torch.tensor([0, 5, 9])[:B]


def _qkv(B, H, L, hd, seed=0):
    """q, k, v (B, H, L, hd) laid out as layers.Attention makes them (views of one qkv tensor)."""
    qkv = torch.randn(B, L, 3, H, hd, generator=torch.Generator().manual_seed(seed))
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# ---- the mask rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASKS)
def test_mask_mod_materialises_token_mask(kind):
    for S in (1, 2, 3, 4, 5):
        for N in (1, 7, 16, 64):
            assert torch.equal(A.dense_from_mask_mod(kind, S, N), token_mask(kind, S, N)), (kind, S, N)


@pytest.mark.parametrize("kind", MASKS)
def test_block_mask_tiles_are_full_or_empty_when_the_tile_divides_n(kind):
    S, N = 4, 64
    bm = A.flex_block_mask(kind, S, N, "cpu")
    assert bm.BLOCK_SIZE == (64, 64)
    assert int(bm.kv_num_blocks.sum()) == 0  # no partial tile: mask_mod never evaluated in the kernel
    assert int(bm.full_kv_num_blocks.sum()) == S + attended_pairs(kind, S)  # exactly the visible block pairs
    assert torch.equal(bm.to_dense()[0, 0].bool(), token_mask(kind, S, 1))
    assert A.flex_block_mask(kind, S, N, "cpu") is bm  # cached per (mask, S, N, device)


def test_flex_block_size_rule():
    assert [A.flex_block_size(n, "cpu") for n in (16, 32, 64, 256, 1024, 49)] == [16, 32, 64, 128, 128, 128]
    assert A.flex_block_size(64, "meta") == 128  # off the CPU: torch's default tile (fits the Triton kernel)


# ---- flex == SDPA ----------------------------------------------------------------------------------
@NEEDS_CPU_FLEX
@torch.no_grad()
def test_flex_equals_sdpa_forward():
    """Default run, one compiled shape: the attention itself for M1-M4, then the student at S = 4."""
    S, N, B, H, hd = 4, 16, 3, 4, 16  # DiT-T/2 on 8x8 latents: 16 tokens, width 64, 4 heads
    q, k, v = _qkv(B, H, S * N, hd)
    for kind in MASKS:
        ref = A.attend(q, k, v, token_mask(kind, S, N))
        out = A.attend(q, k, v, A.flex_block_mask(kind, S, N, "cpu"))
        assert (out - ref).abs().max().item() <= ATOL, kind
    x, y = _inputs(S)
    for kind in ("M2", "M3", "M4"):  # M1 has no history layers: the student never builds a mask
        for Nh in (1, DEPTH):
            s = _student(S, Nh, kind, "sdpa")
            ref = s(x, y)
            s.attention = "flex"
            out = s(x, y)
            assert isinstance(s._mask_cache[("flex", S, N, "cpu")], A.BlockMask)
            assert (out - ref).abs().max().item() <= ATOL, (kind, Nh)
            assert ref.abs().max().item() > 0.5  # not trivially small


@NEEDS_CPU_FLEX
@pytest.mark.slow
@torch.no_grad()
def test_flex_equals_sdpa_forward_two_blocks_and_cached_sampler_unchanged():
    S = 2
    x, y = _inputs(S)
    for kind in ("M2", "M3", "M4"):
        for Nh in (1, DEPTH):
            s = _student(S, Nh, kind, "sdpa")
            ref = s(x, y)
            s.attention = "flex"
            assert (s(x, y) - ref).abs().max().item() <= ATOL, (kind, Nh)
    s = _student(4, 2, "M4", "sdpa")
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    before = s.sample(noise, y[:3], return_all=True)
    s.attention = "flex"  # the KV-cached sampler never uses the history mask: bit-equal
    assert torch.equal(s.sample(noise, y[:3], return_all=True), before)


@NEEDS_CPU_FLEX
@pytest.mark.slow
@torch.no_grad()
def test_text_student_flex_equals_sdpa():
    from ardistill.models.student import build_student
    teacher = random_text_dit(depth=3)
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, 7, 32, generator=g)
    text_mask = torch.arange(7)[None, :] < torch.tensor([2, 7, 4])[:, None]
    for S in (2, 4):
        x = torch.randn(3, S, 1, 8, 16, generator=g)
        for kind in ("M2", "M3", "M4"):
            for Nh in (1, 3):
                s = build_student(teacher, num_steps=S, history_layers=Nh, mask=kind,
                                       block_times=[999 * (S - k) / S for k in range(S)]).eval()
                s.attention = "sdpa"
                ref = s(x, text, text_mask)
                s.attention = "flex"
                out = s(x, text, text_mask)
                assert (out - ref).abs().max().item() <= ATOL, (S, kind, Nh)


# ---- the runtime choice -----------------------------------------------------------------------------
def test_flex_refuses_cpu_backward_and_auto_takes_sdpa():
    S = 4
    x, y = _inputs(S)
    ref_model = _student(S, 2, "M4", "sdpa").train()
    loss = ref_model(x, y).square().mean()
    loss.backward()
    flex = _student(S, 2, "M4", "flex").train()
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex(x, y)
    auto = _student(S, 2, "M4", "auto").train()
    auto_loss = auto(x, y).square().mean()
    auto_loss.backward()
    assert torch.equal(auto_loss, loss)  # the same kernel (SDPA): bit-equal
    for (name, p), q in zip(ref_model.named_parameters(), auto.parameters()):
        assert p.grad is None and q.grad is None or torch.equal(p.grad, q.grad), name
    assert ("sdpa", S, 16, "cpu") in auto._mask_cache
    key = ("cpu", (3, 4, 16), torch.float32, "M4", S, 16, True)
    assert A._AUTO[key] == "sdpa" and key not in A._AUTO_TIMES  # decided without timing


def test_attention_setting_is_runtime_only(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    s = _student(2, 2, "M4")
    assert s.attention == "sdpa"
    assert "attention" not in s.cfg.to_dict() and "attention" not in StudentConfig.__dataclass_fields__
    keys = set(s.state_dict())
    s.attention = "flex"
    assert set(s.state_dict()) == keys
    with pytest.raises(ValueError, match="unknown attention backend"):
        s.attention = "flash"
    monkeypatch.setenv(A.ENV_VAR, "auto")
    assert _student(2, 2, "M4").attention == "auto"
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        _student(2, 2, "M4")


@NEEDS_CPU_FLEX
@pytest.mark.slow
@torch.no_grad()
def test_auto_measures_once_per_shape_and_keeps_the_output():
    S, N = 4, 16
    x, y = _inputs(S)
    s = _student(S, 2, "M3", "sdpa")
    ref = s(x, y)
    s.attention = "auto"
    out = s(x, y)
    key = ("cpu", (3, 4, 16), torch.float32, "M3", S, N, False)
    t_sdpa, t_flex = A._AUTO_TIMES[key]
    assert A._AUTO[key] == ("flex" if t_flex < A.AUTO_MARGIN * t_sdpa else "sdpa")
    assert (A._AUTO[key], S, N, "cpu") in s._mask_cache
    assert (out - ref).abs().max().item() <= ATOL
    A._AUTO_TIMES[key] = None  # a second call must not measure again
    s(x, y)
    assert A._AUTO_TIMES[key] is None
    del A._AUTO_TIMES[key]


# ---- gradients: only where FlexAttention has a backward -------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention has no CPU backward)")
def test_flex_equals_sdpa_forward_and_gradients_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 kernels, not TF32 rounding
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    for S in (2, 4):
        x, y = (t.to(dev) for t in _inputs(S))
        for kind in ("M2", "M3", "M4"):
            for Nh in (1, DEPTH):
                grads = {}
                for attention in ("sdpa", "flex"):
                    s = _student(S, Nh, kind, attention).to(dev).train()
                    out = s(x, y)
                    out.square().mean().backward()
                    grads[attention] = (out.detach(), {n: p.grad for n, p in s.named_parameters() if p.grad is not None})
                (o_s, g_s), (o_f, g_f) = grads["sdpa"], grads["flex"]
                assert (o_f - o_s).abs().max().item() <= ATOL, (S, kind, Nh)
                assert g_s.keys() == g_f.keys()
                for n in g_s:  # gradients: relative to each tensor's scale (sums over the batch)
                    scale = g_s[n].abs().max().item() + 1e-12
                    assert (g_f[n] - g_s[n]).abs().max().item() <= 1e-4 * scale, (S, kind, Nh, n)


def test_without_avx2_kernels_flex_is_refused_and_auto_takes_sdpa(monkeypatch):
    """On a CPU (or under ATEN_CPU_CAPABILITY=default) without AVX2 / AVX-512 kernels inductor has no FlexAttention:
    "flex" says so by name and "auto" takes SDPA without measuring."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not A.flex_cpu_supported()
    assert not A.flex_runs("cpu", needs_grad=False)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="AVX2 or AVX-512"):
        A.attend(q, q, q, A.flex_block_mask("M4", 2, 4, "cpu"))
    A._AUTO.clear()
    assert A.choose("M4", 2, 4, (1, 2, 4), torch.float32, "cpu", needs_grad=False) == "sdpa"
    A._AUTO.clear()
