"""Where a ladder stands: each run's evaluated rungs, its latest checkpoint, its speed and its time to go.

Reads only (the runs' ``rungs/``, ``checkpoints/latest.json`` and ``log.jsonl``), so it can be asked
while the ladder runs; ``scripts/photos_ladder.py --status`` prints it. A job's speed is the median of
its last logged windows, so on a machine shared with other jobs the times to go are the shared machine's.
``wall_seconds`` replays the scheduler's order (``schedule.simulate``) with those speeds: the wall time
of the whole ladder at a given number of parallel jobs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ardistill.io.fileio import read_json
from ardistill.ladder.config import LadderConfig
from ardistill.ladder.gan import gan_arms
from ardistill.ladder.runs import ladder_runs
from ardistill.ladder.schedule import pending_jobs, simulate


def checkpoint_step(run_dir: Path) -> int:
    """The step of a run's latest checkpoint (0 when it has none)."""
    pointer = run_dir / "checkpoints" / "latest.json"
    return int(read_json(pointer, "checkpoint pointer")["step"]) if pointer.is_file() else 0


def recent_speed(run_dir: Path, windows: int = 10) -> float:
    """Samples per second of the run: the median of its last ``windows`` logged windows (nan before its
    first log line)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return math.nan
    lines = path.read_text().splitlines()[-windows:]
    return float(np.median([json.loads(x)["samples_per_s"] for x in lines])) if lines else math.nan


def _typical_speed(cfg: LadderConfig) -> float:
    """The median recent speed (samples/s) of a ladder's regression runs (nan when none has logged)."""
    known = [v for v in (recent_speed(r.run_dir) for r in ladder_runs(cfg)) if not math.isnan(v)]
    return float(np.median(known)) if known else math.nan


def wall_seconds(cfgs: list[LadderConfig], jobs: int, max_rung: int | None = None) -> float:
    """Seconds until the ladders are done with ``jobs`` jobs at a time, in the scheduler's order, each job
    at its recent speed (a job that has not logged: its ladder's median, as ``ladder_status``); nan when
    a job has no speed at all. Times are the machine's as it was while the speeds were logged."""
    pending = pending_jobs(cfgs, max_rung)
    typical = {cfg.out: _typical_speed(cfg) for cfg in cfgs}
    step, per_step = {}, {}
    for k, j in pending.items():
        offset = j.run.start if j.kind == "gan" else 0
        step[k] = offset + checkpoint_step(j.run.run_dir)
        speed = recent_speed(j.run.run_dir)
        per_step[k] = j.cfg.batch_size / (typical[j.cfg.out] if math.isnan(speed) else speed)
    return simulate(pending, jobs, step, per_step)


def ladder_status(cfgs: list[LadderConfig]) -> list[dict]:
    """One dict per run and GAN arm: rungs evaluated, checkpoint step, next rung, steps and seconds to go
    (to the next rung and to the job's last), at the job's recent speed. A job that has not logged yet is
    estimated at the median speed of its ladder's regression runs (``estimated``; a GAN step costs 1.3-1.4x
    a regression step, docs/benchmarks.md, so its estimate is low)."""
    out = []
    for cfg in cfgs:
        runs = ladder_runs(cfg)
        jobs = [(cfg.row_name(r.student), r.seed, r.run_dir, 0, list(cfg.rungs), r.rung_json) for r in runs]
        jobs += [(a.name(cfg), a.base.seed, a.run_dir, a.start, [a.total_steps], a.as_run(cfg).rung_json)
                 for a in gan_arms(cfg)]
        typical = _typical_speed(cfg)
        for name, seed, run_dir, offset, rungs, rung_json in jobs:
            done = [n for n in rungs if rung_json(n).is_file()]
            todo = [n for n in rungs if n not in done]
            # a GAN arm's checkpoints count its own steps; its rung is at base rung + those
            step = offset + checkpoint_step(run_dir) if todo else rungs[-1]
            speed = recent_speed(run_dir)
            estimated = math.isnan(speed) and bool(todo)
            per_step = cfg.batch_size / (typical if estimated else speed) if todo else math.nan
            to_next, to_end = (todo[0] - step, rungs[-1] - step) if todo else (0, 0)
            out.append({"ladder": cfg.teacher_name, "student": name, "seed": seed, "rungs_done": done, "step": step,
                        "next_rung": todo[0] if todo else None, "steps_to_next": to_next, "steps_to_end": to_end,
                        "s_per_step": per_step, "estimated": estimated,
                        "seconds_to_next": to_next * per_step if todo else 0.0,
                        "seconds_to_end": to_end * per_step if todo else 0.0})
    return out


def status_table(status: list[dict], wall: tuple[int, float] | None = None) -> str:
    """Markdown of ``ladder_status`` (``~``: estimated from the ladder's other runs), and the job-hours to go;
    ``wall`` = (jobs, ``wall_seconds``) adds the wall time at that many parallel jobs."""
    h = lambda s: "-" if math.isnan(s) else f"{s / 3600:.1f}"
    lines = ["| ladder | student | seed | rungs done | checkpoint step | next rung | s/step | "
             "hours to next rung | hours to last rung |", "|---|---|---|---|---|---|---|---|---|"]
    for d in status:
        done = ",".join(str(n) for n in d["rungs_done"]) or "-"
        nxt = "done" if d["next_rung"] is None else str(d["next_rung"])
        rate = "-" if math.isnan(d["s_per_step"]) else ("~" if d["estimated"] else "") + f"{d['s_per_step']:.2f}"
        lines.append(f"| {d['ladder']} | {d['student']} | {d['seed']} | {done} | {d['step']} | {nxt} | {rate} | "
                     f"{h(d['seconds_to_next'])} | {h(d['seconds_to_end'])} |")
    left = [d["seconds_to_end"] for d in status]
    lines.append(f"\nTo go: {sum(x for x in left if not math.isnan(x)) / 3600:.1f} job-hours at the jobs' recent "
                 f"speeds ({sum(math.isnan(x) for x in left)} jobs without an estimate).")
    if wall is not None:
        lines.append(f"Wall time at {wall[0]} parallel job{'s' if wall[0] != 1 else ''}, in the scheduler's order: "
                     f"{h(wall[1])} hours.")
    return "\n".join(lines)
