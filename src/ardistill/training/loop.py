"""Deprecated path: the training infrastructure that was here is split by concept (issue 24).

- ``data_order``: ``EpochBatches``, ``DataPosition``;
- ``precision``: ``PRECISIONS``, ``setup_backends``, ``resolve_precision``, ``autocast``;
- ``parallel``: ``wrap_ddp``, ``unwrap``, ``sync_gradients`` (with FSDP2);
- ``lr_schedule``: ``lr_at``;
- ``rng_state``: ``capture_rng``, ``restore_rng``;
- ``checkpointer``: ``Checkpointer``, ``CheckpointReadError``, ``STATE_FILE``;
- ``nan_guard``: ``check_finite``, ``NonFiniteLossError``;
- ``run_logger``: ``RunLogger``, ``progress``;
- ``trainer``: ``start_run``, ``RunStart``, ``check_resume_config`` (and the ``Trainer`` of distill and finetune-gan).

Importing ``ardistill.training.loop`` (or ``ardistill.train_utils``) still gives every old name, with a
``FutureWarning``, until ardistill 0.3.
"""

from __future__ import annotations

import warnings

from ardistill.training.checkpointer import STATE_FILE, CheckpointReadError, Checkpointer
from ardistill.training.data_order import DataPosition, EpochBatches
from ardistill.training.lr_schedule import lr_at
from ardistill.training.nan_guard import NonFiniteLossError, check_finite
from ardistill.training.parallel import sync_gradients, unwrap, wrap_ddp
from ardistill.training.precision import PRECISIONS, autocast, resolve_precision, setup_backends
from ardistill.training.rng_state import capture_rng, restore_rng
from ardistill.training.run_logger import RunLogger, progress
from ardistill.training.trainer import RunStart, check_resume_config, start_run

__all__ = ["STATE_FILE", "CheckpointReadError", "Checkpointer", "DataPosition", "EpochBatches", "lr_at",
           "NonFiniteLossError", "check_finite", "sync_gradients", "unwrap", "wrap_ddp", "PRECISIONS", "autocast",
           "resolve_precision", "setup_backends", "capture_rng", "restore_rng", "RunLogger", "progress", "RunStart",
           "check_resume_config", "start_run"]

warnings.warn("ardistill.training.loop is split into training.checkpointer, data_order, precision, parallel, "
              "lr_schedule, rng_state, nan_guard, run_logger and trainer (see its docstring); the old path works "
              "until ardistill 0.3", FutureWarning, stacklevel=2)
