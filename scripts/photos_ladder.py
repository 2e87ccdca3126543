"""The photos convergence ladder (issue 23): every (teacher, student, seed) trained once, evaluated at each rung.

Runs the jobs of ``ardistill.ladder`` in ``--jobs`` processes (one torch thread each), rung by rung
across all ladders (the cheapest pending rung first, so every budget's rows arrive before the next
budget's), and after every finished job rewrites the CSV and, with ``--figure``, the figure. Stop it
at any time: the same command continues where it stopped (finished rungs are kept, a run in progress
resumes from its latest checkpoint, recordings resume).

  python scripts/photos_ladder.py --out /work/ladder/runs \\
      --ladder DiT-photos-S:300,1000,3000,10000 \\
      --ladder DiT-photos-T=/work/ladder/teachers/photos-T-14k/teacher.safetensors:300,1000,3000,10000,30000 \\
      --jobs 2 --csv docs/data/photos_ladder.csv --figure docs/img/photos_ladder.png

``--ladder NAME[=TEACHER]:RUNGS``: NAME is the CSV's teacher column and the ladder's folder under
``--out``; without ``=TEACHER`` the shipped photos teacher is used. ``--report`` prints the ratio table
from the CSV (and with ``--figure`` draws the figure from it) and exits. Run it from a worktree pinned at one commit (the rows carry that commit).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import sys
import time
from pathlib import Path


def _job(kind: str, cfg_dict: dict, run: tuple | None, steps: int | None):
    import torch
    torch.set_num_threads(1)
    from ardistill.ladder import LadderConfig, LadderRun, prepare, run_rung, teacher_row
    cfg = LadderConfig(**cfg_dict)
    t0 = time.perf_counter()
    if kind == "record":
        prepare(cfg, run[0])
        return kind, cfg.teacher_name, run, steps, time.perf_counter() - t0
    if kind == "teacher":
        teacher_row(cfg)
        return kind, cfg.teacher_name, run, steps, time.perf_counter() - t0
    lr = LadderRun(run[0], run[1], Path(run[2]))
    run_rung(cfg, lr, steps)
    return kind, cfg.teacher_name, run, steps, time.perf_counter() - t0


def parse_ladder(spec: str, out: Path, **common):
    from ardistill.ladder import LadderConfig
    head, _, rungs = spec.rpartition(":")
    if not head or not rungs:
        raise SystemExit(f"--ladder {spec!r}: expected NAME[=TEACHER]:RUNG,RUNG,...")
    name, _, teacher = head.partition("=")
    return LadderConfig(out=str(out / name), teacher_name=name, teacher=teacher or None,
                        rungs=tuple(int(r) for r in rungs.split(",")), **common)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder of the ladders (recordings, runs), outside the repository (required)")
    p.add_argument("--ladder", action="append", help="NAME[=TEACHER]:RUNG,RUNG,... (repeatable; required)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--csv", default=None, help="write the table here after every job")
    p.add_argument("--figure", default=None, help="write the figure here after every job")
    p.add_argument("--train-count", type=int, default=16384)
    p.add_argument("--eval-count", type=int, default=500)
    p.add_argument("--train-eval-count", type=int, default=500)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seeds", default=None,
                   help="STUDENT=SEEDS;... to override the default students (e.g. 'step distillation=0,1;ARD (N_h = 1)=0,1')")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where recording, training and sampling run (cuda: several jobs share the GPU)")
    p.add_argument("--max-rung", type=int, default=None, help="only rungs up to this many steps in this invocation")
    p.add_argument("--report", action="store_true", help="print the ratio table of --csv and exit")
    args = p.parse_args(argv)
    from ardistill.ladder import ladder_rows, ladder_runs, plot_ladder, ratio_table, read_csv, write_csv

    if args.report:
        if not args.csv:
            p.error("--report needs --csv")
        rows = read_csv(args.csv)
        print(ratio_table(rows))
        if args.figure:
            plot_ladder(rows, args.figure)
        return
    if not args.out or not args.ladder:
        p.error("--out and --ladder are required (except with --report)")
    common = dict(train_count=args.train_count, eval_count=args.eval_count, train_eval_count=args.train_eval_count,
                  num_steps=args.num_steps, teacher_steps=args.teacher_steps, batch_size=args.batch_size,
                  lr=args.lr, warmup_steps=args.warmup_steps, ckpt_every=args.ckpt_every,
                  compile=args.compile, device=args.device)
    if args.seeds:
        common["students"] = {k.strip(): [int(s) for s in v.split(",")]
                              for k, _, v in (item.rpartition("=") for item in args.seeds.split(";"))}
    out = Path(args.out).resolve()
    ladders = [parse_ladder(s, out, **common) for s in args.ladder]

    def publish():
        rows = ladder_rows(ladders)
        if args.csv:
            write_csv(rows, args.csv)
        if args.figure and any(r["student"] != "teacher" for r in rows):
            plot_ladder(rows, args.figure)

    ctx = mp.get_context("spawn")
    # a fresh process per job: torch.compile's cache is per process and guards on the model object, so a
    # reused worker would recompile for every run and fall back to eager past dynamo's recompile limit
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        # 1. recordings (one process each), then the teacher rows
        futs = [pool.submit(_job, "record", c.to_dict(), (split,), None) for c in ladders for split in ("eval", "train")]
        for f in cf.as_completed(futs):
            kind, t, run, _, sec = f.result()
            print(f"[{t}] recording {run[0]} ready ({sec:.0f} s)", flush=True)
        for f in cf.as_completed([pool.submit(_job, "teacher", c.to_dict(), None, None) for c in ladders]):
            print(f"[{f.result()[1]}] teacher evaluated", flush=True)
        publish()
        # 2. the rungs: a run's next rung once its previous one is done; lowest rung index first, then the
        #    cheaper ladder (listed last is assumed no cheaper: order by rung steps)
        pending = {}
        for li, c in enumerate(ladders):
            for r in ladder_runs(c):
                rungs = [n for n in c.rungs if args.max_rung is None or n <= args.max_rung]
                todo = [n for n in rungs if not r.rung_json(n).is_file()]
                if todo:
                    pending[(li, r.student, r.seed)] = (c, r, todo)
        running = {}
        while pending or running:
            free = args.jobs - len(running)
            idle = [k for k in pending if k not in {v for v in running.values()}]
            idle.sort(key=lambda k: (pending[k][0].rungs.index(pending[k][2][0]), pending[k][2][0], k))
            for k in idle[:free]:
                c, r, todo = pending[k]
                fut = pool.submit(_job, "rung", c.to_dict(), (r.student, r.seed, str(r.run_dir)), todo[0])
                running[fut] = k
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for f in done:
                k = running.pop(f)
                kind, t, run, steps, sec = f.result()
                c, r, todo = pending[k]
                todo.pop(0)
                if not todo:
                    del pending[k]
                print(f"[{t}] {run[0]} seed {run[1]}: rung {steps} done ({sec:.0f} s)", flush=True)
                publish()
    publish()
    if args.csv:
        print(ratio_table(read_csv(args.csv)))


if __name__ == "__main__":
    sys.exit(main())
