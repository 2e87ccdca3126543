"""Exponential moving average of a model's weights (the EMA student the paper evaluates).

``ema = EMA(model, decay)`` keeps a frozen copy ``ema.module``; ``ema.update(model)`` after each
optimizer step sets every floating parameter and buffer to ``decay * ema + (1 - decay) * model``.
Works for any ``nn.Module`` (student, generator, discriminator); pass the unwrapped module, not DDP.
Under FSDP2 the EMA copy is sharded like the model (training/parallel.py) and each rank updates its
local shards with the same elementwise lerp: bit-for-bit the update of the whole tensors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """EMA shadow of a module; ``warmup`` uses decay min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d * ema + (1 - d) * model, over parameters and floating buffers."""
        d = self.current_decay()
        ema_state = self.module.state_dict(keep_vars=True)
        src = model.state_dict(keep_vars=True)
        if ema_state.keys() != src.keys():
            raise ValueError("EMA.update: the model's state-dict keys differ from the EMA copy's")
        ema_f = [_local(t) for k, t in ema_state.items() if t.dtype.is_floating_point]
        src_f = [_local(src[k].detach()) for k, t in ema_state.items() if t.dtype.is_floating_point]
        if any(a.shape != b.shape for a, b in zip(ema_f, src_f)):
            raise ValueError("EMA.update: the model and the EMA copy are sharded differently (shard both alike)")
        torch._foreach_lerp_(ema_f, src_f, 1.0 - d)  # ema + (1 - d) * (model - ema)
        for k, t in ema_state.items():  # integer buffers (counters) are copied
            if not t.dtype.is_floating_point:
                _local(t).copy_(_local(src[k]))
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights and counters; what a training checkpoint stores."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its storage: in-place updates land in the parameter), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
