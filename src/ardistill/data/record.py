"""The recording job: run the teacher's ODE from per-sample seeds and store trajectories on the student grid.

Trajectory i has seed ``base_seed + i`` and a condition drawn by the job's condition source: the label
``classes[i % len(classes)]`` of a class-conditional teacher (class-balanced, ``ClassLabels``), or the
caption at prompt-store row ``rows[i % len(rows)]`` of a text teacher (``PromptRows``); the source is
the only part of the job that knows which.
Shard k holds the fixed index range [k * shard_size, (k + 1) * shard_size) and is computed in
micro-batches of ``batch_size`` aligned to the shard's start, so its bytes depend only on k and the
recording's settings, never on the number of processes: rank r records the shards with
k % world_size == r. Resuming skips the shards already listed in the progress files whose sha256
still matches (rank 0 hashes them first; damaged ones are recorded again); see data/shard_runs.py.

What is exact: the same settings (batch size included), device type and torch build give
byte-identical shards for any number of processes, killed and resumed or not. A different batch
size can change the last bits (CPU and GPU matmuls are not batch-invariant), so ``batch_size`` is
part of the recording's settings and a resume with another one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ardistill.data.prompts import PromptStore, store_id, trim_text
from ardistill.data.shard_runs import ShardRun
from ardistill.data.trajectory_format import (DTYPES, FORMAT, VERSION, Layout, assignment, labels_for, load_manifest,
                                              pack_records, seeds_for, verify)
from ardistill.io import distributed as dist
from ardistill.sampling.diffusion import process_for, student_grid
from ardistill.sampling.guidance import make_model_fn, make_text_model_fn
from ardistill.sampling.ode import (HEUN_LAST_STEPS, SOLVERS, grid_times, randn_from_seeds, recorded_heun_last_step,
                                    resolve_heun_last_step, solve)


@dataclass(frozen=True)
class RecordConfig:
    """Settings of a recording; all of them are stored in the manifest."""

    count: int  # number of trajectories
    num_steps: int = 4  # S, student steps
    teacher_steps: int = 25  # T
    grid: str = "ard"  # diffusion.student_grid kind, unless positions is given
    positions: tuple[int, ...] | None = None  # explicit student grid on the teacher grid (0 and T included)
    solver: str = "ddim"
    cfg_scale: float = 1.5  # ARD / DiT-XL/2 setting
    guidance_channels: int | None = None  # None = all channels; 3 = DiT's legacy forward_with_cfg
    base_seed: int = 0
    classes: tuple[int, ...] | None = None  # labels cycle through these; None = all teacher classes
    dtype: str = "float16"
    shard_size: int = 1024
    batch_size: int = 64
    x0_preds: bool = True  # store the teacher's x0-predictions (needed for target "x0")
    heun_last_step: str | None = None  # solver "heun" only: "euler" / "heun" last interval; None = the family's own

    def __post_init__(self):
        for name in ("count", "num_steps", "teacher_steps", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RecordConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"RecordConfig: solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.heun_last_step is not None and (self.solver != "heun" or self.heun_last_step not in HEUN_LAST_STEPS):
            raise ValueError(f"RecordConfig: heun_last_step must be one of {HEUN_LAST_STEPS} with solver 'heun', "
                             f"got {self.heun_last_step!r} with solver {self.solver!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"RecordConfig: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.base_seed < 0:
            raise ValueError(f"RecordConfig: base_seed must be >= 0, got {self.base_seed}")
        if self.positions is not None:
            pos = tuple(int(p) for p in self.positions)
            object.__setattr__(self, "positions", pos)
            T, S = self.teacher_steps, self.num_steps
            if len(pos) != S + 1 or pos[0] != 0 or pos[-1] != T or list(pos) != sorted(set(pos)):
                raise ValueError(f"RecordConfig: positions must be {S + 1} strictly increasing grid positions "
                                 f"from 0 to teacher_steps {T}, got {list(pos)}")
        else:
            student_grid(self.teacher_steps, self.num_steps, self.grid)  # validates grid kind and sizes
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
            if not self.classes:
                raise ValueError("RecordConfig: classes must not be empty")

    def grid_positions(self) -> list[int]:
        return list(self.positions) if self.positions is not None else student_grid(self.teacher_steps, self.num_steps, self.grid)


@dataclass
class RecordSummary:
    """What a recording run did (over all processes)."""

    out: str
    count: int
    recorded: int  # trajectories recorded by this run (the rest were already on disk)
    shards: int
    total_bytes: int
    bytes_per_trajectory: float
    seconds: float
    status: str  # "fresh", "resume", "repair" (damaged shards of a finished recording rewritten) or "complete"

    @property
    def trajectories_per_second(self) -> float:
        return self.recorded / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"{self.out}: {self.count} trajectories in {self.shards} shard(s), {self.total_bytes / 2**20:.1f} MiB "
                f"({self.bytes_per_trajectory:.0f} bytes/trajectory); this run recorded {self.recorded} "
                f"in {self.seconds:.1f} s ({self.trajectories_per_second:.1f} trajectories/s)"
                + ("; every shard's checksum verified" if self.status in ("complete", "repair") else ""))


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in sorted key order: name, dtype, shape, then the raw bytes of each tensor."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TextRecordConfig(RecordConfig):
    """Settings of a recording with a text teacher: prompts come from a prompt store (data/prompts.py).

    Trajectory i uses the prompt at store row ``prompt_rows[i % len(prompt_rows)]`` (None = every
    prompt of the store, row 0 the empty prompt excluded); guidance uses the store's empty prompt.
    ``classes`` and ``guidance_channels`` do not apply.
    """

    cfg_scale: float = 4.5  # PixArt's setting
    prompt_rows: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.classes is not None or self.guidance_channels is not None:
            raise ValueError("TextRecordConfig: classes and guidance_channels are for class-conditional teachers")
        if self.prompt_rows is not None:
            object.__setattr__(self, "prompt_rows", tuple(int(r) for r in self.prompt_rows))
            if not self.prompt_rows:
                raise ValueError("TextRecordConfig: prompt_rows must not be empty")


# ------------------------------------------------------------------------------------------------
# Condition sources: what trajectory i is conditioned on, and how the teacher reads it


class ClassLabels:
    """Class labels: trajectory i gets ``classes[i % len(classes)]`` (``cfg.classes``, None = every class of the teacher)."""

    field = "label"  # the record field (trajectory_format.Layout.condition)

    def plan_entries(self, tcfg, cfg: RecordConfig) -> tuple[dict, dict, dict]:
        """(teacher, sampler, assignment) entries of the manifest; checks the settings against the teacher."""
        classes = list(cfg.classes) if cfg.classes is not None else list(range(tcfg.num_classes))
        bad = [c for c in classes if not 0 <= c < tcfg.num_classes]
        if bad:
            raise ValueError(f"RecordConfig: classes {bad[:5]} are outside the teacher's {tcfg.num_classes} classes")
        return ({}, {"guidance_channels": cfg.guidance_channels},
                {"labels": {"classes": classes, "rule": "label = classes[index % len(classes)]"}})

    def model_fn(self, teacher: nn.Module, cfg: RecordConfig, device: torch.device):
        return make_model_fn(teacher, cfg.cfg_scale, cfg.guidance_channels)

    def condition(self, labels: np.ndarray, device: torch.device):
        """A micro-batch's labels as the model function's ``y``."""
        return torch.from_numpy(labels).to(device)


class PromptRows:
    """Captions from a prompt store (data/prompts.py): trajectory i uses the prompt at store row
    ``rows[i % len(rows)]`` (``cfg.prompt_rows``, None = every prompt, row 0 the empty prompt excluded);
    guidance uses the store's empty prompt. Records hold the row, not the embedding; the manifest pins
    the store by its manifest's sha256. The store's checksums are verified when the job opens it."""

    field = "prompt"

    def __init__(self, prompt_store: str | os.PathLike):
        self.path = prompt_store

    @cached_property
    def store(self) -> PromptStore:
        return PromptStore(self.path, verify_checksums=True)

    def plan_entries(self, tcfg, cfg: TextRecordConfig) -> tuple[dict, dict, dict]:
        store = self.store
        rows = list(cfg.prompt_rows) if getattr(cfg, "prompt_rows", None) is not None else store.prompt_rows()
        bad = [r for r in rows if not 1 <= r < len(store)]
        if bad:
            raise ValueError(f"TextRecordConfig: prompt_rows {bad[:5]} are outside the prompt store's rows "
                             f"1..{len(store) - 1}")
        if store.layout.width != tcfg.caption_channels:
            raise ValueError(f"prompt store {store.root} holds {store.layout.width}-wide text, the teacher reads "
                             f"caption_channels = {tcfg.caption_channels}")
        return ({"kind": "text"},
                {"guidance_channels": None, "null_text": "the prompt store's empty prompt (row 0)"},
                {"prompts": {"store": str(Path(store.root).resolve()), "store_sha256": store_id(store.root),
                             "encoder": store.encoder, "rows": rows, "rule": "prompt row = rows[index % len(rows)]"}})

    def model_fn(self, teacher: nn.Module, cfg: RecordConfig, device: torch.device):
        null_text, null_mask = trim_text(*self.store.null())
        return make_text_model_fn(teacher, null_text.to(device), null_mask.to(device), cfg.cfg_scale)

    def condition(self, rows: np.ndarray, device: torch.device):
        """A micro-batch's prompt rows as the model function's ``y``: (text, mask), trimmed to the longest caption."""
        text, mask = trim_text(*self.store.get(rows))
        return text.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------
# The plan (the manifest without its shard list) and the job


def build_plan(teacher: nn.Module, cfg: RecordConfig, device: torch.device, conditions=None) -> dict:
    """Everything that determines the recorded bytes: the manifest without its shard list.

    ``conditions``: the condition source (``ClassLabels()`` when None, or ``PromptRows``).
    """
    conditions = conditions if conditions is not None else ClassLabels()
    tcfg = teacher.cfg
    process = process_for(tcfg)
    positions = cfg.grid_positions()
    times = grid_times(process, cfg.teacher_steps)
    teacher_entry, guidance, assigned = conditions.plan_entries(tcfg, cfg)
    size = tcfg.input_size  # DiT: the side; TextDiT: (H, W)
    layout = Layout(num_steps=cfg.num_steps, shape=(tcfg.in_channels, *((size, size) if isinstance(size, int) else size)),
                    dtype=cfg.dtype, x0_preds=cfg.x0_preds, condition=conditions.field)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "count": cfg.count,
        "shard_size": cfg.shard_size,
        "layout": layout.to_dict(),
        "grid": {"kind": "explicit" if cfg.positions is not None else cfg.grid, "teacher_steps": cfg.teacher_steps,
                 "num_steps": cfg.num_steps, "positions": positions, "times": [times[p] for p in positions]},
        "teacher": {**teacher_entry, "config": tcfg.to_dict(), "weights_sha256": weights_sha256(teacher)},
        "sampler": {"process": asdict(process), "solver": cfg.solver, **_heun_field(cfg, process),
                    "teacher_steps": cfg.teacher_steps, "cfg_scale": cfg.cfg_scale, **guidance},
        "seeds": {"base_seed": cfg.base_seed, "rule": "seed = base_seed + index"},
        **assigned,  # "labels" or "prompts"
        # the bits also depend on these (batch composition changes matmul rounding)
        "numerics": {"batch_size": cfg.batch_size, "device": device.type, "torch": torch.__version__},
    }
    return json.loads(json.dumps(plan))  # JSON types (lists, not tuples), so it compares equal to the file


def _heun_field(cfg: RecordConfig, process) -> dict:
    """A Heun recording's manifest names its last interval ("euler" / "heun", resolved per teacher family);
    a manifest without the field (older recordings, other solvers) means the Euler last step."""
    last = resolve_heun_last_step(cfg.solver, process, cfg.heun_last_step)
    return {} if last is None else {"heun_last_step": last}


@torch.inference_mode()
def record(teacher: nn.Module, out: str | os.PathLike, cfg: RecordConfig, device: str | torch.device = "cpu",
           progress: bool = True, conditions=None) -> RecordSummary:
    """Record (or finish recording) ``cfg.count`` teacher trajectories into the folder ``out``.

    Args:
        teacher: a DiT (``teacher.cfg`` is its DiTConfig), or a TextDiT with ``PromptRows``; moved to
            ``device`` and put in eval mode.
        out: output folder; rerunning with the same settings resumes an interrupted recording, and
            rerunning a finished one rehashes its shards and records the damaged ones again.
        cfg: what to record.
        device: where the teacher runs (each torchrun process passes its own).
        progress: show a progress bar (rank 0) with trajectories per second.
        conditions: what trajectories are conditioned on: ``ClassLabels()`` (None) or ``PromptRows(store)``.
    Works in one process or under torchrun (call ``distributed.init`` first); rank r records the
    shards k with k % world_size == r.
    """
    t0 = time.perf_counter()
    out, device = Path(out), torch.device(device)
    teacher = teacher.to(device).eval()
    conditions = conditions if conditions is not None else ClassLabels()
    plan = build_plan(teacher, cfg, device, conditions)
    model_fn = conditions.model_fn(teacher, cfg, device)
    layout = Layout.from_dict(plan["layout"])
    run = ShardRun(out, plan, layout, repair=load_manifest)
    if run.damaged and dist.is_main():
        print(f"record: {len(run.damaged)} shard(s) of the finished recording {out} failed their check and "
              f"are recorded again: {'; '.join(run.damaged[:10])}", file=sys.stderr)
    if run.problems and dist.is_main():
        print(f"record: {len(run.problems)} shard(s) listed by the interrupted run failed their check and are "
              f"recorded again: {'; '.join(run.problems[:10])}", file=sys.stderr)

    process = process_for(teacher.cfg)
    positions = plan["grid"]["positions"]
    values = assignment(plan)[1]  # the classes or prompt rows trajectories cycle through
    mine = run.mine()
    bar = _progress_bar(mine, enabled=progress and dist.is_main() and mine > 0, world=dist.world_size())
    try:
        for k in run.todo:
            idx = run.indices(k)
            seeds, labels = seeds_for(idx, cfg.base_seed), labels_for(idx, values)
            states, x0s = [], []
            for i in range(0, len(idx), cfg.batch_size):  # micro-batches aligned to the shard start
                s, y = seeds[i:i + cfg.batch_size], conditions.condition(labels[i:i + cfg.batch_size], device)
                noise = randn_from_seeds(s.tolist(), layout.shape, device=device)
                res = solve(model_fn, process, noise, y, cfg.teacher_steps, cfg.solver, record_at=positions,
                            heun_last_step=recorded_heun_last_step(plan["sampler"]))
                states.append(res.states.to(_TORCH_DTYPE[cfg.dtype]).cpu())
                if cfg.x0_preds:
                    x0s.append(res.x0_preds[:, :-1].to(_TORCH_DTYPE[cfg.dtype]).cpu())  # end point = the sample
                bar.update(len(s))
            # packed (and checked for non-finite values) in the writer thread
            run.submit(k, partial(pack_records, layout, seeds, labels, torch.cat(states),
                                  torch.cat(x0s) if cfg.x0_preds else None))
    finally:
        run.close()
        bar.close()

    run.finish()
    manifest = verify(out, checksums=False)
    return RecordSummary(out=str(out), count=cfg.count, recorded=run.remaining, shards=len(manifest["shards"]),
                         total_bytes=manifest["total_bytes"], bytes_per_trajectory=manifest["total_bytes"] / cfg.count,
                         seconds=time.perf_counter() - t0, status=run.status)


@torch.inference_mode()
def record_text(teacher: nn.Module, prompt_store: str | os.PathLike, out: str | os.PathLike, cfg: TextRecordConfig,
                device: str | torch.device = "cpu", progress: bool = True) -> RecordSummary:
    """``record`` of a text teacher (TextDiT) whose captions come from the prompt store ``prompt_store``
    (a folder written by ``prompts.write_prompt_store``; its checksums are verified here)."""
    return record(teacher, out, cfg, device, progress, conditions=PromptRows(prompt_store))


_TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, world: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    desc = "record" if world == 1 else f"record (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit="traj", dynamic_ncols=True, smoothing=0.1)


def record_command(teacher_path: str, out: str, cfg: RecordConfig, device: str | None = None,
                   verify_after: bool = False, progress: bool = True, prompt_store: str | None = None,
                   **teacher_kw) -> RecordSummary | None:
    """`ardistill record`: load the teacher, start the process group under torchrun, record, optionally verify.

    With ``prompt_store`` the teacher is a text teacher (PixArt folder or .pth, or ours) whose captions
    come from that store; ``teacher_kw`` (image_size, variant, interpolation_scale, num_heads) apply to
    original PixArt .pth files. Returns the summary on rank 0 and None on the other ranks.
    """
    dev = dist.init(device)
    try:
        if prompt_store is None:
            from ardistill.io.checkpoints import load_any_teacher
            teacher, conditions = load_any_teacher(teacher_path), ClassLabels()
        else:
            from ardistill.io.pixart import load_any_text_teacher
            teacher, conditions = load_any_text_teacher(teacher_path, **teacher_kw), PromptRows(prompt_store)
        summary = record(teacher, out, cfg, device=dev, progress=progress, conditions=conditions)
        if verify_after and dist.is_main():
            verify(out, checksums=True)
        dist.barrier()
        return summary if dist.is_main() else None
    finally:
        dist.cleanup()


def record_text_command(teacher_path: str, prompt_store: str, out: str, cfg: TextRecordConfig,
                        device: str | None = None, verify_after: bool = False, progress: bool = True,
                        **teacher_kw) -> RecordSummary | None:
    """`ardistill record --prompt-store`: ``record_command`` with a text teacher and its prompt store."""
    return record_command(teacher_path, out, cfg, device, verify_after, progress, prompt_store=prompt_store,
                          **teacher_kw)
