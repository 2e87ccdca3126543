"""The scalars of a run: ``log.jsonl``, ``log.csv`` and TensorBoard (rank 0), truncated on resume; the
progress bar."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

from ardistill.io import distributed as dist
from ardistill.io.fileio import atomic_write_bytes, disk_full_error, is_disk_full


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
