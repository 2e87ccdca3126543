"""The stages every comparison runs, class labels or captions alike.

1. ``record_trajectories``: the teacher's guided trajectories on the student grid, a training recording and the
   evaluation recordings (disjoint seeds), for every student step count S;
2. ``train_variants``: every variant distilled for every training seed with the same budget
   (``train_variant``; with a shared student cache, runs are kept by their ``training_key``);
3. ``evaluate_variants``: each variant's students sampled and measured from the same noise and
   conditions, and the first seed's latency (``latency_ms``).

The teacher is loaded once by the caller and handed to the stages that run it; training reads it from
its path (``DistillConfig.teacher``: the run's config names it, and distillation loads its own copy).
Every stage resumes: a finished recording or run is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ardistill.comparison.variants import slug


@dataclass(frozen=True)
class RecordingSpec:
    """One recording of a comparison: a set ('train', 'eval', 'seen', ...) at one S."""

    name: str
    num_steps: int
    count: int
    base_seed: int  # trajectory i starts from the noise of seed base_seed + i
    path: Path
    shard_size: int  # at least; the record batch when it is larger
    prompt_store: Path | None = None  # text teachers: the set's captions
    label: str = ""  # how the progress line names it (default: the name)


def record_trajectories(cfg, teacher, specs: list[RecordingSpec]) -> dict[tuple[str, int], Path]:
    """Record every spec with the teacher (resumable, skipped when complete): (name, S) -> folder."""
    from ardistill.data.record import RecordConfig, TextRecordConfig, record as record_job, record_text

    paths = {}
    for spec in specs:
        opts = dict(count=spec.count, num_steps=spec.num_steps, teacher_steps=cfg.teacher_steps, grid=cfg.grid,
                    solver=cfg.solver, cfg_scale=cfg.cfg_scale, base_seed=spec.base_seed,
                    batch_size=cfg.record_batch, shard_size=max(cfg.record_batch, spec.shard_size), dtype="float32")
        run = dict(device=cfg.device or "cpu", progress=cfg.progress)
        if spec.prompt_store is None:
            s = record_job(teacher, spec.path, RecordConfig(**opts), **run)
        else:
            s = record_text(teacher, spec.prompt_store, spec.path, TextRecordConfig(**opts), **run)
        print(f"[record {spec.label or spec.name}] {s}", flush=True)
        paths[(spec.name, spec.num_steps)] = spec.path
    return paths


def train_variant(cfg, name: str, overrides: dict, seed: int, recording: Path, teacher_path: Path,
                  teacher=None) -> Path:
    """Distil one variant with one training seed (resumes an interrupted run, skips a finished one).

    ``overrides``: the variant's DistillConfig fields over ``cfg.student``; its ``num_steps`` (the
    recording's S) is not one. ``teacher``: the model at ``teacher_path``, already loaded (the demo's one
    copy), else each run loads it. Returns the run folder.
    """
    from ardistill.training.distill import DistillConfig, distill

    opts = dict(recording=str(recording), teacher=str(teacher_path), steps=cfg.steps,
                batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay,
                ema_warmup=cfg.ema_warmup, seed=seed, device=cfg.device, progress=cfg.progress,
                ckpt_every=max(cfg.steps // 4, 1), tensorboard=False)
    opts.update(cfg.student)
    opts.update({k: v for k, v in overrides.items() if k != "num_steps"})
    if cfg.student_cache is None:
        run_dir = Path(cfg.out) / "students" / f"{slug(name)}-seed{seed}"
    else:
        run_dir = Path(cfg.student_cache) / f"{training_key(opts)}-seed{seed}"
    opts["run_dir"] = str(run_dir)
    t0 = time.perf_counter()
    result = distill(DistillConfig(**opts), resume=True, teacher=teacher)
    done = "already finished" if math.isnan(result.loss) else f"loss {result.loss:.4g}"
    print(f"[distill {name} seed {seed}] {result.step} steps, {done}, {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def training_key(opts: dict) -> str:
    """A short hash of everything that changes a trained student (not where it is written or shown)."""
    from ardistill.training.distill import DistillConfig

    ignore = {"run_dir", "progress", "device", "tensorboard", "seed", "log_every", "ckpt_every", "keep_every",
              "verify_shards", "compile"}  # runtime settings: the same student either way
    full = {k: v for k, v in asdict(DistillConfig(run_dir="-", **{k: v for k, v in opts.items() if k != "run_dir"})).items()
            if k not in ignore}
    full["recording"] = str(Path(full["recording"]).resolve())
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_variants(cfg, variants: dict[str, dict], recordings: dict[tuple[str, int], Path],
                   teacher_path: Path, teacher=None) -> dict[tuple[str, int], Path]:
    """Every variant for every training seed on the 'train' recording of its S: (name, seed) -> run folder."""
    return {(name, seed): train_variant(cfg, name, ov, seed, recordings[("train", ov.get("num_steps", cfg.num_steps))],
                                        teacher_path, teacher)
            for name, ov in variants.items() for seed in cfg.seeds}


def latency_ms(sampler, noise, cond, repeats: int) -> float:
    """Median milliseconds per image of one batched call ``sampler(noise, *cond)`` (after a warm-up call)."""
    from ardistill.evaluation.evaluate import median_latency
    return 1e3 * median_latency(sampler, noise, cond, repeats)


@dataclass
class SeedResult:
    """One trained student of a variant, measured."""

    seed: int
    student: object
    result: object  # what the task's ``measure`` returned besides the samples
    samples: object  # the samples of the report's grid


def evaluate_variants(cfg, names: list[str], runs: dict, measure, latency_inputs: tuple, device):
    """For each variant: its students (one per training seed) measured by ``measure(name, seed, student) ->
    (result, samples)``, and the latency of the first seed's sampler on ``latency_inputs`` (noise, condition).
    Yields (name, [SeedResult per seed], latency in ms per image)."""
    from ardistill.io.student_io import load_student

    for name in names:
        per_seed = []
        for seed in cfg.seeds:
            student = load_student(runs[(name, seed)], device=device)
            per_seed.append(SeedResult(seed, student, *measure(name, seed, student)))
        yield name, per_seed, latency_ms(per_seed[0].student.sample, *latency_inputs, cfg.latency_repeats)


class Clock:
    """The wall time of a comparison's stages (report only): ``lap(name)`` ends a stage."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now
        return self.seconds[name]

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}
