"""Shared fixtures: a tiny DiT config, DiTs with every weight random, and matching inputs."""

from __future__ import annotations

import pytest
import torch

from ardistill.models.dit import DiT, DiTConfig

# depth 2, width 64, 8x8 latents with 4 channels: 16 tokens, fast on CPU.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    # adaLN-Zero zeroes the modulation and the output layer, which would make any comparison trivial.
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name != "pos_embed":  # fixed sin-cos embedding, part of the architecture
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_cfg() -> DiTConfig:
    return DiTConfig(**TINY)


@pytest.fixture
def random_dit():
    """Factory ``random_dit(seed=0, **config_overrides) -> DiT`` in eval mode, all weights random."""
    def make(seed: int = 0, **overrides) -> DiT:
        return _randomize(DiT(DiTConfig(**{**TINY, **overrides})), seed).eval()
    return make


@pytest.fixture
def dit_inputs():
    """Factory ``dit_inputs(cfg, seed=0) -> (x, t, y)``: 3 samples, times 0/500/999, the null class included."""
    def make(cfg: DiTConfig, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        return x, torch.tensor([0, 500, 999]), torch.tensor([0, cfg.num_classes - 1, cfg.num_classes])
    return make


def pytest_configure(config):
    # Tiny models gain nothing from a second intra-op thread, and the multi-process tests start their
    # own workers: one thread per process keeps the 2-core CI machine from oversubscribing.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one intra-op thread, even after a test (or a CLI it calls) changed it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
