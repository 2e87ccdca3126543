"""Data parallelism over processes for every trainer: DDP (replicated) or FSDP2 (sharded), and sharded checkpoints.

``parallel = "ddp"`` (the default): every process holds the whole model, its gradients, the AdamW
moments and the EMA copy; DistributedDataParallel all-reduces the gradients (``wrap_ddp``).
Checkpoints are single-file safetensors plus ``state.pt``, written by rank 0.

``parallel = "fsdp"``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every transformer block, then
on the root module (embedders, output heads). Parameters become DTensors sharded on dim 0 over the
processes, so weights, gradients, AdamW moments and the EMA take 1/world of the memory each; a
block's weights are all-gathered for its forward and again for its backward, and gradients are
reduce-scattered (averaged) instead of all-reduced. Checkpoints are ``torch.distributed.checkpoint``
(DCP) folders: every rank writes its own shards, and a checkpoint loads on any number of processes
(resharding), under FSDP2 or DDP or in one process.

Choices (see docs/training.md, "Several processes"):

- **EMA**: the EMA copy is made from the whole model before sharding and is then sharded exactly as
  the model (same blocks, same mesh), so each rank's EMA shard covers the same elements as its model
  shard. ``EMA.update`` lerps the local shards with the same ``torch._foreach_lerp_``: the update is
  elementwise, so it is bit-for-bit the update DDP does on whole tensors, with no communication and
  1/world of the memory. Gathering the EMA instead would cost an all-gather of the whole model every
  step and a full copy per rank, which is what FSDP is there to avoid.
- **One process**: without a process group (no torchrun) ``fsdp`` trains the plain module (there is
  nothing to shard over, and it stays bit-identical to ``ddp``), but checkpoints still go through DCP,
  so a run started in one process can continue sharded on several, and the other way round. Under
  torchrun FSDP2 shards even over a world of 1: no memory is saved, but the FSDP2 path (hooks, DTensor
  parameters, collectives) runs, e.g. to check it on a single GPU.
- **Gradient accumulation**: ``sync_gradients`` calls ``set_requires_gradient_sync(False)`` on all
  micro-batches but the last, as DDP's ``no_sync``: one reduce-scatter per optimizer step.
- **Clipping**: ``clip_grad_norm_`` takes DTensor gradients (the norm is reduced over the shards);
  the returned norm is a DTensor, made a plain tensor with ``full``.
- **Frozen networks** (the teacher that relabels targets, the GAN's feature network) stay replicated:
  they have no gradients or optimizer state to shard.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ardistill.io import distributed as dist

PARALLEL = ("ddp", "fsdp")
# the transformer blocks' ModuleList: DiT, ARDStudent ("blocks"), TextDiT, TextARDStudent ("transformer_blocks")
BLOCK_LISTS = ("blocks", "transformer_blocks")
DCP_DIR = "dcp"  # the sharded checkpoint's folder inside a checkpoint folder
DCP_FORMAT = "dcp"  # state["checkpoint_format"] of a sharded checkpoint (absent: single files, DDP)


def check_parallel(name: str, value: str) -> None:
    if value not in PARALLEL:
        raise ValueError(f"{name} must be one of {PARALLEL}, got {value!r}")


def sharded_world(parallel: str) -> bool:
    """Whether this run shards its modules: ``fsdp`` with a process group (torchrun, any world size)."""
    return parallel == "fsdp" and dist.is_distributed()


def is_sharded(module: nn.Module) -> bool:
    """An FSDP2 module (its parameters are DTensor shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(module: nn.Module, blocks: Sequence[str] | None = None, forward_methods: Sequence[str] = ()) -> nn.Module:
    """``fully_shard`` each child of ``module.<name>`` for every name in ``blocks``, then ``module``.

    ``blocks`` None: the transformer blocks (``BLOCK_LISTS``, whichever the module has).
    ``forward_methods``: methods other than ``forward`` that run the module (e.g. the student's KV-cached
    ``sample``); they are registered so that the root's parameters are all-gathered for them too.
    The module is changed in place (its class becomes an FSDP subclass) and returned.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    if blocks is None:
        blocks = [name for name in BLOCK_LISTS if isinstance(getattr(module, name, None), nn.ModuleList)]
    for name in blocks:
        for block in getattr(module, name):
            fully_shard(block)
    fully_shard(module)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    # The student returns a view of its output (a reshape); FSDP2 warns that an in-place op on it would
    # skip a hook. No trainer writes into a model's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return module


def wrap_parallel(model: nn.Module, device: torch.device, parallel: str, blocks: Sequence[str] | None = None,
                  forward_methods: Sequence[str] = (), shadows: Iterable[nn.Module] = ()) -> nn.Module:
    """The module a trainer runs forward and backward through.

    ``ddp``: DistributedDataParallel under torchrun, the module itself in one process (``wrap_ddp``).
    ``fsdp``: under torchrun, ``model`` is sharded in place (``shard``) and returned; ``shadows``
    (the EMA copy, made from ``model`` before this call) are sharded alike. Without a process group
    the module itself (see the module docstring). Build the optimizer after this call: FSDP replaces
    the parameters.
    """
    check_parallel("parallel", parallel)
    if parallel == "ddp":
        return wrap_ddp(model, device)
    if not sharded_world(parallel):
        return model
    shard(model, blocks, forward_methods)
    for other in shadows:
        shard(other, blocks, forward_methods)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun; the module itself in one process."""
    if not dist.is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def sync_gradients(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: DDP all-reduces (FSDP2 reduce-scatters) only when ``sync``
    (the last micro-batch); the others accumulate local gradients, as DDP's ``no_sync``."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module (training/parallel.py)
        return _fsdp_sync(model, sync)
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


@contextlib.contextmanager
def _fsdp_sync(model: nn.Module, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # the default, for a backward outside this context


# ------------------------------------------------------------------------------------------------
# whole (gathered) state dicts


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict: gathered to rank 0 on CPU for a sharded module (a collective; other ranks
    get {}), the module's own state dict otherwise."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return module.state_dict()


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (every rank passes the same): each rank keeps its shard of a sharded module."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        module.load_state_dict(state, strict=True)


def load_indexed_optimizer(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load ``opt.state_dict()`` of a replicated run (parameters numbered in the optimizer's order).

    For a sharded module the numbers are mapped to parameter names and the whole moments are cut into
    this rank's shards; otherwise it is ``opt.load_state_dict``.
    """
    if not is_sharded(module):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the optimizer state has {len(saved)} parameters, the model {len(order)}")
    by_name = dict(zip(saved, order))
    named = {"state": {by_name[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [by_name[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, opt, named, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint)


def _templates(models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    out = {name: get_model_state_dict(m) for name, m in models.items()}
    out.update({name: get_optimizer_state_dict(m, opt) for name, (m, opt) in optimizers.items()})
    return out


def save_sharded(path: str | Path, models: dict[str, nn.Module],
                 optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None) -> None:
    """Write modules and optimizers (keyed by name) as one DCP checkpoint; every rank calls it and writes its shards."""
    import torch.distributed.checkpoint as dcp
    with _one_process_quietly():
        dcp.save(_templates(models, optimizers or {}), checkpoint_id=str(path), no_dist=not dist.is_distributed())


def load_sharded(path: str | Path, models: dict[str, nn.Module],
                 optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None) -> None:
    """Inverse of ``save_sharded`` on any number of processes and any of sharded, DDP or plain modules.

    Only the named entries are read (e.g. the weights without the optimizer, for an export).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    optimizers = optimizers or {}
    state = _templates(models, optimizers)
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_distributed())
    for name, m in models.items():
        set_model_state_dict(m, state[name])
    for name, (m, opt) in optimizers.items():
        set_optimizer_state_dict(m, opt, state[name])


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns at every save and load without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        if not dist.is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def dcp_failure(err: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (a BaseException), else ``err``."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for value in failures.values():
            inner = value[0] if isinstance(value, tuple) else value
            if isinstance(inner, BaseException):
                return inner
    return err
