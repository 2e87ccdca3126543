"""Training infrastructure shared by every trainer (``distill`` now, ``finetune-gan`` later).

Each piece is independent of the model and the loss:
- ``EpochBatches``: seeded epoch permutation of item indices, split over ranks and micro-batches,
  with a position (epoch, offset) that is saved and restored exactly;
- ``setup_backends`` / ``autocast``: TF32 and bf16 autocast on CUDA, plain fp32 on CPU;
- ``wrap_ddp`` / ``sync_gradients``: DDP when running under torchrun, no-ops in one process (FSDP2:
  training/parallel.py; ``sync_gradients`` handles both);
- ``capture_rng`` / ``restore_rng``: every rank's global RNG states plus named generators;
- ``Checkpointer``: numbered checkpoint folders written atomically, a ``latest.json`` pointer (also
  for sharded DCP checkpoints that every rank writes into);
- ``check_finite``: the NaN/inf guard (all ranks stop together);
- ``RunLogger``: JSONL + CSV + TensorBoard scalars (rank 0), truncated on resume;
- ``lr_at``: linear warm-up then constant learning rate.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import random
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ardistill.io import distributed as dist
from ardistill.io.checkpoints import torch_load_reason
from ardistill.training.parallel import DCP_DIR, DCP_FORMAT, dcp_failure
from ardistill.io.fileio import (DiskFullError, atomic_write, atomic_write_bytes, atomic_write_json, disk_full_error,
                                 is_disk_full, read_json)


# ------------------------------------------------------------------------------------------------
# data order


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


# ------------------------------------------------------------------------------------------------
# devices, precision, DDP

PRECISIONS = ("auto", "fp32", "bf16")


def setup_backends(device: torch.device, deterministic: bool = False) -> None:
    """TF32 matmuls/convolutions on CUDA (the paper's fp32/TF32); optional deterministic algorithms."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 on CPU; bf16 autocast is refused on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision 'bf16' (autocast) is for CUDA; CPU training runs in fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast context on CUDA, a no-op otherwise; ``precision`` as resolved."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def lr_at(step: int, lr: float, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


# ------------------------------------------------------------------------------------------------
# RNG state


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


# ------------------------------------------------------------------------------------------------
# checkpoints

STATE_FILE = "state.pt"


class CheckpointReadError(ValueError):
    """A checkpoint's training state cannot be read (truncated, corrupted or not ours)."""


class Checkpointer:
    """Numbered checkpoint folders ``root/step_XXXXXXXX/`` and an atomic ``root/latest.json`` pointer.

    A folder is written completely under a temporary name, renamed, and only then does
    ``latest.json`` point at it: a run killed at any moment leaves the previous checkpoint valid.
    The newest two folders are kept (the older one is the fallback when the newest is damaged
    later, see ``resume_point``); ``keep_every`` > 0 also keeps folders whose step is a multiple
    of it. Only rank 0 writes; ``save`` is a barrier for all ranks.
    """

    def __init__(self, root: str | Path, keep_every: int = 0):
        self.root = Path(root)
        self.keep_every = keep_every

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        folder = self.root / read_json(pointer, "checkpoint pointer")["dir"]
        if not folder.is_dir():
            raise FileNotFoundError(f"{pointer} points to {folder}, which does not exist")
        return folder

    def folders(self) -> list[Path]:
        """Complete checkpoint folders, newest first (those the pointer has pointed at or could)."""
        found = [p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)

    def resume_point(self) -> tuple[Path, dict] | None:
        """(folder, training state) of the newest readable checkpoint, or None when there is none.

        When the newest one's state cannot be read (damaged after it was written), it warns and
        falls back to the previous checkpoint; when none is readable, CheckpointReadError says
        which files were tried.
        """
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        name = str(read_json(pointer, "checkpoint pointer")["dir"])
        newest = self.root / name
        errors = [] if newest.is_dir() else [f"{pointer} points to {name}, which does not exist"]
        step = int(name[5:]) if name[5:].isdigit() else 0
        older = [f for f in self.folders() if int(f.name[5:]) < step]
        for folder in ([newest] if newest.is_dir() else []) + older:
            try:
                state = self.load_state(folder)
            except (CheckpointReadError, FileNotFoundError) as e:
                errors.append(str(e))
                continue
            if errors:
                warnings.warn(f"resuming from {folder.name}: newer checkpoint(s) unreadable: {'; '.join(errors)}")
            return folder, state
        raise CheckpointReadError(f"no readable checkpoint in {self.root}: {'; '.join(errors)}; restore a checkpoint "
                                  f"folder from a copy, or start a new run in another --run-dir")

    def save(self, step: int, files: dict[str, Callable[[str], None]], state: dict,
             sharded: dict[str, Callable[[Path], None]] | None = None) -> Path:
        """Write ``files`` (name -> writer(tmp_path)) and ``state`` (torch.save'd) as checkpoint ``step``.

        ``sharded`` (name -> writer(path)) are written first by every rank into the partial folder (a
        collective: a DCP checkpoint of which each rank writes its own shards, training/parallel.py);
        when any rank fails, every rank raises and the partial folder is removed. Rank 0 then writes
        ``files`` and ``state`` and completes the folder as for any checkpoint.
        """
        final = self.folder(step)
        tmp = self.root / f".{final.name}.partial"
        writing, error, full = tmp, None, False
        if dist.is_main():
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a run killed mid-save
                tmp.mkdir(parents=True)
            except Exception as e:
                error = e
        if sharded:
            error, full = _agree(error, writing)  # every rank learns whether rank 0 made the folder
            if error is None:
                try:
                    for name, write in sharded.items():
                        writing = tmp / name
                        write(writing)
                except _WRITE_ERRORS as e:
                    error = e
                error, full = _agree(error, writing)
        if dist.is_main():
            try:
                if error is not None:
                    raise error
                for name, write in files.items():
                    writing = tmp / name
                    atomic_write(writing, write)
                writing = tmp / STATE_FILE
                atomic_write(writing, lambda p: torch.save(state, p))
            except _WRITE_ERRORS as e:
                full = full or _disk_full(writing, e)  # before the partial folder frees its space
                shutil.rmtree(tmp, ignore_errors=True)  # never trusted (not in latest.json), and it holds space
                if not full:
                    raise
                raise self._full_error(final, tmp, writing) from e
            if final.exists():
                shutil.rmtree(final)  # an orphan never pointed to (killed between rename and pointer)
            tmp.rename(final)
            atomic_write_json(self.root / "latest.json", {"dir": final.name, "step": step})
            self._prune(step)
        elif error is not None:  # a failed sharded write: rank 0 raises the same and removes the folder
            if full:
                raise self._full_error(final, tmp, writing) from error
            raise error
        dist.barrier()
        return final

    def _full_error(self, final: Path, tmp: Path, writing: Path) -> DiskFullError:
        previous = self.latest()
        what = "" if writing == tmp else f" ({writing.name})"
        return DiskFullError(errno.ENOSPC, f"no space left on the device of {self.root} while writing checkpoint "
                             f"{final.name}{what}; the last complete checkpoint is {previous or 'none yet'}: "
                             f"free space and continue with --resume")

    def _prune(self, step: int) -> None:
        folders = [f for f in self.folders() if int(f.name[5:]) <= step]
        keep = {f.name for f in folders[:2]}  # this one and the one before it
        for folder in self.folders():
            s = int(folder.name[5:])
            if folder.name not in keep and not (self.keep_every and s % self.keep_every == 0):
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def load_state(folder: str | Path) -> dict:
        """The training state of a checkpoint folder (weights_only: tensors and primitives only).

        A file that cannot be read raises CheckpointReadError naming it and what to do.
        """
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint state not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, flipped bytes, a pickle that is not ours
            raise CheckpointReadError(f"checkpoint state {path} is unreadable ({torch_load_reason(e)}); delete the folder "
                                      f"{Path(folder).name} and resume from the previous checkpoint") from e
        if isinstance(state, dict) and state.get("checkpoint_format") == DCP_FORMAT:
            meta = Path(folder) / DCP_DIR / ".metadata"
            if not meta.is_file():  # each rank's shard files are listed there; DCP writes it last
                raise CheckpointReadError(f"sharded checkpoint {Path(folder).name} has no {meta} (damaged or incomplete); "
                                          f"delete the folder and resume from the previous checkpoint")
        return state


try:  # DCP's error when a rank's shards could not be written: a BaseException, caught with the others
    from torch.distributed.checkpoint.api import CheckpointException as _CheckpointException
    _WRITE_ERRORS: tuple = (Exception, _CheckpointException)
except ImportError:  # torch built without distributed
    _WRITE_ERRORS = (Exception,)


def _disk_full(path: Path, err: BaseException) -> bool:
    return disk_full_error(path, dcp_failure(err)) is not None


def _agree(error: BaseException | None, writing: Path) -> tuple[BaseException | None, bool]:
    """Collective: (an error when any rank failed (its own, or one saying another rank failed), any full disk).

    A tensor all-reduce, not an object collective: gloo has aborted at exit after object collectives.
    """
    nccl = dist.is_distributed() and torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    flags = torch.tensor([0.0 if error is None else 1.0,
                          1.0 if error is not None and _disk_full(writing, error) else 0.0],
                         device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce_sum(flags)
    if flags[0].item() == 0:
        return None, False
    if error is None:
        error = RuntimeError("writing the checkpoint's shards failed on another process (its error is in its output)")
    return error, flags[1].item() > 0


# ------------------------------------------------------------------------------------------------
# NaN guard


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


# ------------------------------------------------------------------------------------------------
# logging


class RunLogger:
    """Scalars to ``log.jsonl``, ``log.csv`` and TensorBoard (``tb/``); rank 0 only, others no-op.

    ``resume_step``: records after it (logged by a killed run after its last checkpoint) are dropped,
    so the logs of a resumed run read as one run.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = dist.is_main()
        self.dir = Path(run_dir)
        self.jsonl, self.csv = self.dir / "log.jsonl", self.dir / "log.csv"
        self._fields: list[str] | None = None
        self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for f in (self.jsonl, self.csv):
                f.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
            else:
                _quiet_tensorboard_thread()
                try:  # purge_step hides events a killed run wrote after its last checkpoint
                    self._tb = SummaryWriter(str(self.dir / "tb"),
                                             purge_step=None if resume_step is None else resume_step + 1)
                except Exception as e:
                    full = disk_full_error(self.dir / "tb" / "events.out.tfevents", e)
                    if full is None:
                        raise
                    raise full from e

    def _truncate(self, step: int) -> None:
        # a killed run may also have left a half-written last line: dropped like the records after ``step``
        if self.jsonl.is_file():
            rows = [line for line in self.jsonl.read_text().splitlines() if _json_step(line) <= step]
            atomic_write_bytes(self.jsonl, "".join(r + "\n" for r in rows).encode())
        if self.csv.is_file():
            lines = self.csv.read_text().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a half-written row, or a half header (a full disk at the first record)
            rows = list(csv.reader(lines))
            if not rows:
                self.csv.unlink()  # the next record writes the header
            else:
                self._fields = rows[0]
                keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= step]
                buf = io.StringIO()
                csv.writer(buf).writerows(keep)
                atomic_write_bytes(self.csv, buf.getvalue().encode())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One record: ``step`` (1-based optimizer steps done) and named scalars.

        A full disk raises DiskFullError naming the log file. A half line it leaves is harmless: a resume
        truncates the logs to the checkpoint (dropping the line), a fresh run deletes them.
        """
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        target = self.jsonl
        try:
            with open(target, "a") as f:
                f.write(json.dumps(record) + "\n")
            target = self.csv
            if self._fields is None:  # the first record fixes the CSV columns
                self._fields = list(record)
                new = not self.csv.is_file() or self.csv.stat().st_size == 0
                if new:
                    with open(self.csv, "w", newline="") as f:
                        csv.writer(f).writerow(self._fields)
            with open(self.csv, "a", newline="") as f:
                csv.writer(f).writerow([_fmt(record.get(k)) for k in self._fields])
        except OSError as e:
            full = disk_full_error(target, e)
            if full is None:
                raise
            raise full from e
        if self._tb is not None:
            self._tensorboard(lambda tb: [tb.add_scalar(k, float(v), step) for k, v in scalars.items()])

    def _tensorboard(self, call: Callable) -> None:
        # TensorBoard writes in a background thread: a full disk surfaces at a later call (or at close)
        try:
            call(self._tb)
        except Exception as e:
            full = disk_full_error(self.dir / "tb" / "events.out.tfevents", e)
            if full is None:
                raise
            raise full from e

    def close(self) -> None:
        """Flush and close TensorBoard's writer; a full disk raises DiskFullError, except when close is
        called (from a ``finally``) while another error is on its way up: that one is reported."""
        if self._tb is None:
            return
        tb, self._tb = self._tb, None
        in_flight = sys.exc_info()[1] is not None
        errors = []
        for call in (tb.flush, tb.close):  # flush raises the error that stopped the writer thread, if any
            try:
                call()
            except Exception as e:
                errors.append(e)
        if errors:
            full = disk_full_error(self.dir / "tb" / "events.out.tfevents", errors[0])
            if full is None:
                raise errors[0]
            if not in_flight:
                raise full from errors[0]


def _quiet_tensorboard_thread() -> None:
    """Drop the traceback that TensorBoard's writer thread prints when a full disk stops it.

    The thread keeps its error and TensorBoard raises it again in the training thread at the next
    add_scalar / flush, where RunLogger turns it into one line; other errors still print.
    """
    previous = threading.excepthook
    if getattr(previous, "ardistill_quiet_tensorboard", False):
        return

    def hook(args):
        exc = args.exc_value
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(exc, Exception):
            writer = getattr(getattr(args.thread, "_record_writer", None), "_writer", None)
            target = getattr(writer, "filename", None) or getattr(exc, "filename", None)
            if isinstance(target, (str, bytes)) and is_disk_full(os.fsdecode(target), exc):
                return
        previous(args)

    hook.ardistill_quiet_tensorboard = True
    threading.excepthook = hook


def _json_step(line: str) -> float:
    """The step of a JSONL record; inf for a broken line (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _fmt(v) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) and math.isfinite(v) else str(v)


def progress(total: int, initial: int, enabled: bool):
    """A tqdm progress bar over optimizer steps on rank 0 (disabled elsewhere)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not (enabled and dist.is_main()), unit="step", dynamic_ncols=True)


@dataclass
class RunStart:
    """What a trainer needs to begin or continue a run (see ``start_run``)."""

    cfg: object  # the config in force: the saved one (plus runtime fields) when resuming
    ckpt: "Checkpointer"
    latest: Path | None  # the checkpoint resumed from, or None for a fresh start
    state: dict | None  # its training state
    precision: str


def check_resume_config(saved, cfg, where: Path, runtime_fields: tuple[str, ...]):
    """The saved config with ``cfg``'s runtime fields; any other difference is an error naming the fields."""
    from dataclasses import fields, replace
    diff = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(saved)
            if f.name not in runtime_fields and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ValueError(f"cannot resume {where} with other settings ({'; '.join(diff)}); "
                         f"only {', '.join(runtime_fields)} may change")
    return replace(saved, **{k: getattr(cfg, k) for k in runtime_fields})


def start_run(cfg, resume: bool, device: torch.device, runtime_fields: tuple[str, ...]) -> RunStart:
    """Shared start of `distill` and `finetune-gan`: find the latest checkpoint, apply the resume
    rules (only ``runtime_fields`` may change), check the batch split over processes, set up
    backends and this rank's seed.
    """
    from ardistill.io import distributed as dist
    run_dir = Path(cfg.run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.keep_every)
    latest, state = None, None
    pointer = ckpt.root / "latest.json"
    if pointer.is_file():
        if not resume:
            raise ValueError(f"{run_dir} already holds a run (checkpoint {read_json(pointer, 'checkpoint pointer')['dir']}); "
                             f"pass --resume to continue it or choose another --run-dir")
        latest, state = ckpt.resume_point()  # the newest readable one
        saved = type(cfg).from_dict(state["config"])
        if resolve_precision(saved.precision, device) == resolve_precision(cfg.precision, device):
            from dataclasses import replace
            cfg = replace(cfg, precision=saved.precision)  # e.g. 'auto' and 'fp32' on a CPU: the same run
        cfg = check_resume_config(saved, cfg, latest, runtime_fields)
    world = dist.world_size()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"{type(cfg).__name__}.batch_size {cfg.batch_size} is not divisible by processes ({world}) "
                         f"x grad_accum ({cfg.grad_accum})")
    precision = resolve_precision(cfg.precision, device)
    setup_backends(device, cfg.deterministic)
    torch.manual_seed(cfg.seed + dist.rank())
    random.seed(cfg.seed + dist.rank())  # nothing draws from it today; seeded so a checkpoint is a function of the run
    return RunStart(cfg=cfg, ckpt=ckpt, latest=latest, state=state, precision=precision)
