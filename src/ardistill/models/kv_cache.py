"""KV cache for autoregressive few-step sampling.

Step s of the sampler runs one block of N tokens. Each of the lower ``history_layers`` layers keeps
the keys and values of every block it has seen; at step s the layer attends to the blocks its
history mask makes visible (masks.visible_blocks) plus its own. The upper layers keep nothing.
"""

from __future__ import annotations

import torch

from ardistill.models.masks import check_mask, visible_blocks


class KVCache:
    """Keys/values of earlier trajectory blocks, per history layer."""

    def __init__(self, num_layers: int, mask: str):
        self.mask = check_mask(mask)
        self.num_layers = num_layers
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.block = 0  # index of the block being computed

    def layer(self, i: int) -> "_LayerCache":
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} has no cache (cache holds {self.num_layers} layers)")
        return _LayerCache(self, i)

    def advance(self) -> None:
        """Finish the current block; every cached layer must have stored it."""
        for i in range(self.num_layers):
            if len(self.keys[i]) != self.block + 1:
                raise RuntimeError(f"layer {i} did not store block {self.block}")
        self.block += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in (self.keys, self.values) for layer in kv for t in layer)


class _LayerCache:
    """One layer's view of the cache: what Attention calls."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer_idx = cache, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this block's k, v (B, H, N, hd); return visible earlier blocks + this one."""
        c, i = self.cache, self.layer_idx
        if len(c.keys[i]) != c.block:
            raise RuntimeError(f"layer {i} already stored block {c.block}; call advance() between blocks")
        c.keys[i].append(k)
        c.values[i].append(v)
        vis = visible_blocks(c.mask, c.block)
        if not vis:
            return k, v
        ks = [c.keys[i][j] for j in vis] + [k]
        vs = [c.values[i][j] for j in vis] + [v]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)
