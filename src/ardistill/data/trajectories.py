"""The trajectory store's names in one place: import them from here (older code does) or from where they live.

A recording is a folder:

    manifest.json          what was recorded and how; written last (its presence = complete)
    shard-000000.npy ...   shard k holds trajectories [k * shard_size, (k + 1) * shard_size)

Each shard is a plain ``.npy`` file holding a 1-D structured array, one fixed-size record per
trajectory (seed, label or prompt row, the states at the student grid, optionally x0-predictions).
While a recording runs, ``recording.json`` (the plan) and ``progress/rank-*.json`` (shards done,
with checksums) live beside the shards; both are removed once ``manifest.json`` is written. The
full specification is docs/trajectories.md.

Where the parts live (each shared by every sharded store: recordings, prompt stores, latent stores,
unless it says "trajectory"):

    shard_files.py         shard names and ranges, the atomic shard write, the per-shard check, manifest reading
    shard_runs.py          a resumable writing run: plan check, progress files, background writer, resume, repair
    sharded_records.py     reading records back (memory-mapped, each shard hashed before use), verify_split
    trajectory_format.py   the trajectory record layout, seeds and labels, its manifest, verify, describe
    trajectory_dataset.py  StudentDataSpec and TrajectoryDataset (the text part: prompts.TextTrajectoryDataset)

Glossary: S student steps, T teacher steps, positions = indices of the S + 1 student states on the
teacher's T + 1 grid points (0 = noise, T = final sample).
"""

from __future__ import annotations

from ardistill.data.shard_files import (MANIFEST, PLAN, PROGRESS_DIR, CorruptRecordingError,  # noqa: F401
                                        ShardInfo, check_shard_file, nonfinite_records, num_shards, shard_name,
                                        shard_range, write_shard)
from ardistill.data.shard_runs import (ShardWriter, check_listed, finalize, plan_differences,  # noqa: F401
                                       prepare_output, read_progress, reopen_damaged)
from ardistill.data.sharded_records import ShardedRecords, verify_split  # noqa: F401
from ardistill.data.trajectory_dataset import TARGETS, StudentDataSpec, TrajectoryDataset  # noqa: F401
from ardistill.data.trajectory_format import (CONDITIONS, DTYPES, FORMAT, VERSION, Layout,  # noqa: F401
                                              describe, labels_for, load_manifest, pack_records, seeds_for, verify)
