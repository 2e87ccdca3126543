"""The photos comparison with its students trained in parallel processes (one thread each), then evaluated.

Exactly ``ardistill demo --benchmark photos`` with the given settings (same recording, same students,
same report: compare() finds the finished students and only evaluates), except that the
(variant, seed) trainings run side by side, which on a shared multi-core CPU finishes sooner.

  python scripts/photos_study.py --out runs/study-s4 --num-steps 4 --seeds 0,1,2 --steps 150 --jobs 6
  python scripts/photos_study.py --out runs/study-s4 --variants comparison --gan ...   # the full variant set

``--variants demo`` trains step distillation and ARD (``--history-layers``); ``--variants comparison``
the issue-12 set of ``compare.comparison_variants`` (N_h sweep, per-step heads, the public code's
settings, warm-started on-policy history with recorded and with teacher-relabelled targets);
``--only`` keeps the variants with the given slugs. ``--gan`` adds ARD (R+G) and its control
(``--gan-factor`` sets the GAN rows' factor). Students already trained in the same ``--out`` (same
names) are reused, so a comparison can extend a demo run; link finished students into a new ``--out``
to fine-tune them again with other GAN settings.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path


def _train(job):
    import torch
    torch.set_num_threads(1)
    from ardistill.comparison import train_variant
    cfg, name, ov, seed, rec, teacher = job
    return str(train_variant(cfg, name, ov, seed, Path(rec), Path(teacher)))


def _record(job):
    import torch
    torch.set_num_threads(1)
    from ardistill.data.record import RecordConfig, record
    from ardistill.io.checkpoints import load_any_teacher
    cfg, name, count, base_seed, teacher = job
    # the settings of comparison.record_sets, one recording per process
    rc = RecordConfig(count=count, base_seed=base_seed, shard_size=max(cfg.record_batch, 1024),
                      num_steps=cfg.num_steps, teacher_steps=cfg.teacher_steps, grid=cfg.grid, solver=cfg.solver,
                      cfg_scale=cfg.cfg_scale, batch_size=cfg.record_batch, dtype="float32")
    return str(record(load_any_teacher(teacher), Path(cfg.out) / "recordings" / name, rc, device="cpu", progress=False))


def _finetune(job):
    import torch
    torch.set_num_threads(1)
    from ardistill.comparison import finetune_variant
    cfg, run, seed, rec, teacher, control = job
    return str(finetune_variant(cfg, Path(run), seed, Path(rec), Path(teacher), control=control))


def main():
    import torch

    from ardistill.comparison import BENCHMARKS, CompareConfig, compare, comparison_variants, slug
    from ardistill.io.checkpoints import load_any_teacher
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-count", type=int, default=512)
    p.add_argument("--eval-count", type=int, default=200)
    p.add_argument("--history-layers", default="0,1", help="--variants demo: N_h of each variant (0 = step distillation)")
    p.add_argument("--variants", choices=("demo", "comparison"), default="demo")
    p.add_argument("--only", default=None,
                   help="comma-separated slugs (comparison.slug of the report names, e.g. step-distillation,ard-n-h-1) "
                        "of the variants to run, in their report order; default: all of --variants")
    p.add_argument("--gan", action="store_true", help="also ARD (R+G) and its regression-only control")
    p.add_argument("--gan-factor", type=float, default=None, help="the GAN stage's factor (default 0.3, the digits')")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--teacher", default=None, help="default: the shipped photos teacher")
    p.add_argument("--teacher-steps", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = CompareConfig(out=args.out, benchmark="photos", num_steps=args.num_steps, steps=args.steps,
                        batch_size=args.batch_size, train_count=args.train_count, eval_count=args.eval_count,
                        seeds=tuple(int(s) for s in args.seeds.split(",")), teacher=args.teacher,
                        teacher_steps=args.teacher_steps, latency_batch=32, latency_repeats=2, progress=False,
                        gan={} if args.gan_factor is None else {"gan_factor": args.gan_factor})
    teacher = BENCHMARKS["photos"].teacher_path() if args.teacher is None else Path(args.teacher)
    if args.variants == "demo":
        variants = {("step distillation" if n == 0 else f"ARD (N_h={n})"): {"history_layers": n}
                    for n in (int(x) for x in args.history_layers.split(","))}
    else:
        variants = comparison_variants(load_any_teacher(teacher).cfg.depth, args.steps)
    if args.only is not None:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {slug(n) for n in variants})
        if unknown:
            p.error(f"--only: no variant has the slug(s) {unknown}; the slugs are {[slug(n) for n in variants]}")
        variants = {n: ov for n, ov in variants.items() if slug(n) in wanted}
    ard = next((n for n, ov in variants.items() if ov["history_layers"] > 0), None)  # the GAN stage's base
    if args.gan and ard is None:
        p.error("--gan fine-tunes an ARD variant: give one with --history-layers (e.g. 0,1)")
    t0 = time.time()
    train_rec = Path(cfg.out) / "recordings" / "train"
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        pool.map(_record, [(cfg, "train", cfg.train_count, 0, str(teacher)),
                           (cfg, "eval", cfg.eval_count, 1_000_000_000, str(teacher))])
        t1 = time.time()
        jobs = [(cfg, name, ov, seed, str(train_rec), str(teacher)) for name, ov in variants.items()
                for seed in cfg.seeds]
        runs = dict(zip(((job[1], job[3]) for job in jobs), pool.map(_train, jobs, chunksize=1)))  # (name, seed) -> run
        if args.gan:
            pool.map(_finetune, [(cfg, runs[(ard, seed)], seed, str(train_rec), str(teacher), control)
                                 for seed in cfg.seeds for control in (False, True)], chunksize=1)
    t2 = time.time()
    report = compare(cfg, variants, gan=args.gan, gan_variant=ard if args.gan else None)
    print(f"record {t1 - t0:.0f} s, train {t2 - t1:.0f} s, evaluate {time.time() - t2:.0f} s: {report}")


if __name__ == "__main__":
    main()
