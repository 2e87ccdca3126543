"""Teacher vs step distillation vs ARD on one recording: the paper's comparison, end to end.

``compare()`` records the teacher's trajectories (train and a held-out evaluation set with disjoint
seeds), distils every student variant with the same budget for every training seed, evaluates all of
them from the same noise and labels, and writes a report. ``ardistill demo`` is ``compare()`` with
two variants (step distillation = history_layers 0, and ARD); ``ardistill sweep`` runs the
ablations. Every stage resumes: rerunning the same command skips finished work.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ardistill.io.fileio import atomic_write_json


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: recording, training budget, evaluation. Saved as config.json in ``out``."""

    out: str = "runs/demo"
    benchmark: str = "digits"  # a key of BENCHMARKS: its shipped teacher, feature network and real images
    teacher: str | None = None  # None = the benchmark's shipped teacher
    # benchmark "folder", your own data: the teacher's training images and held-out images (ImageNet-layout
    # folders, the same classes) and a classifier trained on them (ardistill train-classifier --data FOLDER)
    real_train: str | None = None
    real_heldout: str | None = None
    classifier: str | None = None
    # recording (teacher DDIM-25, guidance 1.5, S = 4 on the public code's grid)
    train_count: int = 2048
    eval_count: int = 1000
    num_steps: int = 4
    teacher_steps: int = 25
    grid: str = "ard"
    solver: str = "ddim"
    cfg_scale: float = 1.5
    record_batch: int = 256
    # training: the same budget for every variant
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 20
    ema_decay: float = 0.999
    ema_warmup: bool = True  # short runs: decay min(ema_decay, (1+n)/(10+n)), else the EMA stays near the init
    seeds: tuple[int, ...] = (0,)
    student: dict = field(default_factory=dict)  # DistillConfig fields shared by all variants
    gan: dict = field(default_factory=dict)  # GANConfig fields over the digits' GAN settings (the --gan rows)
    # a folder shared by several comparisons (the sweep): students are kept by a hash of their training
    # settings, so a variant that appears on several axes (the baseline) is trained once
    student_cache: str | None = None
    # evaluation
    latency_batch: int = 64
    latency_repeats: int = 5
    grid_columns: int = 10
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        for name in ("train_count", "eval_count", "num_steps", "teacher_steps", "steps", "batch_size",
                     "latency_batch", "latency_repeats", "record_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"CompareConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("CompareConfig.seeds must name at least one training seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig.seeds has repeats: {self.seeds}")
        from ardistill.training.finetune_gan import GANConfig
        bad = set(self.gan) - ({f.name for f in fields(GANConfig)} - {"student", "recording", "teacher", "run_dir",
                                                                          "real", "seed", "device", "progress"})
        if bad:
            raise ValueError(f"CompareConfig.gan: {sorted(bad)} are not GAN settings a comparison may change")
        own = {k: getattr(self, k) for k in ("real_train", "real_heldout", "classifier")}
        if self.benchmark == "folder":
            missing = [k for k, v in own.items() if v is None] + (["teacher"] if self.teacher is None else [])
            if missing:
                raise ValueError(f"CompareConfig: benchmark 'folder' (your own data) needs {', '.join(missing)}")
        elif self.benchmark not in BENCHMARKS:
            raise ValueError(f"CompareConfig.benchmark: unknown {self.benchmark!r}; choose from "
                             f"{sorted(BENCHMARKS) + ['folder']}")
        elif any(v is not None for v in own.values()):
            raise ValueError(f"CompareConfig: real_train / real_heldout / classifier are for benchmark 'folder', "
                             f"not {self.benchmark!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


@dataclass(frozen=True)
class Benchmark:
    """An embedded benchmark: the shipped teacher, the feature network of its metrics, its real images."""

    name: str
    teacher_asset: str  # attribute of ardistill.assets
    features: str  # a key of evaluation.features.FEATURE_NETWORKS
    description: str  # how the real reference is described in reports

    def teacher_path(self) -> Path:
        import ardistill.assets as assets
        return assets.shipped(getattr(assets, self.teacher_asset), f"{self.name} teacher")

    @property
    def gan_real(self) -> str:
        """The GAN stage's real images (GANConfig.real): the benchmark's training split."""
        return self.name

    def feature_network(self, device=None):
        from ardistill.evaluation.features import get_feature_network
        return get_feature_network(self.features, device=device)

    def real_images(self, split: str) -> torch.Tensor:
        """The benchmark's real images of one split ('train' or 'heldout'), (N, C, H, W) in [-1, 1]."""
        if self.name == "photos":
            from ardistill.data.photos import load_photos_split
            return load_photos_split(split).images
        from ardistill.data.digits import load_digits_split
        return load_digits_split(split).images


@dataclass(frozen=True)
class FolderBenchmark:
    """Your own data as a benchmark: the images a teacher was trained on, held-out images of the same
    classes (ImageNet-layout folders) and a classifier trained on them (``ardistill train-classifier
    --data TRAIN --heldout-data HELDOUT --image-size N``), whose features give FD, precision/recall and IS.
    Images are ADM centre-cropped to the classifier's input size. There is no shipped teacher."""

    train: str
    heldout: str
    classifier: str
    name: str = "folder"

    @property
    def description(self) -> str:
        return f"the held-out images of {self.heldout}"

    @property
    def features(self) -> str:
        return "classifier"

    @property
    def gan_real(self) -> str:
        return self.train

    @cached_property
    def _classifier(self):
        from ardistill.evaluation.classifier import load_digits_classifier
        return load_digits_classifier(self.classifier)

    def teacher_path(self) -> Path:
        raise ValueError("benchmark 'folder' (your own data) has no shipped teacher: give --teacher")

    def feature_network(self, device=None):
        from ardistill.evaluation.features import get_feature_network
        return get_feature_network("classifier", classifier=self._classifier, device=device)

    def real_images(self, split: str) -> torch.Tensor:
        from ardistill.data.sources import load_image_folder
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
        return load_image_folder(self.train if split == "train" else self.heldout,
                                 self._classifier.cfg.input_size).images


def get_benchmark(cfg: CompareConfig) -> "Benchmark | FolderBenchmark":
    """The benchmark a comparison evaluates against: an embedded one, or your own data ('folder')."""
    if cfg.benchmark == "folder":
        return FolderBenchmark(cfg.real_train, cfg.real_heldout, cfg.classifier)
    return BENCHMARKS[cfg.benchmark]


BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark("digits", "DIGITS_TEACHER", "digits", "the held-out digits split (359 images)"),
    "photos": Benchmark("photos", "PHOTOS_TEACHER", "photos",
                        "the held-out photo crops (2000 images from regions no training crop touches)"),
}


# Named presets of ``ardistill demo``. "quick" fits 10 minutes on a 2-core CPU; "full" is the
# documented comparison in docs/results.md (longer training, three training seeds).
DEMO_PRESETS: dict[str, dict] = {
    "quick": dict(),
    "full": dict(out="runs/full", train_count=8192, eval_count=2000, steps=3000, seeds=(0, 1, 2)),
}
# ``ardistill demo --benchmark photos`` (docs/photos.md): the harder benchmark, where step
# distillation degrades visibly. "full" is the benchmark setting chosen by the regime study (S = 4,
# 300 steps x batch 64 on 1024 trajectories: step distillation's FD exceeds the teacher's by 36 seed
# standard deviations), three seeds; "quick" is a smaller budget sized for 10 minutes on a 2-core CPU.
PHOTOS_PRESETS: dict[str, dict] = {
    "quick": dict(benchmark="photos", out="runs/demo-photos", train_count=512, eval_count=300, steps=200),
    "full": dict(benchmark="photos", out="runs/full-photos", train_count=1024, eval_count=500, steps=300,
                 seeds=(0, 1, 2)),
}
# ``ardistill demo --benchmark folder``: your own data; the digits' budgets (a start: size them to your data)
FOLDER_PRESETS: dict[str, dict] = {
    "quick": dict(benchmark="folder", out="runs/demo-folder"),
    "full": dict(DEMO_PRESETS["full"], benchmark="folder", out="runs/full-folder"),
}
BENCHMARK_PRESETS: dict[str, dict[str, dict]] = {"digits": DEMO_PRESETS, "photos": PHOTOS_PRESETS,
                                                 "folder": FOLDER_PRESETS}


def demo_variants(depth: int, history_layers: int | None = None) -> dict[str, dict]:
    """Step distillation and ARD: identical except for history_layers."""
    from ardistill.training.distill import default_history_layers
    nh = default_history_layers(depth) if history_layers is None else history_layers
    return {"step distillation": {"history_layers": 0}, f"ARD (N_h={nh})": {"history_layers": nh}}


def comparison_variants(depth: int, steps: int, history_layers: int | None = None) -> dict[str, dict]:
    """The paper's comparison as one report (issue 12): step distillation and ARD first (the pair whose
    FD-degradation ratio is reported), then ARD's N_h sweep, per-step heads (for ARD and, to separate the
    heads' effect from the history's, for step distillation), the public code's student
    (x0 targets, k/S time labels, per-step heads) beside a step-distillation student with the same
    settings, and warm-started on-policy history (teacher forcing for the first half of ``steps``), with
    the recorded targets and, beyond the paper, with targets relabelled by the teacher (DAgger-style).
    Every variant has the same training budget; ``compare(..., gan=True, gan_variant=<ARD>)`` adds
    ARD (R+G) and its regression-only control."""
    from ardistill.training.distill import default_history_layers
    nh = default_history_layers(depth) if history_layers is None else history_layers
    public = {"target": "x0", "time_labels": "uniform", "heads": "per_step", "mask": "M4"}
    out = demo_variants(depth, nh)
    for n in sorted({min(2 * nh, depth), depth} - {nh}):
        out[f"ARD (N_h={n})"] = {"history_layers": n}
    out[f"ARD (N_h={nh}), per-step heads"] = {"history_layers": nh, "heads": "per_step"}
    out["step distillation, per-step heads"] = {"history_layers": 0, "heads": "per_step"}
    out["step distillation, public code's settings"] = {"history_layers": 0, **public}
    out[f"ARD (N_h={nh}), public code's settings"] = {"history_layers": nh, **public}
    out[f"ARD (N_h={nh}), on-policy p=0.5 from step {steps // 2}"] = {
        "history_layers": nh, "on_policy_prob": 0.5, "on_policy_start": steps // 2}
    out[f"ARD (N_h={nh}), on-policy p=0.5 from step {steps // 2}, teacher-relabelled"] = {
        "history_layers": nh, "on_policy_prob": 0.5, "on_policy_start": steps // 2, "on_policy_targets": "teacher"}
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------- stages

def record_sets(cfg: CompareConfig, teacher_path: Path) -> tuple[Path, Path]:
    """Train and evaluation recordings (disjoint seeds); resumable, skipped when complete."""
    from ardistill.io.checkpoints import load_any_teacher
    from ardistill.data.record import RecordConfig, record

    teacher = load_any_teacher(teacher_path)
    out = Path(cfg.out)
    common = dict(num_steps=cfg.num_steps, teacher_steps=cfg.teacher_steps, grid=cfg.grid, solver=cfg.solver,
                  cfg_scale=cfg.cfg_scale, batch_size=cfg.record_batch, dtype="float32")
    paths = []
    for name, count, base_seed in (("train", cfg.train_count, 0), ("eval", cfg.eval_count, 1_000_000_000)):
        rc = RecordConfig(count=count, base_seed=base_seed, shard_size=max(cfg.record_batch, 1024), **common)
        path = out / "recordings" / name
        s = record(teacher, path, rc, device=cfg.device or "cpu", progress=cfg.progress)
        print(f"[record {name}] {s}", flush=True)
        paths.append(path)
    return paths[0], paths[1]


def train_variant(cfg: CompareConfig, name: str, overrides: dict, seed: int, recording: Path, teacher_path: Path):
    """Distil one variant with one training seed (resumes an interrupted run, skips a finished one)."""
    from ardistill.training.distill import DistillConfig, distill

    opts = dict(recording=str(recording), teacher=str(teacher_path), steps=cfg.steps,
                batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay,
                ema_warmup=cfg.ema_warmup,
                seed=seed, device=cfg.device, progress=cfg.progress, ckpt_every=max(cfg.steps // 4, 1),
                tensorboard=False)
    opts.update(cfg.student)
    opts.update(overrides)
    if cfg.student_cache is None:
        run_dir = Path(cfg.out) / "students" / f"{slug(name)}-seed{seed}"
    else:
        run_dir = Path(cfg.student_cache) / f"{training_key(opts)}-seed{seed}"
    opts["run_dir"] = str(run_dir)
    t0 = time.perf_counter()
    result = distill(DistillConfig(**opts), resume=True)
    done = "already finished" if math.isnan(result.loss) else f"loss {result.loss:.4g}"
    print(f"[distill {name} seed {seed}] {result.step} steps, {done}, {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def training_key(opts: dict) -> str:
    """A short hash of everything that changes a trained student (not where it is written or shown)."""
    import hashlib
    from ardistill.training.distill import DistillConfig

    ignore = {"run_dir", "progress", "device", "tensorboard", "seed", "log_every", "ckpt_every", "keep_every",
              "verify_shards", "compile"}  # runtime settings: the same student either way
    full = {k: v for k, v in asdict(DistillConfig(run_dir="-", **{k: v for k, v in opts.items() if k != "run_dir"})).items()
            if k not in ignore}
    full["recording"] = str(Path(full["recording"]).resolve())
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_eval_set(path: Path, count: int | None = None, verify_shards: bool = True):
    """The evaluation recording (or its first ``count`` records) as EvalTrajectories (S + 1 points)."""
    from ardistill.evaluation.evaluate import EvalTrajectories
    from ardistill.data.trajectories import TrajectoryDataset

    ds = TrajectoryDataset(path, verify_shards=verify_shards)
    n = len(ds) if count is None else min(int(count), len(ds))
    rec = ds.records(np.arange(n))
    states = torch.from_numpy(np.ascontiguousarray(rec["states"])).float()
    if "x0_preds" in rec.dtype.names:
        x0 = torch.from_numpy(np.ascontiguousarray(rec["x0_preds"])).float()
        x0 = torch.cat([x0, states[:, -1:]], dim=1)  # the end point's "x0-prediction" is the sample
    else:
        x0 = states.clone()
    return EvalTrajectories(states=states, x0_preds=x0, labels=torch.from_numpy(rec["label"].astype(np.int64)),
                            seeds=torch.from_numpy(rec["seed"].astype(np.int64))), ds.manifest


def summarize(rows: list[dict], names: list[str], teacher_fd: float) -> dict:
    """Mean and standard deviation over training seeds, and the FD-degradation ratio."""
    from ardistill.evaluation.evaluate import fd_degradation_ratio
    out = {}
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        entry = {"seeds": [r["seed"] for r in rs]}
        for key in ("fd", "fd_teacher", "inception_score", "precision", "recall"):
            vals = np.array([r.get(key, float("nan")) for r in rs], dtype=np.float64)
            entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        out[name] = entry
    if len(names) >= 2:
        sd, ard = names[0], names[1]
        out["fd_degradation_ratio"] = fd_degradation_ratio(teacher_fd, out[sd]["fd"]["mean"], out[ard]["fd"]["mean"])
        per_seed = []
        for s in {r["seed"] for r in rows}:
            a = [r for r in rows if r["seed"] == s and r["variant"] == sd]
            b = [r for r in rows if r["seed"] == s and r["variant"] == ard]
            if a and b:
                per_seed.append(fd_degradation_ratio(teacher_fd, a[0]["fd"], b[0]["fd"]))
        out["fd_degradation_ratio_per_seed"] = sorted(per_seed)
        # the same ratio with the distance to the teacher's own samples (same noise) as the degradation:
        # defined even when the students are as close to the real data as the teacher is
        a, b = out[sd]["fd_teacher"]["mean"], out[ard]["fd_teacher"]["mean"]
        out["fd_teacher_ratio"] = a / b if b > 0 else float("nan")
    return out


GAN_ROW = "ARD (R+G)"
GAN_CONTROL_ROW = "ARD (R, control)"


def gan_settings(cfg: CompareConfig) -> dict:
    """The GAN stage's settings of a comparison: the digits' recommended ones with ``cfg.gan`` on top."""
    from ardistill.training.finetune_gan import DIGITS_GAN_SETTINGS
    return dict(DIGITS_GAN_SETTINGS, **cfg.gan)


def finetune_variant(cfg: CompareConfig, student_run: Path, seed: int, recording: Path, teacher_path: Path,
                     control: bool = False) -> Path:
    """ARD (R+G): GAN fine-tuning of a distilled student with ``gan_settings(cfg)`` (resumes).

    ``control=True`` runs the same fine-tuning with GAN weight 0 (regression only, same steps, same
    data order): it separates the GAN's effect from simply training longer.
    """
    from ardistill.training.finetune_gan import GANConfig, finetune_gan

    settings = dict(gan_settings(cfg), **({"gan_factor": 0.0} if control else {}))
    run_dir = Path(cfg.out) / "students" / f"{student_run.name}-{'control' if control else 'gan'}"
    t0 = time.perf_counter()
    res = finetune_gan(GANConfig(student=str(student_run), recording=str(recording), teacher=str(teacher_path),
                                 run_dir=str(run_dir), real=get_benchmark(cfg).gan_real,
                                 seed=seed, device=cfg.device,
                                 progress=cfg.progress,
                                 tensorboard=False, **settings), resume=True)
    print(f"[finetune-gan {run_dir.name}] {res.step} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def compare(cfg: CompareConfig, variants: dict[str, dict], title: str = "Teacher vs step distillation vs ARD",
            gan: bool = False, gan_variant: str | None = None) -> Path:
    """Record, distil every variant for every seed, evaluate all from the same noise, write the report.

    Args:
        cfg: recording, training budget and evaluation settings.
        variants: report name -> DistillConfig overrides (e.g. {"history_layers": 0}). The first two
            are the pair whose FD-degradation ratio is reported (step distillation first).
        gan: also fine-tune an ARD variant with the GAN stage and report it as "ARD (R+G)", next
            to "ARD (R, control)": the same fine-tuning with GAN weight 0.
        gan_variant: the variant that is fine-tuned (default: the last one).
    Returns the path of report.md.
    """
    from ardistill.io.checkpoints import load_any_teacher
    from ardistill.evaluation.evaluate import (ImageMetrics, ModelResult, history_dependence, image_features, image_metrics,
                                    median_latency, run_sampler, trajectory_errors)
    from ardistill.evaluation.report import write_report
    from ardistill.evaluation.flops import sampling_flops
    from ardistill.sampling.guidance import make_model_fn
    from ardistill.sampling.diffusion import process_for
    from ardistill.sampling.ode import solve
    from ardistill.io.student_io import load_student

    if gan_variant is not None and gan_variant not in variants:
        raise ValueError(f"compare: gan_variant {gan_variant!r} is not one of the variants {list(variants)}")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"compare": cfg.to_dict(), "variants": variants})
    bench = get_benchmark(cfg)
    teacher_path = bench.teacher_path() if cfg.teacher is None else Path(cfg.teacher)
    device = torch.device(cfg.device or "cpu")
    _check_teacher_fits(load_any_teacher(teacher_path).cfg, bench, teacher_path)

    train_rec, eval_rec = record_sets(cfg, teacher_path)
    t_record = time.perf_counter() - t_start
    runs = {(name, seed): train_variant(cfg, name, ov, seed, train_rec, teacher_path)
            for name, ov in variants.items() for seed in cfg.seeds}
    extra_rows = [GAN_CONTROL_ROW, GAN_ROW] if gan else []
    if gan:
        ard_name = list(variants)[-1] if gan_variant is None else gan_variant
        for seed in cfg.seeds:
            for row in extra_rows:
                runs[(row, seed)] = finetune_variant(cfg, runs[(ard_name, seed)], seed, train_rec, teacher_path,
                                                     control=row == GAN_CONTROL_ROW)
    t_train = time.perf_counter() - t_start - t_record

    # ---- evaluation: same noise and labels for every model
    ev, manifest = load_eval_set(eval_rec, verify_shards=cfg.student.get("verify_shards", True))
    teacher = load_any_teacher(teacher_path).to(device).eval()
    net = bench.feature_network(device=device)
    real = net.features(bench.real_images("heldout").to(device)).float().cpu()
    process = process_for(teacher.cfg)
    model_fn = make_model_fn(teacher, cfg.cfg_scale)
    lat_noise, lat_y = ev.noise[:cfg.latency_batch].to(device), ev.labels[:cfg.latency_batch].to(device)

    def teacher_sampler(noise, y):
        return solve(model_fn, process, noise, y, cfg.teacher_steps, cfg.solver).sample

    flops = lambda nh: sampling_flops(teacher.cfg, cfg.teacher_steps, cfg.num_steps, nh, cfg_scale=cfg.cfg_scale)
    t_metrics = image_metrics(ev.teacher_samples, real, net)
    t_feats = image_features(ev.teacher_samples, net)
    teacher_row = ModelResult(name=f"teacher ({cfg.solver.upper()}, cfg {cfg.cfg_scale})", steps=cfg.teacher_steps,
                              metrics=t_metrics, flops=flops(0).teacher,
                              latency_ms=1e3 * median_latency(teacher_sampler, lat_noise, lat_y, cfg.latency_repeats))
    real_row = ModelResult(name=f"held-out real {bench.name} (vs train split)", steps=0,
                           metrics=image_metrics(bench.real_images("train"), real, net))
    rows, results, grids = [], [real_row, teacher_row], {"teacher": ev.teacher_samples[:cfg.grid_columns]}
    for name in list(variants) + extra_rows:
        per_seed = []
        for seed in cfg.seeds:
            student = load_student(runs[(name, seed)], device=device)
            samples = run_sampler(student.sample, ev.noise, ev.labels, desc=f"sample {name} seed {seed}"
                                  if cfg.progress else None, device=device)
            m = image_metrics(samples, real, net, teacher_features=t_feats)
            errs = trajectory_errors(student, ev, device=device)
            per_seed.append((seed, student, m, errs, samples))
            rows.append({"variant": name, "seed": seed, **m.__dict__, "trajectory_errors": errs})
            if student.cfg.uses_history:  # the history-cut ablation: how much does the student use it?
                hd = history_dependence(student, ev, samples=samples, device=device)
                cut = image_metrics(hd.pop("samples_history_cut"), real, net, teacher_features=t_feats)
                rows[-1]["history_cut"] = {**hd, "fd": cut.fd, "fd_teacher": cut.fd_teacher}
        seed0, student, m, errs, samples = per_seed[0]
        nh = student.cfg.history_layers if student.cfg.uses_history else 0
        lat = 1e3 * median_latency(student.sample, lat_noise, lat_y, cfg.latency_repeats)
        mean = {k: float(np.mean([getattr(p[2], k) for p in per_seed])) for k in m.__dict__}
        mean_errs = {k: np.mean([p[3][k] for p in per_seed], axis=0).tolist() for k in errs}
        label = name if len(cfg.seeds) == 1 else f"{name} (mean of {len(cfg.seeds)} seeds)"
        results.append(ModelResult(name=label, steps=student.cfg.num_steps, metrics=ImageMetrics(**mean),
                                   latency_ms=lat, flops=flops(nh).ard, errors=mean_errs))
        grids[name] = samples[:cfg.grid_columns]

    summary = summarize(rows, list(variants) + extra_rows, t_metrics.fd)
    summary.update({"per_seed": rows, "wall_seconds": {"record": t_record, "train": t_train,
                                                        "total": time.perf_counter() - t_start},
                    "recording": {"train": str(train_rec), "eval": str(eval_rec), "grid": manifest["grid"]},
                    "machine": _machine()})
    notes = _notes(cfg, summary, list(variants) + extra_rows)
    sections = [history_section(rows)] if any("history_cut" in r for r in rows) else []
    if gan:
        G = gan_settings(cfg)
        notes.append(f"{GAN_ROW}: the ARD (R) student fine-tuned {G['steps']} more steps with regression + hinge GAN "
                     f"(factor {G['gan_factor']}, GAN weight 0 for the first {G['gan_warmup']} steps, frozen-teacher "
                     f"discriminator; docs/gan.md). {GAN_CONTROL_ROW}: the same {G['steps']} steps with GAN weight "
                     "0, so the difference between the two rows is the GAN's alone.")
    path = write_report(out / "report", results, title, summary=summary, notes=notes, grids=grids,
                        feature_name=f"{bench.name} classifier",
                        sections=sections)
    print(f"report: {path}  ({summary['wall_seconds']['total']:.0f} s in all)")
    return path


def _check_teacher_fits(tcfg, bench: Benchmark, teacher_path: Path) -> None:
    """The benchmark's metrics need the teacher's samples to have the shape of its real images."""
    real = tuple(bench.real_images("heldout").shape[1:])
    got = (tcfg.in_channels, tcfg.input_size, tcfg.input_size)
    if got != real:
        raise ValueError(f"teacher {teacher_path} makes {got} samples but the {bench.name} benchmark's feature "
                         f"network and held-out images are {real}; pick the matching --benchmark "
                         f"({', '.join(BENCHMARKS)}) or evaluate with your own feature network")


def history_section(rows: list[dict]) -> str:
    """Markdown table of the history-cut ablation, averaged over seeds, for every history student."""
    lines = ["History use at sampling: the same weights sampled with the history and with it cut (every block "
             "sees only itself); final-sample MSE to the teacher's sample, and FD to the teacher's samples "
             "(mean over seeds):", "",
             "| model | MSE with history | MSE history cut | MSE with vs cut | FD to teacher with / cut |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows if "history_cut" in r):
        rs = [r for r in rows if r["variant"] == name and "history_cut" in r]
        mean = lambda k: float(np.mean([r["history_cut"][k] for r in rs]))
        lines.append(f"| {name} | {mean('mse_to_teacher'):.4f} | {mean('mse_to_teacher_history_cut'):.4f} | "
                     f"{mean('mse_with_vs_cut'):.4f} | {np.mean([r['fd_teacher'] for r in rs]):.2f} / "
                     f"{mean('fd_teacher'):.2f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import os
    import platform
    return f"{platform.machine()} {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


def _notes(cfg: CompareConfig, summary: dict, names: list[str]) -> list[str]:
    notes = [f"teacher {cfg.solver.upper()}-{cfg.teacher_steps}, guidance {cfg.cfg_scale}; students S = {cfg.num_steps} "
             f"on the '{cfg.grid}' grid, {cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.lr}, seeds {list(cfg.seeds)}; "
             f"{cfg.train_count} training / {cfg.eval_count} evaluation trajectories",
             f"FD, precision/recall (k = 3) are on the "
             + (f"classifier {cfg.classifier}" if cfg.benchmark == "folder" else f"shipped {cfg.benchmark} classifier")
             + f"'s features against {get_benchmark(cfg).description}; IS uses its logits. Every model starts from the same noise "
             "and labels.",
             "latency: median wall time per image of one batch of "
             f"{cfg.latency_batch} on this machine ({summary['machine']})."]
    if "fd_degradation_ratio" in summary:
        r = summary["fd_degradation_ratio"]
        notes.append(f"FD degradation ratio (({names[0]} - teacher) / ({names[1]} - teacher)): "
                     + (f"{r:.2f}" if math.isfinite(r) and r >= 0 else
                        "undefined here: a student's FD is not above the teacher's (no degradation to compare)") + (f"; per seed {', '.join(f'{x:.2f}' if math.isfinite(x) and x >= 0 else 'undefined' for x in summary['fd_degradation_ratio_per_seed'])}"
                                   if len(cfg.seeds) > 1 else "") + " (paper, ImageNet-256: 5.1)")
        notes.append(f"FD to teacher: FD against the teacher's own samples from the same noise and labels, the "
                     f"students' degradation measured directly; its ratio {names[0]} / {names[1]} = "
                     f"{summary['fd_teacher_ratio']:.2f} (> 1: ARD stays closer to its teacher)")
    if len(cfg.seeds) > 1:
        for n in names:
            e, t = summary[n]["fd"], summary[n]["fd_teacher"]
            notes.append(f"{n}: FD {e['mean']:.2f} ± {e['std']:.2f}, FD to teacher {t['mean']:.2f} ± {t['std']:.2f} "
                         f"(std over {len(cfg.seeds)} training seeds)")
    return notes


# ------------------------------------------------------------------------------------------ sweep

SWEEP_AXES = ("history_layers", "mask", "target", "heads", "on_policy", "num_steps")


def sweep_variants(axis: str, depth: int, steps: int = 400) -> dict[str, dict]:
    """The paper's ablations (plus on-policy history) as variants of one comparison; first = baseline.

    On-policy history is tried from the first step (p = 0.5) and warm-started: teacher forcing for the
    first half of the ``steps``, then p = 0.5 (a rollout from an untrained student is noise).
    """
    from ardistill.training.distill import default_history_layers
    nh = default_history_layers(depth)
    if axis == "history_layers":
        return {f"N_h={n}": {"history_layers": n} for n in sorted({0, 1, nh, max(nh, depth // 2), depth})}
    if axis == "mask":
        return {f"mask {m}": {"history_layers": nh, "mask": m} for m in ("M1", "M2", "M3", "M4")}
    if axis == "target":
        return {f"{name} target={t}": {"history_layers": n, "target": t}
                for t in ("state", "x0") for name, n in (("SD", 0), ("ARD", nh))}
    if axis == "heads":
        return {f"{name} heads={h}": {"history_layers": n, "heads": h}
                for h in ("shared", "per_step") for name, n in (("SD", 0), ("ARD", nh))}
    if axis == "on_policy":
        policies = {"teacher forcing": {"on_policy_prob": 0.0},
                    "on-policy p=0.5": {"on_policy_prob": 0.5},
                    f"on-policy p=0.5 from step {steps // 2}": {"on_policy_prob": 0.5, "on_policy_start": steps // 2}}
        return {f"{name} {label}": {"history_layers": n, **ov}
                for label, ov in policies.items() for name, n in (("SD", 0), ("ARD", nh))}
    raise ValueError(f"unknown sweep axis {axis!r}; choose from {SWEEP_AXES}")


def sweep(cfg: CompareConfig, axes: tuple[str, ...] = SWEEP_AXES) -> Path:
    """One comparison per axis (per S for ``num_steps``); all rows merged into sweep.md / sweep.json."""
    from ardistill.io.checkpoints import load_any_teacher

    teacher_path = get_benchmark(cfg).teacher_path() if cfg.teacher is None else Path(cfg.teacher)
    depth = load_any_teacher(teacher_path).cfg.depth
    root = Path(cfg.out)
    shared_rec = root / "recordings"
    if cfg.student_cache is None:
        cfg = replace(cfg, student_cache=str(root / "students"))
    table = []
    for axis in axes:
        if axis not in SWEEP_AXES:
            raise ValueError(f"unknown sweep axis {axis!r}; choose from {SWEEP_AXES}")
        runs = []
        if axis == "num_steps":
            for S in (2, 3, 4, 5):
                runs.append((f"S={S}", replace(cfg, out=str(root / f"steps-{S}"), num_steps=S),
                             demo_variants(depth)))
        else:
            runs.append(("", replace(cfg, out=str(root / axis)), sweep_variants(axis, depth, cfg.steps)))
        for prefix, c, variants in runs:
            _link_recordings(shared_rec if c.num_steps == cfg.num_steps else None, Path(c.out))
            report = compare(c, variants, title=f"Sweep: {axis} {prefix}".strip())
            m = json.loads((report.parent / "metrics.json").read_text())
            teacher_fd = m["models"][1]["fd"]
            for name in variants:
                s = m["summary"][name]
                table.append({"axis": axis, "variant": f"{prefix} {name}".strip(), "fd": s["fd"]["mean"],
                              "fd_std": s["fd"]["std"], "fd_teacher": s["fd_teacher"]["mean"],
                              "fd_teacher_std": s["fd_teacher"]["std"], "precision": s["precision"]["mean"],
                              "recall": s["recall"]["mean"], "teacher_fd": teacher_fd,
                              "final_step_mse": next(r["trajectory_errors"]["free_running"][-1] for r in m["models"]
                                                     if r["name"].startswith(name))})
    def pm(mean, std):  # mean ± std over seeds; one seed has no spread to show
        return f"{mean:.2f} ± {std:.2f}" if len(cfg.seeds) > 1 else f"{mean:.2f}"

    lines = [f"# Ablation sweep on the embedded {cfg.benchmark}", "",
             f"Each axis is one comparison (same recording, {cfg.steps} steps x batch {cfg.batch_size}, "
             f"seeds {list(cfg.seeds)}); FD on the {cfg.benchmark} classifier's features vs held-out {cfg.benchmark}; FD to teacher "
             "vs the teacher's own samples from the same noise; final-step MSE to the teacher's end point, "
             "free-running. Mean ± std over seeds when there are several.", "",
             "| axis | variant | FD | FD to teacher | precision | recall | final-step MSE | teacher FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['axis']} | {r['variant']} | {pm(r['fd'], r['fd_std'])} | "
                     f"{pm(r['fd_teacher'], r['fd_teacher_std'])} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['final_step_mse']:.4f} | {r['teacher_fd']:.2f} |")
    atomic_write_json(root / "sweep.json", {"rows": table, "config": cfg.to_dict(), "axes": list(axes)})
    from ardistill.io.fileio import atomic_write_bytes
    atomic_write_bytes(root / "sweep.md", ("\n".join(lines) + "\n").encode())
    print(f"sweep table: {root / 'sweep.md'}")
    return root / "sweep.md"


def _link_recordings(shared: Path | None, out: Path) -> None:
    """Axes with the same S share one recording: point out/recordings at the shared folder."""
    if shared is None:
        return
    target = out / "recordings"
    shared.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(shared.resolve(), target_is_directory=True)
