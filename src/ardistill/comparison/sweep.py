"""``ardistill sweep``: the paper's ablations, one class-conditional comparison per axis, merged in one table.

Axes with the same S share one recording, and students are kept by their training key in one folder, so
a variant that appears on several axes (the baseline) is trained once. The teacher is loaded once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ardistill.comparison.classes import compare
from ardistill.comparison.config import CompareConfig
from ardistill.comparison.variants import demo_variants
from ardistill.io.fileio import atomic_write_bytes, atomic_write_json

SWEEP_AXES = ("history_layers", "mask", "target", "heads", "on_policy", "num_steps")


def sweep_variants(axis: str, depth: int, steps: int = 400) -> dict[str, dict]:
    """The paper's ablations (plus on-policy history) as variants of one comparison; first = baseline.

    On-policy history is tried from the first step (p = 0.5) and warm-started: teacher forcing for the
    first half of the ``steps``, then p = 0.5 (a rollout from an untrained student is noise).
    """
    from ardistill.training.distill import default_history_layers
    nh = default_history_layers(depth)
    if axis == "history_layers":
        return {f"N_h={n}": {"history_layers": n} for n in sorted({0, 1, nh, max(nh, depth // 2), depth})}
    if axis == "mask":
        return {f"mask {m}": {"history_layers": nh, "mask": m} for m in ("M1", "M2", "M3", "M4")}
    if axis == "target":
        return {f"{name} target={t}": {"history_layers": n, "target": t}
                for t in ("state", "x0") for name, n in (("SD", 0), ("ARD", nh))}
    if axis == "heads":
        return {f"{name} heads={h}": {"history_layers": n, "heads": h}
                for h in ("shared", "per_step") for name, n in (("SD", 0), ("ARD", nh))}
    if axis == "on_policy":
        policies = {"teacher forcing": {"on_policy_prob": 0.0},
                    "on-policy p=0.5": {"on_policy_prob": 0.5},
                    f"on-policy p=0.5 from step {steps // 2}": {"on_policy_prob": 0.5, "on_policy_start": steps // 2}}
        return {f"{name} {label}": {"history_layers": n, **ov}
                for label, ov in policies.items() for name, n in (("SD", 0), ("ARD", nh))}
    raise ValueError(f"unknown sweep axis {axis!r}; choose from {SWEEP_AXES}")


def sweep(cfg: CompareConfig, axes: tuple[str, ...] = SWEEP_AXES) -> Path:
    """One comparison per axis (per S for ``num_steps``); all rows merged into sweep.md / sweep.json."""
    from ardistill.io.checkpoints import load_any_teacher

    teacher = load_any_teacher(cfg.teacher_path)
    depth = teacher.cfg.depth
    root = Path(cfg.out)
    shared_rec = root / "recordings"
    if cfg.student_cache is None:
        cfg = replace(cfg, student_cache=str(root / "students"))
    table = []
    for axis in axes:
        if axis not in SWEEP_AXES:
            raise ValueError(f"unknown sweep axis {axis!r}; choose from {SWEEP_AXES}")
        runs = []
        if axis == "num_steps":
            for S in (2, 3, 4, 5):
                runs.append((f"S={S}", replace(cfg, out=str(root / f"steps-{S}"), num_steps=S),
                             demo_variants(depth)))
        else:
            runs.append(("", replace(cfg, out=str(root / axis)), sweep_variants(axis, depth, cfg.steps)))
        for prefix, c, variants in runs:
            _link_recordings(shared_rec if c.num_steps == cfg.num_steps else None, Path(c.out))
            report = compare(c, variants, title=f"Sweep: {axis} {prefix}".strip(), teacher=teacher)
            m = json.loads((report.parent / "metrics.json").read_text())
            teacher_fd = m["models"][1]["fd"]
            for name in variants:
                s = m["summary"][name]
                table.append({"axis": axis, "variant": f"{prefix} {name}".strip(), "fd": s["fd"]["mean"],
                              "fd_std": s["fd"]["std"], "fd_teacher": s["fd_teacher"]["mean"],
                              "fd_teacher_std": s["fd_teacher"]["std"], "precision": s["precision"]["mean"],
                              "recall": s["recall"]["mean"], "teacher_fd": teacher_fd,
                              "final_step_mse": next(r["trajectory_errors"]["free_running"][-1] for r in m["models"]
                                                     if r["name"].startswith(name))})
    atomic_write_json(root / "sweep.json", {"rows": table, "config": cfg.to_dict(), "axes": list(axes)})
    atomic_write_bytes(root / "sweep.md", sweep_markdown(cfg, table).encode())
    print(f"sweep table: {root / 'sweep.md'}")
    return root / "sweep.md"


def sweep_markdown(cfg: CompareConfig, table: list[dict]) -> str:
    """sweep.md: one row per variant of every axis."""
    def pm(mean, std):  # mean ± std over seeds; one seed has no spread to show
        return f"{mean:.2f} ± {std:.2f}" if len(cfg.seeds) > 1 else f"{mean:.2f}"

    lines = [f"# Ablation sweep on the embedded {cfg.benchmark}", "",
             f"Each axis is one comparison (same recording, {cfg.steps} steps x batch {cfg.batch_size}, "
             f"seeds {list(cfg.seeds)}); FD on the {cfg.benchmark} classifier's features vs held-out {cfg.benchmark}; FD to teacher "
             "vs the teacher's own samples from the same noise; final-step MSE to the teacher's end point, "
             "free-running. Mean ± std over seeds when there are several.", "",
             "| axis | variant | FD | FD to teacher | precision | recall | final-step MSE | teacher FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['axis']} | {r['variant']} | {pm(r['fd'], r['fd_std'])} | "
                     f"{pm(r['fd_teacher'], r['fd_teacher_std'])} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['final_step_mse']:.4f} | {r['teacher_fd']:.2f} |")
    return "\n".join(lines) + "\n"


def _link_recordings(shared: Path | None, out: Path) -> None:
    """Axes with the same S share one recording: point out/recordings at the shared folder."""
    if shared is None:
        return
    target = out / "recordings"
    shared.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(shared.resolve(), target_is_directory=True)
