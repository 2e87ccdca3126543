"""What a comparison writes in ``out/report``: report.md, metrics.json and the grids, for both tasks.

Class-conditional (``write_class_report``): one row per model (FD, FD to the teacher, IS, precision /
recall, latency, FLOPs) through evaluation/report.py, the mean and spread over training seeds, the
FD-degradation ratio, the history-cut ablation. Text-to-image (``write_t2i_report``): prompt adherence
and pair metrics on seen and held-out caption sets, per-step errors, swapped digits, a captioned grid.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from ardistill.io.fileio import atomic_write_bytes, atomic_write_json


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


# ------------------------------------------------------------------------------- class-conditional

def summarize(rows: list[dict], names: list[str], teacher_fd: float) -> dict:
    """Mean and standard deviation over training seeds, and the FD-degradation ratio."""
    from ardistill.evaluation.evaluate import fd_degradation_ratio
    out = {}
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        entry = {"seeds": [r["seed"] for r in rs]}
        for key in ("fd", "fd_teacher", "inception_score", "precision", "recall"):
            vals = np.array([r.get(key, float("nan")) for r in rs], dtype=np.float64)
            entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        out[name] = entry
    if len(names) >= 2:
        sd, ard = names[0], names[1]
        out["fd_degradation_ratio"] = fd_degradation_ratio(teacher_fd, out[sd]["fd"]["mean"], out[ard]["fd"]["mean"])
        per_seed = []
        for s in {r["seed"] for r in rows}:
            a = [r for r in rows if r["seed"] == s and r["variant"] == sd]
            b = [r for r in rows if r["seed"] == s and r["variant"] == ard]
            if a and b:
                per_seed.append(fd_degradation_ratio(teacher_fd, a[0]["fd"], b[0]["fd"]))
        out["fd_degradation_ratio_per_seed"] = sorted(per_seed)
        # the same ratio with the distance to the teacher's own samples (same noise) as the degradation:
        # defined even when the students are as close to the real data as the teacher is
        a, b = out[sd]["fd_teacher"]["mean"], out[ard]["fd_teacher"]["mean"]
        out["fd_teacher_ratio"] = a / b if b > 0 else float("nan")
    return out


def history_section(rows: list[dict]) -> str:
    """Markdown table of the history-cut ablation, averaged over seeds, for every history student."""
    lines = ["History use at sampling: the same weights sampled with the history and with it cut (every block "
             "sees only itself); final-sample MSE to the teacher's sample, and FD to the teacher's samples "
             "(mean over seeds):", "",
             "| model | MSE with history | MSE history cut | MSE with vs cut | FD to teacher with / cut |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows if "history_cut" in r):
        rs = [r for r in rows if r["variant"] == name and "history_cut" in r]
        mean = lambda k: float(np.mean([r["history_cut"][k] for r in rs]))
        lines.append(f"| {name} | {mean('mse_to_teacher'):.4f} | {mean('mse_to_teacher_history_cut'):.4f} | "
                     f"{mean('mse_with_vs_cut'):.4f} | {np.mean([r['fd_teacher'] for r in rs]):.2f} / "
                     f"{mean('fd_teacher'):.2f} |")
    return "\n".join(lines) + "\n"


def class_notes(cfg, summary: dict, names: list[str]) -> list[str]:
    """The report's notes: settings, what the metrics are against, the ratios, the spread over seeds."""
    notes = [f"teacher {cfg.solver.upper()}-{cfg.teacher_steps}, guidance {cfg.cfg_scale}; students S = {cfg.num_steps} "
             f"on the '{cfg.grid}' grid, {cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.lr}, seeds {list(cfg.seeds)}; "
             f"{cfg.train_count} training / {cfg.eval_count} evaluation trajectories",
             "FD, precision/recall (k = 3) are on the "
             + (f"classifier {cfg.classifier}" if cfg.benchmark == "folder" else f"shipped {cfg.benchmark} classifier")
             + f"'s features against {cfg.bench.description}; IS uses its logits. Every model starts from the same noise "
             "and labels.",
             "latency: median wall time per image of one batch of "
             f"{cfg.latency_batch} on this machine ({summary['machine']})."]
    if "fd_degradation_ratio" in summary:
        r = summary["fd_degradation_ratio"]
        notes.append(f"FD degradation ratio (({names[0]} - teacher) / ({names[1]} - teacher)): "
                     + (f"{r:.2f}" if math.isfinite(r) and r >= 0 else
                        "undefined here: a student's FD is not above the teacher's (no degradation to compare)") + (f"; per seed {', '.join(f'{x:.2f}' if math.isfinite(x) and x >= 0 else 'undefined' for x in summary['fd_degradation_ratio_per_seed'])}"
                                   if len(cfg.seeds) > 1 else "") + " (paper, ImageNet-256: 5.1)")
        notes.append(f"FD to teacher: FD against the teacher's own samples from the same noise and labels, the "
                     f"students' degradation measured directly; its ratio {names[0]} / {names[1]} = "
                     f"{summary['fd_teacher_ratio']:.2f} (> 1: ARD stays closer to its teacher)")
    if len(cfg.seeds) > 1:
        for n in names:
            e, t = summary[n]["fd"], summary[n]["fd_teacher"]
            notes.append(f"{n}: FD {e['mean']:.2f} ± {e['std']:.2f}, FD to teacher {t['mean']:.2f} ± {t['std']:.2f} "
                         f"(std over {len(cfg.seeds)} training seeds)")
    return notes


