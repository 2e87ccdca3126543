"""The data order of distill and finetune-gan: a seeded permutation per epoch, cut into global batches that are
split over ranks and micro-batches; its position (epoch, offset) is saved and restored exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ardistill.io import distributed as dist


@dataclass
class DataPosition:
    """Where the data order stands: ``offset`` items of epoch ``epoch``'s permutation consumed."""

    epoch: int = 0
    offset: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


class EpochBatches:
    """Deterministic batches: one seeded permutation of ``num_items`` per epoch, cut into global batches.

    A global batch of ``micro_batch * world * grad_accum`` indices is split so that rank r's
    micro-batch m is slice ((m * world + r) * micro_batch) of it; the tail of an epoch that does not
    fill a global batch is skipped (every step sees a full batch). Only (epoch, offset) is state.
    """

    def __init__(self, num_items: int, micro_batch: int, grad_accum: int = 1, seed: int = 0,
                 rank: int | None = None, world: int | None = None):
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world is None else world
        self.num_items, self.micro_batch, self.grad_accum, self.seed = num_items, micro_batch, grad_accum, seed
        self.global_batch = micro_batch * self.world * grad_accum
        if num_items < self.global_batch:
            raise ValueError(f"the data has {num_items} items, fewer than one global batch of {self.global_batch}")
        self.position = DataPosition()
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The item order of an epoch: depends on (seed, epoch) only."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return self._perm[1]

    def next_step(self) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches of item indices for the next optimizer step."""
        pos = self.position
        if pos.offset + self.global_batch > self.num_items:
            pos.epoch, pos.offset = pos.epoch + 1, 0
        batch = self.permutation(pos.epoch)[pos.offset:pos.offset + self.global_batch]
        pos.offset += self.global_batch
        mb = self.micro_batch
        return [batch[(m * self.world + self.rank) * mb:(m * self.world + self.rank + 1) * mb].tolist()
                for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {**self.position.state_dict(), "num_items": self.num_items, "global_batch": self.global_batch,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: checkpoint has {key} = {state[key]}, "
                                 f"this run has {getattr(self, key)}")
        self.position = DataPosition(int(state["epoch"]), int(state["offset"]))
