"""The ladder's job order: which rung or GAN arm runs next, and how long the whole ladder takes.

``scripts/photos_ladder.py`` runs the jobs in this order, and ``status`` replays the same order with each
job's measured speed to estimate the ladder's wall time at a given number of parallel jobs.

A *job* is one run's remaining rungs (trained one rung at a time: after each rung the run goes back in
the queue) or one GAN arm. Order: lowest rung index first, then the fewer steps (so the cheaper ladder's
rung of the same index comes first), then the key; a GAN arm becomes ready once its base rung is
evaluated and sorts after the other ladders' rungs of that index.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable

from ardistill.ladder.config import LadderConfig
from ardistill.ladder.gan import GANArm, gan_arms
from ardistill.ladder.runs import LadderRun, ladder_runs


@dataclass
class Job:
    kind: str  # "rung" (a regression run's remaining rungs) or "gan" (one GAN arm)
    cfg: LadderConfig
    run: LadderRun | GANArm
    todo: list[int]  # rung: the rungs (steps) still to evaluate; gan: [the arm's total steps]


def pending_jobs(cfgs: list[LadderConfig], max_rung: int | None = None) -> dict[tuple, Job]:
    """Every job with something left to do, keyed ``("rung", ladder index, student, seed)`` or
    ``("gan", ladder index, arm folder name)``; ``max_rung`` leaves out rungs (and GAN arms starting
    from rungs) above it."""
    pending: dict[tuple, Job] = {}
    for li, c in enumerate(cfgs):
        for r in ladder_runs(c):
            rungs = [n for n in c.rungs if max_rung is None or n <= max_rung]
            todo = [n for n in rungs if not r.rung_json(n).is_file()]
            if todo:
                pending[("rung", li, r.student, r.seed)] = Job("rung", c, r, todo)
        for arm in gan_arms(c):
            if (max_rung is None or arm.start <= max_rung) and not arm.as_run(c).rung_json(arm.total_steps).is_file():
                pending[("gan", li, arm.run_dir.name)] = Job("gan", c, arm, [arm.total_steps])
    return pending


def job_order(key: tuple, job: Job) -> tuple:
    rungs = job.cfg.rungs
    if job.kind == "rung":
        return (rungs.index(job.todo[0]), job.todo[0], key)
    return (rungs.index(job.run.start) + 0.5, job.run.start, key)


def rung_evaluated(run: LadderRun, steps: int) -> bool:
    return run.rung_json(steps).is_file()


def next_jobs(pending: dict[tuple, Job], running: set, free: int,
              evaluated: Callable[[LadderRun, int], bool] = rung_evaluated) -> list[tuple]:
    """The keys of the (at most ``free``) jobs to start now: those not running and ready (a GAN arm once
    ``evaluated(base run, base rung)``), in ``job_order``."""
    def ready(k):
        j = pending[k]
        return j.kind == "rung" or evaluated(j.run.base, j.run.start)
    idle = sorted((k for k in pending if k not in running and ready(k)), key=lambda k: job_order(k, pending[k]))
    return idle[:max(free, 0)]


def simulate(pending: dict[tuple, Job], jobs: int, step: dict[tuple, int], seconds_per_step: dict[tuple, float],
             evaluated: Callable[[LadderRun, int], bool] = rung_evaluated) -> float:
    """Seconds until every pending job is done when ``jobs`` of them run at a time in the scheduler's order.

    ``step[k]``: where job k stands now (a rung job's checkpoint step; a GAN arm's base rung plus its own
    checkpoint step); ``seconds_per_step[k]``: its speed. A rung job takes one rung at a time and then
    queues again; a GAN arm becomes ready when its base rung is evaluated, on disk or in the replay.
    Raises ValueError when something pending can never start (a GAN arm whose base rung is neither
    evaluated nor pending)."""
    pending = {k: Job(j.kind, j.cfg, j.run, list(j.todo)) for k, j in pending.items()}
    at = dict(step)
    done_in_replay: set = set()

    def evaluated_now(run: LadderRun, steps: int) -> bool:
        return (run.run_dir, steps) in done_in_replay or evaluated(run, steps)

    now, events, running, order = 0.0, [], set(), itertools.count()
    while pending:
        for k in next_jobs(pending, running, jobs - len(running), evaluated_now):
            j = pending[k]
            seconds = max(j.todo[0] - at[k], 0) * seconds_per_step[k]
            heapq.heappush(events, (now + seconds, next(order), k))
            running.add(k)
        if not running:
            raise ValueError(f"nothing can run: {sorted(pending)} wait for rungs that are neither evaluated nor "
                             "pending (--max-rung?)")
        now, _, k = heapq.heappop(events)
        running.discard(k)
        j = pending[k]
        at[k] = j.todo.pop(0)
        if j.kind == "rung":
            done_in_replay.add((j.run.run_dir, at[k]))
        if not j.todo:
            del pending[k]
    return now