def write_class_report(report_dir: Path, cfg, title: str, names: list[str], rows: list[dict], results: list,
                       grids: dict, teacher_fd: float, recording: dict, clock, extra_notes: list[str] = ()) -> Path:
    """report.md, metrics.json (models, and the summary over seeds) and the figures; returns report.md.
    ``extra_notes`` follow the notes of ``class_notes``."""
    from ardistill.evaluation.report import write_report

    summary = summarize(rows, names, teacher_fd)
    summary.update({"per_seed": rows, "wall_seconds": clock.total(), "recording": recording, "machine": machine()})
    notes = class_notes(cfg, summary, names) + list(extra_notes)
    sections = [history_section(rows)] if any("history_cut" in r for r in rows) else []
    path = write_report(report_dir, results, title, summary=summary, notes=notes, grids=grids,
                        feature_name=f"{cfg.bench.name} classifier", sections=sections)
    print(f"report: {path}  ({summary['wall_seconds']['total']:.0f} s in all)")
    return path


# ------------------------------------------------------------------------------- text-to-image

def mean_sets(sets_list: list[dict]) -> dict:
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


def t2i_report_markdown(rows: list[dict], cfg, wall: dict, machine: str, captions: list[str]) -> str:
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


def write_t2i_report(report_dir: Path, cfg, rows: list[dict], per_seed: list[dict], grids: dict,
                     captions: list[str], clock, teacher_path: Path) -> Path:
    """report.md, metrics.json (rows, per-seed rows, the config) and the captioned grid; returns report.md."""
    from ardistill.io.images import save_captioned_grid

    wall = clock.total()
    report_dir.mkdir(parents=True, exist_ok=True)
    save_captioned_grid(grids, captions, report_dir / "grid.png")
    summary = {"rows": rows, "per_seed": per_seed, "wall_seconds": wall, "machine": machine(),
               "config": cfg.to_dict(), "teacher": str(teacher_path)}
    atomic_write_json(report_dir / "metrics.json", json.loads(json.dumps(summary, default=float)))
    md = t2i_report_markdown(rows, cfg, wall, summary["machine"], captions)
    atomic_write_bytes(report_dir / "report.md", md.encode())
    print(f"report: {report_dir / 'report.md'}  ({wall['total']:.0f} s in all)")
    return report_dir / "report.md"
