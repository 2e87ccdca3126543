"""Block-wise attention masks M1-M4 of ARD, as pure functions.

Queries and keys are trajectory blocks (one block = the N tokens of one state). Inside an allowed
(query block, key block) pair attention is full and bidirectional. True = may attend.

- M1 block-diagonal: each block sees itself (= step distillation);
- M2 window: itself and the previous block;
- M3 itself and the first block x_{tau_S} (the initial noise);
- M4 block-causal: itself and all earlier blocks (ARD's default).
"""

from __future__ import annotations

import torch

MASKS = ("M1", "M2", "M3", "M4")


def check_mask(kind: str) -> str:
    if kind not in MASKS:
        raise ValueError(f"unknown history mask {kind!r}; choose from {MASKS}")
    return kind


def visible_blocks(kind: str, query_block: int) -> list[int]:
    """Earlier blocks (ascending) that block ``query_block`` may attend to; itself excluded."""
    check_mask(kind)
    q = query_block
    if kind == "M1" or q == 0:
        return []
    if kind == "M2":
        return [q - 1]
    if kind == "M3":
        return [0]
    return list(range(q))


def block_mask(kind: str, num_blocks: int) -> torch.Tensor:
    """Boolean (K, K) mask over blocks: [query, key]."""
    m = torch.eye(num_blocks, dtype=torch.bool)
    for q in range(num_blocks):
        m[q, visible_blocks(kind, q)] = True
    return m


def token_mask(kind: str, num_blocks: int, tokens_per_block: int, device=None) -> torch.Tensor:
    """Boolean (K*N, K*N) mask over tokens, expanded from the block mask."""
    m = block_mask(kind, num_blocks)
    m = m.repeat_interleave(tokens_per_block, 0).repeat_interleave(tokens_per_block, 1)
    return m.to(device)


def attended_pairs(kind: str, num_blocks: int) -> int:
    """Number of (query block, earlier key block) pairs: the extra attention work of history."""
    return sum(len(visible_blocks(kind, q)) for q in range(num_blocks))
