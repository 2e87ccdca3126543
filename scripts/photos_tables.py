"""Markdown tables of the photos regime study and comparison from finished compare() reports.

  python scripts/photos_tables.py "S=4:runs/study/S4" "S=3:runs/study/S3" ...        # regime rows
  python scripts/photos_tables.py --variants runs/study/S4                           # every variant of one report

A regime row: the teacher's FD against the held-out crops, step distillation's and ARD's (mean ± std
over seeds), step distillation's excess over the teacher in units of its seed std (the issue's
">= 10 std" criterion), FD to teacher, and the paper's FD-degradation ratio (SD - T) / (ARD - T) with
its per-seed range.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path


def load(folder: str) -> dict:
    return json.loads((Path(folder) / "report" / "metrics.json").read_text())


def teacher_row(m: dict) -> dict:
    return next(r for r in m["models"] if r["name"].startswith("teacher"))


def pm(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def model_rows(m: dict, name: str) -> list[int]:
    """Indices of the report's rows of one variant ("<name>" or "<name> (mean of K seeds)")."""
    pat = re.compile(re.escape(name) + r"( \(mean of \d+ seeds\))?$")
    return [i for i, r in enumerate(m["models"]) if pat.match(r["name"])]


def variant_names(m: dict) -> list[str]:
    """The variants in the report's order (the first two are the ratio's pair: step distillation, ARD)."""
    s = m["summary"]
    names = [n for n in s if isinstance(s[n], dict) and "fd" in s[n]]
    return sorted(names, key=lambda n: (min(model_rows(m, n), default=10 ** 6), n))


def regime_row(label: str, m: dict) -> str:
    s = m["summary"]
    names = variant_names(m)
    sd, ard = names[0], (names[1] if len(names) > 1 else None)
    t = teacher_row(m)["fd"]
    excess = s[sd]["fd"]["mean"] - t
    sigma = s[sd]["fd"]["std"]
    if ard is None:
        return (f"| {label} | {t:.1f} | {pm(s[sd]['fd'])} | - | {excess / sigma if sigma else math.inf:.0f} | "
                f"{pm(s[sd]['fd_teacher'])} | - | - |")
    if min(s[sd]["fd"]["mean"], s[ard]["fd"]["mean"]) <= t:
        ratio_text = "undefined (a student's FD is below the teacher's)"
    else:
        per = s.get("fd_degradation_ratio_per_seed", [])
        spread = f" ({min(per):.2f} to {max(per):.2f})" if per else ""
        ratio_text = f"{s['fd_degradation_ratio']:.2f}{spread}"
    return (f"| {label} | {t:.1f} | {pm(s[sd]['fd'])} | {pm(s[ard]['fd'])} | {excess / sigma if sigma else math.inf:.0f} | "
            f"{pm(s[sd]['fd_teacher'])} | {pm(s[ard]['fd_teacher'])} | {ratio_text} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="*", help="label:folder (a compare() output folder with report/metrics.json)")
    p.add_argument("--variants", default=None, help="one folder: a row per variant")
    args = p.parse_args()
    if args.variants:
        m = load(args.variants)
        s = m["summary"]
        t = teacher_row(m)
        print("| model | FD | FD to teacher | precision | recall | final-step MSE free / forced |")
        print("|---|---|---|---|---|---|")
        print(f"| {t['name']} | {t['fd']:.1f} | - | {t['precision']:.3f} | {t['recall']:.3f} | - |")
        for name in variant_names(m):
            e = s[name]
            rows = [m["models"][i] for i in model_rows(m, name)]
            errs = [r["trajectory_errors"] for r in rows if r.get("trajectory_errors")]
            mse = ""
            if errs:
                free = sum(e_["free_running"][-1] for e_ in errs) / len(errs)
                forced = sum(e_["teacher_forced"][-1] for e_ in errs) / len(errs)
                mse = f"{free:.4f} / {forced:.4f}"
            print(f"| {name} | {pm(e['fd'])} | {pm(e['fd_teacher'])} | {e['precision']['mean']:.3f} | "
                  f"{e['recall']['mean']:.3f} | {mse} |")
        return
    print("| setting | teacher FD | step distillation FD | ARD FD | SD excess / SD std | SD FD to teacher | "
          "ARD FD to teacher | FD-degradation ratio (per-seed range) |")
    print("|---|---|---|---|---|---|---|---|")
    for item in args.runs:
        label, folder = item.rsplit(":", 1) if ":" in item else (item, item)
        print(regime_row(label, load(folder)))


if __name__ == "__main__":
    main()
