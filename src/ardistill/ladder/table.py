"""The ladder's table: its rows gathered from the runs, the CSV, and the degradation ratios."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ardistill.io.fileio import atomic_write_bytes, read_json
from ardistill.ladder.config import CSV_FIELDS, LADDER_STUDENTS, TEACHER_ROW, LadderConfig
from ardistill.ladder.gan import gan_arms, parse_row_name
from ardistill.ladder.runs import ladder_runs


def ladder_rows(cfgs: list[LadderConfig]) -> list[dict]:
    """Every evaluated row of the ladders (teacher rows first), sorted by teacher, student, seed, steps."""
    rows = []
    for cfg in cfgs:
        t = Path(cfg.out) / "teacher_eval.json"
        if t.is_file():
            rows.append(read_json(t, "ladder teacher evaluation"))
        for run in [*ladder_runs(cfg), *(arm.as_run(cfg) for arm in gan_arms(cfg))]:
            # exactly the rung rows (LadderRun.rung_json), not other files kept beside them
            for p in sorted((run.run_dir / "rungs").glob("step_" + "[0-9]" * 8 + ".json")):
                rows.append(read_json(p, "ladder rung"))
    rows.sort(key=row_order)
    return rows


_BASE_ORDER = {name: i for i, name in enumerate([TEACHER_ROW, *LADDER_STUDENTS])}


def row_order(r: dict) -> tuple:
    """The table's order: teacher; student as LADDER_STUDENTS lists them, S=n arms after, each one's GAN
    control and GAN factors (ascending) after its regression rows; seed; steps."""
    n = parse_row_name(r["student"])
    gan = 0 if not n.gan else 1 if n.is_control else 2
    return (r["teacher"], n.sizes, _BASE_ORDER.get(n.base, 99), n.base, gan, n.factor or 0.0, str(r["seed"]),
            int(r["steps"]))


def write_csv(rows: list[dict], path: str | Path, fields: tuple[str, ...] = CSV_FIELDS) -> Path:
    """The ladder table (``fields``: CSV_FIELDS), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    return atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def degradation_ratios(rows: list[dict], sd: str = "step distillation", ard: str = "ARD (N_h = 1)") -> list[dict]:
    """The paper's FD-degradation ratio (FD_SD - FD_teacher) / (FD_ARD - FD_teacher) at every budget.

    Per teacher and budget where both students have rows: the ratio of the seed means, and the range
    over the per-seed ratios (seeds paired by number); the same with FD to the teacher's own samples.
    """
    out = []
    teachers = sorted({r["teacher"] for r in rows})
    for t in teachers:
        trow = [r for r in rows if r["teacher"] == t and r["student"] == TEACHER_ROW]
        if not trow:
            continue
        tfd = float(trow[0]["fd"])
        steps = sorted({int(r["steps"]) for r in rows if r["teacher"] == t and r["student"] in (sd, ard)})
        for n in steps:
            a = {str(r["seed"]): r for r in rows if r["teacher"] == t and r["student"] == sd and int(r["steps"]) == n}
            b = {str(r["seed"]): r for r in rows if r["teacher"] == t and r["student"] == ard and int(r["steps"]) == n}
            if not a or not b:
                continue
            fa = np.array([float(r["fd"]) for r in a.values()])
            fb = np.array([float(r["fd"]) for r in b.values()])
            ta = np.array([float(r["fd_to_teacher"]) for r in a.values()])
            tb = np.array([float(r["fd_to_teacher"]) for r in b.values()])
            per_seed = [(float(a[s]["fd"]) - tfd) / (float(b[s]["fd"]) - tfd) for s in sorted(set(a) & set(b))
                        if float(b[s]["fd"]) > tfd]
            per_seed_t = [float(a[s]["fd_to_teacher"]) / float(b[s]["fd_to_teacher"]) for s in sorted(set(a) & set(b))]
            ex_a, ex_b = fa.mean() - tfd, fb.mean() - tfd
            out.append({"teacher": t, "steps": n, "teacher_fd": tfd, "sd_fd": fa.mean(), "sd_fd_std": _std(fa),
                        "ard_fd": fb.mean(), "ard_fd_std": _std(fb), "sd_fd_to_teacher": ta.mean(),
                        "ard_fd_to_teacher": tb.mean(), "sd_fd_to_teacher_std": _std(ta),
                        "ard_fd_to_teacher_std": _std(tb),
                        "ratio": ex_a / ex_b if ex_b > 0 else math.inf,
                        "ratio_range": (min(per_seed), max(per_seed)) if per_seed else (math.nan, math.nan),
                        "ratio_to_teacher": ta.mean() / tb.mean() if tb.mean() > 0 else math.inf,
                        "ratio_to_teacher_range": (min(per_seed_t), max(per_seed_t)) if per_seed_t else (math.nan, math.nan),
                        "seeds": len(set(a) & set(b)),
                        "sd_excess_over_std": ex_a / _std(fa) if _std(fa) > 0 else math.nan})
    return out


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


