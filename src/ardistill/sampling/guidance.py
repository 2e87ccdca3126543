"""Classifier-free guidance as a model function: (x, t_model, y) -> prediction with in_channels channels.

t_model is the time the network sees (the process's ``model_time``); the ODE solvers pass it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_model_fn(model: nn.Module, cfg_scale: float = 1.0, guidance_channels: int | None = None) -> ModelFn:
    """Wrap a DiT as the ODE's prediction function (eps or velocity), guidance included.

    Args:
        model: a DiT; its learned-sigma channels are dropped.
        cfg_scale: classifier-free guidance scale; 1 = no guidance (one forward pass).
        guidance_channels: ``None`` guides all channels (our default). ``3`` reproduces DiT's legacy
            ``forward_with_cfg``, which guides only the first 3 of 4 latent channels and leaves the
            rest conditional (keep it for exact reproduction of DiT/ARD numbers).
    """
    C = model.in_channels
    null_class = model.y_embedder.num_classes
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (class_dropout_prob > 0)")
    if guidance_channels is not None and not 1 <= guidance_channels <= C:
        raise ValueError(f"guidance_channels must be in [1, {C}], got {guidance_channels}")

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return model(x, t, y)[:, :C]
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:, :C].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        if guidance_channels is None or guidance_channels == C:
            return guided
        g = guidance_channels
        return torch.cat([guided[:, :g], cond[:, g:]], dim=1)

    return fn
