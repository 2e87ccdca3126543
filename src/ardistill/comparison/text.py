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

from pathlib import Path

import torch

from ardistill.comparison.config import T2IConfig
from ardistill.comparison.report import mean_sets, write_t2i_report
from ardistill.comparison.stages import (Clock, RecordingSpec, evaluate_variants, latency_ms, record_trajectories,
                                         train_variants)
from ardistill.comparison.variants import t2i_variants
from ardistill.io.fileio import atomic_write_json


def encoder_identity(encoder) -> dict:
    """What a prompt store records about the shipped word encoder."""
    return {"name": "ardistill WordEncoder", "sha256": encoder.fingerprint(), "width": encoder.width,
            "max_length": encoder.max_length, "spec": encoder.spec()}


def write_stores(cfg: T2IConfig, encoder) -> dict[str, tuple[Path, object]]:
    """Prompt stores: 'train' (seen pairs, digits' training images) and one per evaluation set (+ its pairs)."""
    from ardistill.data.prompts import Prompt, write_prompt_store

    out = {}
    encode = lambda prompts: encoder.encode(prompts, pad_to=encoder.max_length)  # noqa: E731
    for name, data in cfg.bench.caption_sets(cfg.train_prompts, cfg.eval_count).items():
        path = Path(cfg.out) / "prompts" / name.replace("-", "")
        items = [Prompt(str(i), c) for i, c in enumerate(data.captions)]
        write_prompt_store(path, items, encode, encoder_identity(encoder), dtype="float32", shard_size=4096)
        out[name] = (path, data)
    return out


def recording_specs(cfg: T2IConfig, stores: dict) -> list[RecordingSpec]:
    """For every S: the training recording and one per evaluation set (seeds from 0, 1e9, 2e9: the same
    noise for every S)."""
    specs = []
    for S in cfg.all_steps:
        for k, name in enumerate(["train"] + cfg.bench.set_names):
            count = cfg.train_count if name == "train" else cfg.eval_count
            specs.append(RecordingSpec(name, S, count, 1_000_000_000 * k,
                                       Path(cfg.out) / "recordings" / f"{name.replace('-', '')}-S{S}",
                                       shard_size=4096, prompt_store=stores[name][0], label=f"{name} S={S}"))
    return specs


def compare_t2i(cfg: T2IConfig) -> Path:
    """Record, distil every variant for every seed, evaluate all from the same noise and captions; returns report.md."""
    from ardistill.data.text_encoder import load_text_teacher_and_encoder
    from ardistill.evaluation.adherence import prompt_adherence
    from ardistill.evaluation.evaluate import (evaluate_samples, load_text_eval_set, pair_features, pair_metrics,
                                               sample_student, trajectory_errors)
    from ardistill.sampling.diffusion import process_for
    from ardistill.sampling.guidance import make_text_model_fn
    from ardistill.sampling.ode import solve

    clock = Clock()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bench, teacher_path = cfg.bench, cfg.teacher_path
    teacher, encoder = load_text_teacher_and_encoder(teacher_path)
    device = torch.device(cfg.device or "cpu")
    variants = t2i_variants(teacher.cfg.depth, cfg.all_steps, cfg.history_layers, cfg.extra_step_distillation)
    atomic_write_json(out / "config.json", {"t2i": cfg.to_dict(), "variants": variants, "teacher": str(teacher_path)})

    stores = write_stores(cfg, encoder)
    recs = record_trajectories(cfg, teacher, recording_specs(cfg, stores))
    clock.lap("record")
    runs = train_variants(cfg, variants, recs, teacher_path, teacher)
    clock.lap("train")

    # ---- evaluation: the same noise and captions for every model
    clf = bench.classifier(device)
    sets = bench.set_names
    evs = {}  # (set, S) -> TextEvalSet
    real_feats = {}
    for name in sets:
        data = stores[name][1]
        real_feats[name] = pair_features(bench.real_pairs(name, cfg.real_count, draw=100).images, clf)
        for S in cfg.all_steps:
            evs[(name, S)] = load_text_eval_set(recs[(name, S)], name, data.left, data.right)
    S0 = cfg.num_steps
    teacher_feats = {name: pair_features(evs[(name, S0)].teacher_samples, clf) for name in sets}
    teacher = teacher.to(device).eval()
    null_t, null_m = encoder.null()
    model_fn = make_text_model_fn(teacher, null_t.to(device), null_m.to(device), cfg.cfg_scale)
    process = process_for(teacher.cfg)
    ev0 = evs[("seen", S0)]
    lat_n = min(cfg.latency_batch, len(ev0.noise))
    lat_inputs = (ev0.noise[:lat_n].to(device), (ev0.text[:lat_n].to(device), ev0.text_mask[:lat_n].to(device)))

    def teacher_sampler(noise, text, mask):
        return solve(model_fn, process, noise, (text, mask), cfg.teacher_steps, cfg.solver).sample

    real_sets = {}  # an independent real draw, read against its own digits: the reader's ceiling
    for name in sets:
        draw = bench.real_pairs(name, cfg.eval_count, draw=200)
        real_sets[name] = {**prompt_adherence(draw.images, draw.left, draw.right, clf).to_dict(),
                           **pair_metrics(pair_features(draw.images, clf), real_feats[name])}
    rows = [{"model": "real held-out pairs", "steps": 0, "sets": real_sets}]
    rows.append({"model": f"teacher ({cfg.solver.upper()}-{cfg.teacher_steps}, cfg {cfg.cfg_scale})",
                 "steps": cfg.teacher_steps, "latency_ms": latency_ms(teacher_sampler, *lat_inputs, cfg.latency_repeats),
                 "sets": {name: evaluate_samples(evs[(name, S0)].teacher_samples, evs[(name, S0)], clf,
                                                 real_feats[name], None) for name in sets}})
    for name in rows[-1]["sets"]:
        rows[-1]["sets"][name]["fd_teacher"] = 0.0
    cols = cfg.grid_columns // 2
    pick = {"held-out": list(range(cols)), "seen": list(range(cfg.grid_columns - cols))}
    grid_caps = [evs[(n, S0)].captions[i] for n in ("held-out", "seen") for i in pick[n]]

    def grid_row(samples_by_set):
        return torch.cat([samples_by_set[n][pick[n]] for n in ("held-out", "seen")])

    def measure(vname, seed, student):
        S = variants[vname]["num_steps"]
        results, samples = {}, {}
        for sname in sets:
            ev = evs[(sname, S)]
            samples[sname] = sample_student(student, ev, device=device)
            results[sname] = evaluate_samples(samples[sname], ev, clf, real_feats[sname], teacher_feats[sname])
            results[sname]["trajectory_errors"] = trajectory_errors(student, ev, device=device)
        return {"model": vname, "seed": seed, "steps": S, "sets": results}, samples

    grids = {"teacher": grid_row({n: evs[(n, S0)].teacher_samples for n in sets})}
    per_seed = []
    for vname, seed_results, lat in evaluate_variants(cfg, list(variants), runs, measure, lat_inputs, device):
        grids[vname] = grid_row(seed_results[0].samples)
        per_seed += [r.result for r in seed_results]
        rows.append({"model": vname, "steps": variants[vname]["num_steps"], "latency_ms": lat,
                     "seeds": list(cfg.seeds), "sets": mean_sets([r.result["sets"] for r in seed_results])})
    return write_t2i_report(out / "report", cfg, rows, per_seed, grids, grid_caps, clock, teacher_path)