PAIRS = (("step distillation", "ARD (N_h = 1)"),
         ("step distillation, per-step heads", "ARD (N_h = 1), per-step heads"),
         ("step distillation, S=2", "ARD (N_h = 1), S=2"))


def _by_pair(rows: list[dict], per_budget) -> list[tuple[str, dict]]:
    """``per_budget(rows, sd, ard)`` of every pair of PAIRS, each dict with its ``heads`` column."""
    return [("per-step" if "per-step" in sd else "shared, S = 2" if "S=2" in sd else "shared", d)
            for sd, ard in PAIRS for d in per_budget(rows, sd, ard)]


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per teacher, pair (shared heads; per-step heads) and budget, both students' FD and FD to
    teacher (mean ± seed std), the paper's FD-degradation ratio and the FD-to-teacher ratio (per-seed ranges)."""
    lines = ["| teacher | heads | steps | teacher FD | SD FD | ARD FD | SD FD to teacher | ARD FD to teacher | "
             "FD-degradation ratio (per-seed range) | FD-to-teacher ratio (range) | seeds | SD excess / SD std |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for heads, d in _by_pair(rows, degradation_ratios):
        lines.append(
            f"| {d['teacher']} | {heads} | {d['steps']} | {d['teacher_fd']:.1f} | {d['sd_fd']:.1f} ± {d['sd_fd_std']:.1f} | "
            f"{d['ard_fd']:.1f} ± {d['ard_fd_std']:.1f} | {d['sd_fd_to_teacher']:.1f} ± {d['sd_fd_to_teacher_std']:.1f} | "
            f"{d['ard_fd_to_teacher']:.1f} ± {d['ard_fd_to_teacher_std']:.1f} | {d['ratio']:.2f} "
            f"({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f}) | {d['ratio_to_teacher']:.2f} "
            f"({d['ratio_to_teacher_range'][0]:.2f}-{d['ratio_to_teacher_range'][1]:.2f}) | {d['seeds']} | "
            f"{'-' if math.isnan(d['sd_excess_over_std']) else format(d['sd_excess_over_std'], '.0f')} |")
    return "\n".join(lines)


def gan_table(rows: list[dict], sd_control: str = "step distillation, GAN control") -> str:
    """Markdown: the GAN stage's rows (controls and factors, seed means), each with its FD change against
    its own control and its degradation ratio against step distillation's control at the same budget,
    (FD_SD control - FD_teacher) / (FD_row - FD_teacher): the paper's aim is a ratio of 5 or more."""
    lines = ["| teacher | student | steps | seeds | FD | FD to teacher | FD - its control's | "
             "FD-degradation ratio vs SD control |", "|---|---|---|---|---|---|---|---|"]
    gan_rows = [r for r in rows if parse_row_name(r["student"]).gan]
    for t in sorted({r["teacher"] for r in gan_rows}):
        trow = [r for r in rows if r["teacher"] == t and r["student"] == TEACHER_ROW]
        tfd = float(trow[0]["fd"]) if trow else math.nan
        mine = sorted((r for r in gan_rows if r["teacher"] == t), key=row_order)
        groups: dict = {}
        for r in mine:
            groups.setdefault((r["student"], int(r["steps"])), []).append(r)
        mean = {k: float(np.mean([float(r["fd"]) for r in v])) for k, v in groups.items()}
        for (name, n), rs in groups.items():
            m = parse_row_name(name)
            control = mean.get((f"{m.base}{m.sizes}, GAN control", n), math.nan)
            sd = mean.get((sd_control.replace(", GAN", f"{m.sizes}, GAN"), n), math.nan)
            fd = mean[(name, n)]
            ftt = float(np.mean([float(r["fd_to_teacher"]) for r in rs]))
            ratio = (sd - tfd) / (fd - tfd) if fd > tfd else math.inf
            delta = "-" if m.factor is None else f"{fd - control:+.1f}"
            lines.append(f"| {t} | {name} | {n} | {len(rs)} | {fd:.1f} | {ftt:.1f} | {delta} | {ratio:.2f} |")
    return "\n".join(lines)


def final_step(r: dict, key: str) -> float:
    """The last step's value of a per-step MSE column (space-separated in the CSV, a list in a rung json)."""
    v = r[key]
    return float((v.split() if isinstance(v, str) else v)[-1])


def error_accumulation(rows: list[dict], sd: str = "step distillation", ard: str = "ARD (N_h = 1)") -> list[dict]:
    """Where each student's final-step error comes from, per teacher and budget (seed means).

    ``forced``: the final step's MSE to the teacher when every input is the teacher's state (what training
    minimises); ``free``: the same when the student samples from its own states (what it is used for);
    ``accumulation`` = free / forced, the error the student's own earlier steps add (exposure bias, which
    ARD's history is meant to reduce); ``generalisation`` = free-running MSE on held-out trajectories over
    the same on training ones (1 = no overfitting)."""
    out = []
    for t in sorted({r["teacher"] for r in rows}):
        steps = sorted({int(r["steps"]) for r in rows if r["teacher"] == t and r["student"] in (sd, ard)})
        for n in steps:
            d = {"teacher": t, "steps": n}
            for key, name in (("sd", sd), ("ard", ard)):
                mine = [r for r in rows if r["teacher"] == t and r["student"] == name and int(r["steps"]) == n]
                if not mine:
                    break
                forced = np.array([final_step(r, "mse_forced") for r in mine])
                free = np.array([final_step(r, "mse_free") for r in mine])
                train = np.array([final_step(r, "mse_free_train") for r in mine])
                d.update({f"{key}_forced": forced.mean(), f"{key}_free": free.mean(),
                          f"{key}_accumulation": float(np.mean(free / forced)),
                          f"{key}_generalisation": float(np.mean(free / train)), f"{key}_seeds": len(mine)})
            else:
                out.append(d)
    return out


def error_table(rows: list[dict]) -> str:
    """Markdown: per teacher, pair and budget, the final step's teacher-forced and free-running MSE of both
    students, their ratio (the error added by sampling from the student's own states) and the held-out over
    training free-running MSE (overfitting)."""
    lines = ["| teacher | heads | steps | SD forced | ARD forced | SD free | ARD free | SD free / forced | "
             "ARD free / forced | SD held-out / train | ARD held-out / train |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for heads, d in _by_pair(rows, error_accumulation):
        lines.append(f"| {d['teacher']} | {heads} | {d['steps']} | {d['sd_forced']:.5f} | {d['ard_forced']:.5f} | "
                     f"{d['sd_free']:.5f} | {d['ard_free']:.5f} | {d['sd_accumulation']:.2f} | "
                     f"{d['ard_accumulation']:.2f} | {d['sd_generalisation']:.2f} | {d['ard_generalisation']:.2f} |")
    return "\n".join(lines)


def convergence(rows: list[dict]) -> list[dict]:
    """How fast each regression student still approaches its teacher, rung by rung (seed means).

    Per teacher, student (GAN arms excluded) and budget: FD to the teacher's own samples and the FD excess
    over the teacher (FD - teacher FD), each with its local log-log slope from the previous rung,
    ``log(y_n / y_prev) / log(n / prev)``: a power law y ~ n^slope between the two budgets. A plateau shows
    as a slope near 0; nan where there is no previous rung or a value is not positive."""
    out = []
    for t in sorted({r["teacher"] for r in rows}):
        trow = [r for r in rows if r["teacher"] == t and r["student"] == TEACHER_ROW]
        tfd = float(trow[0]["fd"]) if trow else math.nan
        mine = [r for r in rows if r["teacher"] == t and r["student"] != TEACHER_ROW
                and not parse_row_name(r["student"]).gan]
        for name in sorted({r["student"] for r in mine}, key=lambda s: row_order({"teacher": t, "student": s,
                                                                                    "seed": "", "steps": 0})):
            prev = None
            for n in sorted({int(r["steps"]) for r in mine if r["student"] == name}):
                rs = [r for r in mine if r["student"] == name and int(r["steps"]) == n]
                d = {"teacher": t, "student": name, "steps": n, "seeds": len(rs),
                     "fd_to_teacher": float(np.mean([float(r["fd_to_teacher"]) for r in rs])),
                     "excess": float(np.mean([float(r["fd"]) for r in rs])) - tfd}
                for key in ("fd_to_teacher", "excess"):
                    ok = prev is not None and d[key] > 0 and prev[key] > 0
                    d[f"{key}_slope"] = (math.log(d[key] / prev[key]) / math.log(n / prev["steps"]) if ok
                                         else math.nan)
                out.append(d)
                prev = d
    return out


def convergence_table(rows: list[dict]) -> str:
    """Markdown of ``convergence``: per teacher, student and budget, FD to teacher and FD excess over the
    teacher (seed means), each with its log-log slope from the previous rung (0 = a plateau)."""
    lines = ["| teacher | student | steps | seeds | FD to teacher | slope | FD - teacher FD | slope |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if math.isnan(v) else f"{v:+.2f}"  # noqa: E731
    for d in convergence(rows):
        lines.append(f"| {d['teacher']} | {d['student']} | {d['steps']} | {d['seeds']} | {d['fd_to_teacher']:.2f} | "
                     f"{f(d['fd_to_teacher_slope'])} | {d['excess']:.1f} | {f(d['excess_slope'])} |")
    return "\n".join(lines)
