"""Exponential moving average of a model's weights (the EMA student the paper evaluates).

``ema = EMA(model, decay)`` keeps a frozen copy ``ema.module``; ``ema.update(model)`` after each
optimizer step sets every floating parameter and buffer to ``decay * ema + (1 - decay) * model``.
Works for any ``nn.Module`` (student, generator, discriminator); pass the unwrapped module, not DDP.
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
        ema_f = [t for k, t in ema_state.items() if t.dtype.is_floating_point]
        src_f = [src[k].detach() for k, t in ema_state.items() if t.dtype.is_floating_point]
        torch._foreach_lerp_(ema_f, src_f, 1.0 - d)  # ema + (1 - d) * (model - ema)
        for k, t in ema_state.items():  # integer buffers (counters) are copied
            if not t.dtype.is_floating_point:
                t.copy_(src[k])
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights and counters; what a training checkpoint stores."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
