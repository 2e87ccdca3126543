"""`ardistill demo --task t2i`: teacher vs step distillation vs ARD on the embedded text-to-image benchmark.

The benchmark (data/digit_pairs.py): 8x16 images of two digits side by side, captioned by a grammar
that varies wording and word order. ``compare_t2i()``:

1. encodes the captions once into prompt stores (data/prompts.py): training captions of the pairs the
   teacher saw, and two evaluation sets, seen pairs and held-out pairs (never in teacher training);
2. records the shipped text teacher's guided trajectories on the student grid for S = num_steps and
   every S of ``extra_steps`` (the paper's text-to-image student has S = 3);
3. distils step distillation (N_h = 0) and ARD for each S with the same budget, for every training seed;
4. samples every model from the same noise and captions, and reports prompt adherence on seen and
   held-out pairs, FD and precision/recall of the halves' features against real held-out pairs, FD to
   the teacher, the per-step free-running vs teacher-forced error, and a grid with the captions
   printed under each column.

Every stage resumes: rerunning the same command skips finished work.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ardistill.io.fileio import atomic_write_bytes, atomic_write_json

EVAL_SETS = (("seen", "seen", 1), ("held-out", "heldout", 2))  # (report name, pair set, caption seed)


@dataclass(frozen=True)
class T2IConfig:
    """One text-to-image comparison; saved as config.json in ``out``."""

    out: str = "runs/t2i"
    teacher: str | None = None  # None = the shipped digit-pairs text teacher
    # data and recording
    train_prompts: int = 512  # training captions (seen pairs), each encoded once
    train_count: int = 768  # training trajectories (captions cycle)
    eval_count: int = 160  # captions (= trajectories) per evaluation set
    real_count: int = 1000  # real held-out pairs per set: the FD / precision / recall reference
    num_steps: int = 4
    extra_steps: tuple[int, ...] = (3,)  # more student step counts, each with its own recording
    extra_step_distillation: bool = False  # also a step-distillation student at every extra S (else ARD only)
    teacher_steps: int = 25
    grid: str = "ard"
    solver: str = "ddim"
    cfg_scale: float = 3.0
    record_batch: int = 256
    # training: the same budget for every variant
    steps: int = 250
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 20
    ema_decay: float = 0.999
    ema_warmup: bool = True
    history_layers: int | None = None  # ARD's N_h (None: 6/28 of the depth, at least 1)
    seeds: tuple[int, ...] = (0,)
    student: dict = field(default_factory=dict)  # DistillConfig fields shared by all variants
    # evaluation
    grid_columns: int = 8
    latency_batch: int = 64
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "extra_steps", tuple(int(s) for s in self.extra_steps))
        for name in ("train_prompts", "train_count", "eval_count", "real_count", "num_steps", "teacher_steps",
                     "steps", "batch_size", "record_batch", "grid_columns", "latency_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"T2IConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"T2IConfig.seeds must name distinct training seeds, got {self.seeds}")
        if any(s < 1 for s in self.extra_steps) or self.num_steps in self.extra_steps:
            raise ValueError(f"T2IConfig.extra_steps must be step counts >= 1 other than num_steps, got {self.extra_steps}")

    @property
    def all_steps(self) -> tuple[int, ...]:
        return (self.num_steps, *self.extra_steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"], d["extra_steps"] = list(self.seeds), list(self.extra_steps)
        return d


# "quick" is sized for 10 minutes on a 2-core CPU (a text teacher step costs about 3x a digits-teacher
# step: twice the tokens plus cross-attention); "full" is the three-seed comparison of docs/t2i.md.
T2I_PRESETS: dict[str, dict] = {
    "quick": dict(),
    "full": dict(out="runs/t2i-full", train_count=2048, eval_count=300, steps=500, seeds=(0, 1, 2),
                 extra_step_distillation=True),
}


def t2i_config(preset: str, options: dict, student: dict | None = None, progress: bool = True) -> T2IConfig:
    """A preset with the options that are not None on top (``student``: DistillConfig fields for every variant)."""
    if preset not in T2I_PRESETS:
        raise ValueError(f"unknown t2i preset {preset!r}; choose from {sorted(T2I_PRESETS)}")
    kw = dict(T2I_PRESETS[preset])
    kw.update({k: v for k, v in options.items() if v is not None})
    if "num_steps" in kw:  # the main S is never repeated among the extra ones
        kw["extra_steps"] = tuple(S for S in kw.get("extra_steps", T2IConfig.extra_steps) if S != kw["num_steps"])
    extra = {k: v for k, v in (student or {}).items() if v is not None}
    if extra:
        kw["student"] = {**kw.get("student", {}), **extra}
    return T2IConfig(**kw, progress=progress)


def t2i_variants(depth: int, all_steps: tuple[int, ...], history_layers: int | None = None,
                 extra_step_distillation: bool = True) -> dict[str, dict]:
    """Step distillation and ARD (identical but for history_layers) for the first S; ARD (and, if asked,
    step distillation) for every other S, whose names end in ", S=<S>"."""
    from ardistill.training.distill import default_history_layers
    nh = default_history_layers(depth) if history_layers is None else history_layers
    out = {}
    for i, S in enumerate(all_steps):
        suffix = "" if i == 0 else f", S={S}"
        if i == 0 or extra_step_distillation:
            out[f"step distillation{suffix}"] = {"history_layers": 0, "num_steps": S}
        out[f"ARD (N_h={nh}){suffix}"] = {"history_layers": nh, "num_steps": S}
    return out


# ---------------------------------------------------------------------------------------- stages

def encoder_identity(encoder) -> dict:
    """What a prompt store records about the shipped word encoder."""
    return {"name": "ardistill WordEncoder", "sha256": encoder.fingerprint(), "width": encoder.width,
            "max_length": encoder.max_length, "spec": encoder.spec()}


def write_stores(cfg: T2IConfig, encoder) -> dict[str, tuple[Path, object]]:
    """Prompt stores: 'train' (seen pairs, digits' training images) and one per evaluation set (+ its pairs)."""
    from ardistill.data.digit_pairs import make_digit_pairs
    from ardistill.data.prompts import Prompt, write_prompt_store

    sets = {"train": make_digit_pairs(cfg.train_prompts, split="train", pairs="seen", seed=0)}
    for name, pairs, seed in EVAL_SETS:
        sets[name] = make_digit_pairs(cfg.eval_count, split="heldout", pairs=pairs, seed=seed)
    out = {}
    encode = lambda prompts: encoder.encode(prompts, pad_to=encoder.max_length)  # noqa: E731
    for name, data in sets.items():
        path = Path(cfg.out) / "prompts" / name.replace("-", "")
        items = [Prompt(str(i), c) for i, c in enumerate(data.captions)]
        write_prompt_store(path, items, encode, encoder_identity(encoder), dtype="float32", shard_size=4096)
        out[name] = (path, data)
    return out


def record_sets(cfg: T2IConfig, teacher, stores: dict) -> dict[tuple[str, int], Path]:
    """Guided teacher trajectories: training and evaluation recordings for every S (disjoint seeds)."""
    from ardistill.data.record import TextRecordConfig, record_text

    paths = {}
    for S in cfg.all_steps:
        for k, name in enumerate(["train"] + [n for n, _, _ in EVAL_SETS]):
            count = cfg.train_count if name == "train" else cfg.eval_count
            base_seed = 0 if name == "train" else 1_000_000_000 * k  # the same noise for every S
            rc = TextRecordConfig(count=count, num_steps=S, teacher_steps=cfg.teacher_steps, grid=cfg.grid,
                                  solver=cfg.solver, cfg_scale=cfg.cfg_scale, base_seed=base_seed,
                                  batch_size=cfg.record_batch, shard_size=max(cfg.record_batch, 4096), dtype="float32")
            path = Path(cfg.out) / "recordings" / f"{name.replace('-', '')}-S{S}"
            s = record_text(teacher, stores[name][0], path, rc, device=cfg.device or "cpu", progress=cfg.progress)
            print(f"[record {name} S={S}] {s}", flush=True)
            paths[(name, S)] = path
    return paths


def train_variant(cfg: T2IConfig, name: str, overrides: dict, seed: int, recording: Path, teacher_path: Path) -> Path:
    """Distil one variant with one training seed (resumes an interrupted run, skips a finished one)."""
    from ardistill.compare import slug
    from ardistill.training.distill import DistillConfig, distill

    opts = dict(recording=str(recording), teacher=str(teacher_path), steps=cfg.steps, batch_size=cfg.batch_size,
                lr=cfg.lr, warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup,
                seed=seed, device=cfg.device, progress=cfg.progress, ckpt_every=max(cfg.steps // 4, 1),
                tensorboard=False, run_dir=str(Path(cfg.out) / "students" / f"{slug(name)}-seed{seed}"))
    opts.update(cfg.student)
    opts.update({k: v for k, v in overrides.items() if k != "num_steps"})
    t0 = time.perf_counter()
    result = distill(DistillConfig(**opts), resume=True)
    done = "already finished" if math.isnan(result.loss) else f"loss {result.loss:.4g}"
    print(f"[distill {name} seed {seed}] {result.step} steps, {done}, {time.perf_counter() - t0:.0f} s", flush=True)
    return Path(opts["run_dir"])


def shipped_t2i_teacher() -> Path:
    """The shipped digit-pairs text teacher (assets/)."""
    from ardistill.assets import DIGITS_T2I_TEACHER, shipped
    return shipped(DIGITS_T2I_TEACHER, "digit-pairs text teacher")


def _latency(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compare_t2i(cfg: T2IConfig) -> Path:
    """Record, distil every variant for every seed, evaluate all from the same noise and captions; returns report.md."""
    from ardistill.data.digit_pairs import make_digit_pairs
    from ardistill.data.text_encoder import load_text_teacher_and_encoder
    from ardistill.evaluation.classifier import load_digits_classifier
    from ardistill.evaluation.adherence import prompt_adherence
    from ardistill.evaluation.evaluate import (evaluate_samples, load_text_eval_set, pair_features, pair_metrics,
                                               sample_student, trajectory_errors)
    from ardistill.io.images import save_captioned_grid
    from ardistill.io.student_io import load_student
    from ardistill.sampling.diffusion import process_for
    from ardistill.sampling.guidance import make_text_model_fn
    from ardistill.sampling.ode import solve

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = shipped_t2i_teacher() if cfg.teacher is None else Path(cfg.teacher)
    teacher, encoder = load_text_teacher_and_encoder(teacher_path)
    device = torch.device(cfg.device or "cpu")
    variants = t2i_variants(teacher.cfg.depth, cfg.all_steps, cfg.history_layers, cfg.extra_step_distillation)
    atomic_write_json(out / "config.json", {"t2i": cfg.to_dict(), "variants": variants, "teacher": str(teacher_path)})

    stores = write_stores(cfg, encoder)
    recs = record_sets(cfg, teacher, stores)
    t_record = time.perf_counter() - t_start
    runs = {(name, seed): train_variant(cfg, name, ov, seed, recs[("train", ov["num_steps"])], teacher_path)
            for name, ov in variants.items() for seed in cfg.seeds}
    t_train = time.perf_counter() - t_start - t_record

    # ---- evaluation: the same noise and captions for every model
    clf = load_digits_classifier().to(device).eval()
    evs = {}  # (set, S) -> TextEvalSet
    real_feats = {}
    for name, pairs, seed in EVAL_SETS:
        data = stores[name][1]
        real = make_digit_pairs(cfg.real_count, split="heldout", pairs=pairs, seed=100 + seed).images
        real_feats[name] = pair_features(real, clf)
        for S in cfg.all_steps:
            evs[(name, S)] = load_text_eval_set(recs[(name, S)], name, data.left, data.right)
    S0 = cfg.num_steps
    teacher_feats = {name: pair_features(evs[(name, S0)].teacher_samples, clf) for name, _, _ in EVAL_SETS}
    teacher = teacher.to(device).eval()
    null_t, null_m = encoder.null()
    model_fn = make_text_model_fn(teacher, null_t.to(device), null_m.to(device), cfg.cfg_scale)
    process = process_for(teacher.cfg.prediction)
    ev0 = evs[("seen", S0)]
    lat_n = min(cfg.latency_batch, len(ev0.noise))
    lat_args = (ev0.noise[:lat_n].to(device), ev0.text[:lat_n].to(device), ev0.text_mask[:lat_n].to(device))

    real_sets = {}  # an independent real draw, read against its own digits: the reader's ceiling
    for name, pairs, seed in EVAL_SETS:
        draw = make_digit_pairs(cfg.eval_count, split="heldout", pairs=pairs, seed=200 + seed)
        real_sets[name] = {**prompt_adherence(draw.images, draw.left, draw.right, clf).to_dict(),
                           **pair_metrics(pair_features(draw.images, clf), real_feats[name])}
    rows = [{"model": "real held-out pairs", "steps": 0, "sets": real_sets}]
    teacher_lat = _latency(lambda: solve(model_fn, process, lat_args[0], lat_args[1:], cfg.teacher_steps, cfg.solver))
    rows.append({"model": f"teacher ({cfg.solver.upper()}-{cfg.teacher_steps}, cfg {cfg.cfg_scale})",
                 "steps": cfg.teacher_steps, "latency_ms": 1e3 * teacher_lat / lat_n,
                 "sets": {name: evaluate_samples(evs[(name, S0)].teacher_samples, evs[(name, S0)], clf,
                                                 real_feats[name], None) for name, _, _ in EVAL_SETS}})
    for name in rows[-1]["sets"]:
        rows[-1]["sets"][name]["fd_teacher"] = 0.0
    cols = cfg.grid_columns // 2
    pick = {"held-out": list(range(cols)), "seen": list(range(cfg.grid_columns - cols))}
    grid_caps = [evs[(n, S0)].captions[i] for n in ("held-out", "seen") for i in pick[n]]

    def grid_row(samples_by_set):
        return torch.cat([samples_by_set[n][pick[n]] for n in ("held-out", "seen")])

    grids = {"teacher": grid_row({n: evs[(n, S0)].teacher_samples for n, _, _ in EVAL_SETS})}
    per_seed = []
    for vname, ov in variants.items():
        S = ov["num_steps"]
        seed_rows = []
        for seed in cfg.seeds:
            student = load_student(runs[(vname, seed)], device=device)
            sets, samples = {}, {}
            for sname, _, _ in EVAL_SETS:
                ev = evs[(sname, S)]
                samples[sname] = sample_student(student, ev, device=device)
                sets[sname] = evaluate_samples(samples[sname], ev, clf, real_feats[sname], teacher_feats[sname])
                sets[sname]["trajectory_errors"] = trajectory_errors(student, ev, device=device)
            seed_rows.append({"model": vname, "seed": seed, "steps": S, "sets": sets})
            if seed == cfg.seeds[0]:
                grids[vname] = grid_row(samples)
                lat = _latency(lambda: student.sample(*lat_args))
        per_seed += seed_rows
        rows.append({"model": vname, "steps": S, "latency_ms": 1e3 * lat / lat_n, "seeds": list(cfg.seeds),
                     "sets": _mean_sets([r["sets"] for r in seed_rows])})

    wall = {"record": t_record, "train": t_train, "total": time.perf_counter() - t_start}
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    save_captioned_grid(grids, grid_caps, report_dir / "grid.png")
    from ardistill.compare import _machine
    summary = {"rows": rows, "per_seed": per_seed, "wall_seconds": wall, "machine": _machine(),
               "config": cfg.to_dict(), "teacher": str(teacher_path)}
    atomic_write_json(report_dir / "metrics.json", json.loads(json.dumps(summary, default=float)))
    md = t2i_report_markdown(rows, cfg, wall, summary["machine"], grid_caps)
    atomic_write_bytes(report_dir / "report.md", md.encode())
    print(f"report: {report_dir / 'report.md'}  ({wall['total']:.0f} s in all)")
    return report_dir / "report.md"


def _mean_sets(sets_list: list[dict]) -> dict:
    """Mean (and std over seeds, as key_std) of every number of every set; trajectory errors averaged per step."""
    out = {}
    for sname in sets_list[0]:
        entry = {}
        for key, v in sets_list[0][sname].items():
            if key == "trajectory_errors":
                entry[key] = {k: np.mean([s[sname][key][k] for s in sets_list], axis=0).tolist() for k in v}
            elif isinstance(v, (int, float)):
                vals = np.array([s[sname][key] for s in sets_list], dtype=np.float64)
                entry[key] = float(vals.mean())
                entry[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[sname] = entry
    return out


def _cell(entry: dict, key: str, nd: int = 3, seeds: int = 1) -> str:
    v = entry.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    std = entry.get(f"{key}_std")
    return f"{v:.{nd}f} ± {std:.{nd}f}" if seeds > 1 and std is not None else f"{v:.{nd}f}"


def t2i_report_markdown(rows: list[dict], cfg: T2IConfig, wall: dict, machine: str, captions: list[str]) -> str:
    """The report: adherence and pair metrics per evaluation set, per-step errors, notes, the grid."""
    n = len(cfg.seeds)
    lines = ["# Text-to-image: teacher vs step distillation vs ARD (two-digit benchmark)", "",
             "| model | steps | adherence seen | adherence held-out | FD seen | FD held-out | precision / recall seen "
             "| FD to teacher seen / held-out | latency ms/img |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, h = r["sets"]["seen"], r["sets"]["held-out"]
        seeds = n if "seeds" in r else 1
        lat = f"{r['latency_ms']:.3f}" if "latency_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['steps'] or '-'} | {_cell(s, 'adherence', 3, seeds)} | "
                     f"{_cell(h, 'adherence', 3, seeds)} | {_cell(s, 'fd', 2, seeds)} | {_cell(h, 'fd', 2, seeds)} | "
                     f"{_cell(s, 'precision', 3)} / {_cell(s, 'recall', 3)} | "
                     f"{_cell(s, 'fd_teacher', 2, seeds)} / {_cell(h, 'fd_teacher', 2, seeds)} | {lat} |")
    lines += ["", "Per-step MSE to the teacher's trajectory, seen-pair captions (free-running / teacher-forced):", ""]
    smax = max(cfg.all_steps)
    lines += ["| model | " + " | ".join(f"step {k}" for k in range(1, smax + 1)) + " |", "|---|" + "---|" * smax]
    for r in rows:
        te = r["sets"]["seen"].get("trajectory_errors")
        if te:
            cells = [f"{a:.4f} / {b:.4f}" for a, b in zip(te["free_running"], te["teacher_forced"])]
            lines.append(f"| {r['model']} | " + " | ".join(cells + ["-"] * (smax - len(cells))) + " |")
    lines += ["", "Swapped digits (both digits right, in the wrong order), seen / held-out:", "",
              "| model | swapped seen | swapped held-out | left / right accuracy held-out |", "|---|---|---|---|"]
    for r in rows:
        s, h = r["sets"]["seen"], r["sets"]["held-out"]
        lines.append(f"| {r['model']} | {_cell(s, 'swapped')} | {_cell(h, 'swapped')} | "
                     f"{_cell(h, 'left_accuracy')} / {_cell(h, 'right_accuracy')} |")
    lines += ["",
              f"- teacher {cfg.solver.upper()}-{cfg.teacher_steps}, guidance {cfg.cfg_scale} with the empty prompt as "
              f"the null text; students S = {list(cfg.all_steps)} on the '{cfg.grid}' grid, {cfg.steps} steps x batch "
              f"{cfg.batch_size}, lr {cfg.lr}, training seeds {list(cfg.seeds)}"
              + (" (mean ± std over seeds)" if n > 1 else "") + f"; {cfg.train_count} training trajectories over "
              f"{cfg.train_prompts} captions of seen pairs, {cfg.eval_count} evaluation captions per set.",
              "- adherence: the shipped digits classifier reads each 8x8 half; a sample adheres when both digits "
              "match the caption, in order. Held-out pairs never occurred in teacher training.",
              f"- FD and precision/recall (k = 3): the two halves' classifier features side by side, against "
              f"{cfg.real_count} real pairs drawn from the digits' held-out images; FD to teacher: against the "
              "teacher's own samples from the same noise and captions. The real-pairs row reads real pairs against "
              "their own digits (the reader's ceiling) and compares them with an independent real draw.",
              f"- wall time: record {wall['record']:.0f} s, distil {wall['train']:.0f} s, total {wall['total']:.0f} s "
              f"on {machine}.", "",
              "![same noise and captions, one row per model; captions under each column (left half: held-out "
              "pairs, right half: seen pairs)](grid.png)", ""]
    return "\n".join(lines)
