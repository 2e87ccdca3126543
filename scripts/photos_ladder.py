"""The photos convergence ladder (issue 23): every (teacher, student, seed) trained once, evaluated at each rung.

Runs the jobs of ``ardistill.ladder`` in ``--jobs`` processes (one torch thread each), rung by rung
across all ladders (the cheapest pending rung first, so every budget's rows arrive before the next
budget's), and after every finished job rewrites the CSV and, with ``--figure``, the figure (a failure
there is reported and the jobs go on; only the last rewrite fails the command). Stop it at any time:
the same command continues where it stopped (finished rungs are kept, a run in progress resumes from
its latest checkpoint, recordings resume).

  python scripts/photos_ladder.py --out /work/ladder/runs \\
      --ladder DiT-photos-S:300,1000,3000,10000 \\
      --ladder DiT-photos-T=/work/ladder/teachers/photos-T-14k/teacher.safetensors:300,1000,3000,10000,30000 \\
      --jobs 2 --csv docs/data/photos_ladder.csv --figure docs/img/photos_ladder.png

``--ladder NAME[=TEACHER]:RUNGS``: NAME is the CSV's teacher column and the ladder's folder under
``--out``; without ``=TEACHER`` the shipped photos teacher is used; an item ``S=n`` among the rungs
samples that ladder's students in n steps instead of ``--num-steps`` (e.g. ``DiT-photos-T-S2=...:300,1000,S=2``).
``--gan-factors 0.3,1,3,10`` adds the GAN stage (ardistill/ladder/gan.py) at the last rung: each run of
``--gan-seeds`` fine-tuned ``--gan-steps`` more steps per factor and once as its regression-only control;
its jobs start as soon as their base rung is evaluated. ``--report`` prints the ratio tables from the
CSV (and with ``--figure`` draws the figure from it) and exits. ``--history-cut CSV`` samples the ARD runs'
evaluated rungs with their history cut and swapped (does the student use it, and what for?) and exits;
``--status`` prints where every run stands, the hours to go and the wall time at ``--jobs`` (the
scheduler's order replayed), and exits. Run it from a worktree pinned at one commit (the rows carry it).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path


def _job(kind: str, cfg_dict: dict, run: tuple | None, steps: int | None):
    import torch
    torch.set_num_threads(1)
    from ardistill.ladder import LadderConfig, LadderRun, gan_arms, prepare, run_arm, run_rung, teacher_row
    cfg = LadderConfig(**cfg_dict)
    t0 = time.perf_counter()
    if kind == "gan":
        (arm,) = [a for a in gan_arms(cfg) if str(a.run_dir) == run[2]]
        run_arm(cfg, arm)
        return kind, cfg.teacher_name, run, steps, time.perf_counter() - t0
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
    items = rungs.split(",")
    sizes = [i for i in items if i.startswith("S=")]
    if sizes:
        common = dict(common, num_steps=int(sizes[-1][2:]))
    try:
        steps = tuple(int(r) for r in items if not r.startswith("S="))
    except ValueError:
        raise SystemExit(f"--ladder {spec!r}: rungs must be step counts (and an optional S=n)") from None
    return LadderConfig(out=str(out / name), teacher_name=name, teacher=teacher or None, rungs=steps, **common)


def print_tables(rows: list[dict]) -> None:
    """The ratio table, the error-accumulation table, the convergence table, and the GAN stage's table when
    the rows have one."""
    from ardistill.ladder import convergence_table, error_table, gan_table, parse_row_name, ratio_table
    print(ratio_table(rows))
    print()
    print(error_table(rows))
    print()
    print(convergence_table(rows))
    if any(parse_row_name(r["student"]).gan for r in rows):
        print()
        print(gan_table(rows))


def print_history_tables(path: str) -> None:
    """The history-cut and history-swap tables of a ``--history-cut`` CSV."""
    from ardistill.ladder import read_csv
    from ardistill.ladder.history import history_cut_table, history_swap_table
    rows = read_csv(path)
    print(history_cut_table(rows))
    print()
    print(history_swap_table(rows))


def _students(spec: str) -> dict:
    return {k.strip(): [int(s) for s in v.split(",")] for k, _, v in (item.rpartition("=") for item in spec.split(";"))}


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
    p.add_argument("--gan-factors", default=None, help="the GAN stage's factors, e.g. 0.3,1,3,10 (default: no GAN stage)")
    p.add_argument("--gan-seeds", default=None,
                   help="STUDENT=SEEDS;... the runs the GAN stage starts from (default: seed 0 of the main pair)")
    p.add_argument("--gan-from", type=int, default=0, help="the rung the GAN stage starts from (default: the last)")
    p.add_argument("--gan-steps", type=int, default=1000, help="GAN fine-tuning steps (and the control's)")
    p.add_argument("--gan-warmup", type=float, default=0.01,
                   help="GAN-free warm-up, as a fraction of the base rung's steps (the paper: 0.01)")
    p.add_argument("--report", action="store_true", help="print the tables of --csv and exit")
    p.add_argument("--status", action="store_true",
                   help="with the same --out, --ladder and --gan-* flags: print where every run and GAN arm stands "
                        "(rungs done, checkpoint, speed, hours to go) and exit; reads only")
    p.add_argument("--history-cut", default=None, metavar="CSV",
                   help="the history-cut ablation (ardistill/ladder/history.py): with --out and --ladder, sample every "
                        "evaluated rung of the ARD runs with and without their history, write CSV, print its table "
                        "and exit (trains nothing; can run beside the ladder); with --report, print CSV's table")
    args = p.parse_args(argv)
    from ardistill.ladder import ladder_rows, plot_ladder, read_csv, write_csv
    from ardistill.ladder.schedule import next_jobs, pending_jobs
    from ardistill.ladder.history import history_cut_rows, write_history_csv

    if args.report:
        if not args.csv:
            p.error("--report needs --csv")
        rows = read_csv(args.csv)
        print_tables(rows)
        if args.figure:
            plot_ladder(rows, args.figure)
        if args.history_cut:
            print()
            print_history_tables(args.history_cut)
        return
    if not args.out or not args.ladder:
        p.error("--out and --ladder are required (except with --report)")
    common = dict(train_count=args.train_count, eval_count=args.eval_count, train_eval_count=args.train_eval_count,
                  num_steps=args.num_steps, teacher_steps=args.teacher_steps, batch_size=args.batch_size,
                  lr=args.lr, warmup_steps=args.warmup_steps, ckpt_every=args.ckpt_every,
                  compile=args.compile, device=args.device)
    if args.seeds:
        common["students"] = _students(args.seeds)
    if args.gan_factors:
        common.update(gan_factors=tuple(float(f) for f in args.gan_factors.split(",")), gan_from=args.gan_from,
                      gan_steps=args.gan_steps, gan_warmup=args.gan_warmup)
        if args.gan_seeds:
            common["gan_students"] = _students(args.gan_seeds)
    out = Path(args.out).resolve()
    ladders = [parse_ladder(s, out, **common) for s in args.ladder]
    if args.status:
        from ardistill.ladder.status import ladder_status, status_table, wall_seconds
        print(status_table(ladder_status(ladders), wall=(args.jobs, wall_seconds(ladders, args.jobs, args.max_rung))))
        return
    if args.history_cut:
        write_history_csv(history_cut_rows(ladders), args.history_cut)
        print_history_tables(args.history_cut)
        return

    def publish(final: bool = False):
        """The table and figure from every saved rung. While jobs run a failure here is reported and
        training goes on (the rungs are saved; --report redraws); the last one raises."""
        try:
            rows = ladder_rows(ladders)
            if args.csv:
                write_csv(rows, args.csv)
            if args.figure and any(r["student"] != "teacher" for r in rows):
                plot_ladder(rows, args.figure)
        except Exception:
            if final:
                raise
            print("[ladder] writing the table or figure failed; the rungs are saved and training goes on:\n"
                  + traceback.format_exc(), file=sys.stderr, flush=True)

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
        # 2. the rungs and GAN arms, in ardistill/ladder/schedule.py's order: a run's next rung once its
        #    previous one is done, lowest rung index first; a GAN arm once its base rung is evaluated
        pending = pending_jobs(ladders, args.max_rung)
        running = {}
        while pending or running:
            for k in next_jobs(pending, set(running.values()), args.jobs - len(running)):
                j = pending[k]
                if j.kind == "rung":
                    fut = pool.submit(_job, "rung", j.cfg.to_dict(), (j.run.student, j.run.seed, str(j.run.run_dir)),
                                      j.todo[0])
                else:
                    fut = pool.submit(_job, "gan", j.cfg.to_dict(),
                                      (j.run.base.student, j.run.base.seed, str(j.run.run_dir)), j.run.total_steps)
                running[fut] = k
            if not running:
                raise SystemExit(f"nothing can run: {sorted(pending)} wait for rungs this invocation does not train "
                                 "(--max-rung?)")
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for f in done:
                k = running.pop(f)
                kind, t, run, steps, sec = f.result()
                j = pending[k]
                j.todo.pop(0)
                if not j.todo:
                    del pending[k]
                if kind == "gan":
                    print(f"[{t}] {j.run.name(j.cfg)} seed {run[1]}: {steps} steps done ({sec:.0f} s)", flush=True)
                else:
                    print(f"[{t}] {run[0]} seed {run[1]}: rung {steps} done ({sec:.0f} s)", flush=True)
                publish()
    publish(final=True)
    if args.csv:
        print_tables(read_csv(args.csv))


if __name__ == "__main__":
    sys.exit(main())
