"""What one step of the ladder's GAN stage costs against a regression step (issue 23, part 3: planning the GAN stage).

Trains, from a ladder run's rung weights and on its recording, a few steps of each variant in this process
(one torch thread), interleaved over ``--reps`` rounds, and prints the seconds per step of the last logging
window and the ratio to the eager regression step:

  regression (eager), regression (compiled)    ``distill`` as the ladder runs it
  GAN control                                  ``finetune_gan`` with factor 0: the discriminator still trains
  GAN (factor 1)                               + the generator's GAN gradient through the frozen teacher

  OMP_NUM_THREADS=1 python bench/bench_ladder_gan_step.py --ladder-out /work/ladder/runs/DiT-photos-S --rung 3000

``--ladder-out`` is a ladder's folder (ladder.json, recordings/, runs/); its runs' rung weights are the start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ladder-out", required=True, help="a ladder's folder (ladder.json, recordings/, runs/)")
    p.add_argument("--rung", type=int, required=True, help="the rung whose weights the GAN runs start from")
    p.add_argument("--student", default="ARD (N_h = 1)")
    p.add_argument("--steps", type=int, default=6, help="steps per variant and round (the last half is timed)")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from ardistill.io.fileio import read_json
    from ardistill.ladder import LadderConfig, LadderRun, distill_config, gan_arms, gan_config
    from ardistill.training.distill import distill
    from ardistill.training.finetune_gan import finetune_gan

    saved = read_json(Path(args.ladder_out) / "ladder.json", "ladder config")
    cfg = LadderConfig(**{**saved, "out": args.ladder_out, "rungs": [r for r in saved["rungs"] if r <= args.rung],
                          "gan_factors": (1.0,), "gan_students": {args.student: [0]}, "gan_steps": args.steps,
                          "students": {**saved["students"], args.student: [0]}})
    control, arm = [a for a in gan_arms(cfg) if a.base.student == args.student]
    half = max(args.steps // 2, 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gan_"))
    names = ("regression (eager)", "regression (compiled)", "GAN control", "GAN (factor 1)")
    sec = {n: [] for n in names}
    try:
        for rep in range(args.reps):
            for name in names:
                d = tmp / f"{len(sec[name])}-{names.index(name)}"
                if name.startswith("regression"):
                    distill(replace(distill_config(cfg, LadderRun(args.student, 0, d), args.steps), log_every=half,
                                    ckpt_every=10 ** 9, warmup_steps=1, compile="compiled" in name))
                else:
                    a = control if "control" in name else arm
                    finetune_gan(replace(gan_config(cfg, a), run_dir=str(d), log_every=half, gan_warmup=0,
                                         ckpt_every=10 ** 9))
                last = [json.loads(line) for line in open(d / "log.jsonl")][-1]
                sec[name].append(cfg.batch_size / last["samples_per_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = min(sec[names[0]])
    print(f"| variant (batch {cfg.batch_size}, {cfg.teacher_name}, from rung {args.rung}) | s/step (best of {args.reps}) "
          "| x regression (eager) |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {min(sec[n]):.2f} | {min(sec[n]) / base:.2f} |")


if __name__ == "__main__":
    main()
