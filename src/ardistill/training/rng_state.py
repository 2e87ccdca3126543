"""Every rank's global RNG states and a trainer's named generators, as checkpoint state (exact resume)."""

from __future__ import annotations

import random
import warnings

import torch

from ardistill.io import distributed as dist


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every rank's global RNG states (torch CPU, CUDA, Python) and this rank's named generators.

    Collective under torchrun (all ranks must call it); only tensors and primitives inside, so the
    result loads with ``torch.load(weights_only=True)``.
    """
    own = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
           "python": _python_state_to_list(random.getstate())}
    return {"ranks": dist.all_gather_object(own),
            "generators": {k: g.get_state() for k, g in (generators or {}).items()}}


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng``; each rank takes its own states (world size must match)."""
    ranks = state["ranks"]
    if len(ranks) != dist.world_size():
        warnings.warn(f"checkpoint RNG states are for {len(ranks)} processes, this run has {dist.world_size()}: "
                      "global RNG states are not restored (results will differ from an uninterrupted run)")
    else:
        own = ranks[dist.rank()]
        torch.set_rng_state(own["torch"])
        if own["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda"])
        random.setstate(_python_state_from_list(own["python"]))
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


def _python_state_to_list(s) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _python_state_from_list(s) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
