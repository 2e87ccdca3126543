"""Block masks M1-M4 and the analytic FLOPs count."""

import pytest
import torch

from ardistill.models.dit import dit_config
from ardistill.evaluation.flops import forward_flops, gmacs, sampling_flops
from ardistill.models.kv_cache import KVCache
from ardistill.models.masks import attended_pairs, block_mask, token_mask, visible_blocks


def test_block_masks():
    assert torch.equal(block_mask("M1", 3), torch.eye(3, dtype=torch.bool))
    assert block_mask("M2", 4).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert block_mask("M3", 4).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    assert torch.equal(block_mask("M4", 4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert attended_pairs("M4", 4) == 6 and attended_pairs("M2", 4) == 3 and attended_pairs("M1", 4) == 0
    assert visible_blocks("M3", 3) == [0]
    with pytest.raises(ValueError, match="M5"):
        block_mask("M5", 2)


def test_token_mask_expands_blocks():
    m = token_mask("M4", 3, 2)
    assert m.shape == (6, 6)
    assert m[2:4, 0:2].all() and not m[0:2, 2:4].any() and m[4:6, 0:6].all()


def test_kv_cache_refuses_double_store():
    c = KVCache(1, "M4")
    k = torch.zeros(1, 1, 2, 4)
    c.layer(0).update(k, k)
    with pytest.raises(RuntimeError, match="already stored"):
        c.layer(0).update(k, k)
    c.advance()
    kk, vv = c.layer(0).update(k + 1, k + 1)
    assert kk.shape == (1, 1, 4, 4)
    assert c.nbytes() == 2 * 2 * 8 * 4  # 2 blocks x (k, v) x 8 floats


def test_dit_xl2_flops_match_dit_paper():
    # DiT paper: DiT-XL/2 at 256 px = 118.6 "Gflops" (multiply-adds).
    assert round(gmacs(forward_flops(dit_config("DiT-XL/2"))), 1) == 118.6


def test_ard_overhead_for_dit_xl2_is_1_15_percent():
    r = sampling_flops(dit_config("DiT-XL/2"), teacher_steps=25, num_steps=4, history_layers=6)
    assert round(100 * r.ard_overhead, 2) == 1.15
    all_layers = sampling_flops(dit_config("DiT-XL/2"), 25, 4, 28)
    assert 5.2 < 100 * all_layers.ard_overhead < 5.5
    assert r.teacher / r.ard > 12  # 25 guided steps vs 4 student steps
    assert sampling_flops(dit_config("DiT-XL/2"), 25, 4, 0).ard_overhead == 0
