"""The NaN/inf guard: every rank stops together, before the weights are updated, naming the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ardistill.io import distributed as dist


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the weights were not updated."""


def check_finite(values: torch.Tensor, step: int, what: str, last_checkpoint: Path | None,
                 batch: Callable[[], str] | None = None) -> None:
    """Raise ``NonFiniteLossError`` on every rank if any rank's ``values`` are not all finite.

    ``batch`` (called only on failure, on every rank) says which data records were in this rank's
    batch; the message lists every rank's answer.
    """
    bad = torch.tensor([0.0 if bool(torch.isfinite(values).all()) else 1.0], device=values.device)
    if dist.all_reduce_sum(bad).item() > 0:
        where = (f"the last good checkpoint is {last_checkpoint} (resume from it with --resume, e.g. with a lower "
                 f"learning rate)" if last_checkpoint else "no checkpoint was written yet")
        data = ""
        if batch is not None:
            parts = dist.all_gather_object(batch())
            data = "; " + "; ".join(p if len(parts) == 1 else f"rank {r}: {p}" for r, p in enumerate(parts))
        raise NonFiniteLossError(f"non-finite {what} at step {step + 1}: {values.tolist()}{data}; the run stopped "
                                 f"before updating the weights; {where}")
