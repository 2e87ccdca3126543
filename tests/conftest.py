"""Shared fixtures: a tiny DiT config, DiTs with every weight random, and matching inputs (built by
tests/tiny_teachers.py, which test files also import directly)."""

from __future__ import annotations

import pytest
import torch

from ardistill.models.dit import DiTConfig
from tiny_teachers import random_dit as _random_dit
from tiny_teachers import tiny_dit_config


@pytest.fixture
def tiny_cfg() -> DiTConfig:
    return tiny_dit_config()


@pytest.fixture
def random_dit():
    """Factory ``random_dit(seed=0, **config_overrides) -> DiT`` of ``TINY_DIT``, in eval mode, all weights random
    (std 0.1): tiny_teachers.random_dit."""
    return _random_dit


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
