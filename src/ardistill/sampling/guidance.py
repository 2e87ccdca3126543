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


TextCondition = tuple[torch.Tensor, torch.Tensor]  # encoder tokens (B, T, C) and padding mask (B, T) bool


def make_text_model_fn(model: nn.Module, null_text: torch.Tensor, null_mask: torch.Tensor,
                       cfg_scale: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor, TextCondition], torch.Tensor]:
    """Wrap a text-conditioned DiT as the ODE's prediction function; its ``y`` is (text, text_mask).

    Guidance uses the null text (the encoder's empty prompt, (1, T0, C) and (1, T0)) as the
    unconditional branch: uncond + cfg_scale * (cond - uncond). Conditional and null texts are padded
    to one length to share a batch; padding is masked, so it changes nothing. ``cfg_scale`` 1 is one
    plain forward pass.
    """
    C = model.in_channels
    if null_text.dim() != 3 or null_text.shape[0] != 1 or null_mask.shape != null_text.shape[:2]:
        raise ValueError(f"null text must be (1, T, C) with a (1, T) mask, got {tuple(null_text.shape)} "
                         f"and {tuple(null_mask.shape)}")

    def fn(x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        text, mask = cond
        if cfg_scale == 1.0:
            return model(x, t, text, mask)[:, :C]
        B = x.shape[0]
        T = max(text.shape[1], null_text.shape[1])
        pad = lambda a, m: (torch.nn.functional.pad(a, (0, 0, 0, T - a.shape[1])),  # noqa: E731
                            torch.nn.functional.pad(m, (0, T - m.shape[1]), value=False))
        text, mask = pad(text, mask)
        null, null_m = pad(null_text.to(text), null_mask.to(mask.device))
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null.expand(B, -1, -1)]),
                    torch.cat([mask, null_m.expand(B, -1)]))
        cond_out, uncond = out[:, :C].chunk(2)
        return uncond + cfg_scale * (cond_out - uncond)

    return fn
