"""Numbered checkpoint folders written atomically with a ``latest.json`` pointer (also for sharded DCP
checkpoints that every rank writes into), and reading them back with a fallback to the previous one."""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from ardistill.io import distributed as dist
from ardistill.io.checkpoints import torch_load_reason
from ardistill.io.fileio import DiskFullError, atomic_write, atomic_write_json, disk_full_error, read_json
from ardistill.training.parallel import DCP_DIR, DCP_FORMAT, dcp_failure

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
