"""The students a comparison trains: report name -> DistillConfig overrides, all with the same budget.

Step distillation and ARD are the same student except for ``history_layers`` (0 = no history). An
override ``num_steps`` (text demo) picks the recording of that S; a name's ``slug`` names its run folder.
"""

from __future__ import annotations

import re


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _history_layers(depth: int, history_layers: int | None) -> int:
    from ardistill.training.distill import default_history_layers
    return default_history_layers(depth) if history_layers is None else history_layers


def demo_variants(depth: int, history_layers: int | None = None) -> dict[str, dict]:
    """Step distillation and ARD: identical except for history_layers."""
    nh = _history_layers(depth, history_layers)
    return {"step distillation": {"history_layers": 0}, f"ARD (N_h={nh})": {"history_layers": nh}}


def comparison_variants(depth: int, steps: int, history_layers: int | None = None) -> dict[str, dict]:
    """The paper's comparison as one report (issue 12): step distillation and ARD first (the pair whose
    FD-degradation ratio is reported), then ARD's N_h sweep, per-step heads (for ARD and, to separate the
    heads' effect from the history's, for step distillation), the public code's student
    (x0 targets, k/S time labels, per-step heads) beside a step-distillation student with the same
    settings, and warm-started on-policy history (teacher forcing for the first half of ``steps``), with
    the recorded targets and, beyond the paper, with targets relabelled by the teacher (DAgger-style).
    Every variant has the same training budget; ``compare(..., gan=True, gan_variant=<ARD>)`` adds
    ARD (R+G) and its regression-only control."""
    nh = _history_layers(depth, history_layers)
    public = {"target": "x0", "time_labels": "uniform", "heads": "per_step", "mask": "M4"}
    out = demo_variants(depth, nh)
    for n in sorted({min(2 * nh, depth), depth} - {nh}):
        out[f"ARD (N_h={n})"] = {"history_layers": n}
    out[f"ARD (N_h={nh}), per-step heads"] = {"history_layers": nh, "heads": "per_step"}
    out["step distillation, per-step heads"] = {"history_layers": 0, "heads": "per_step"}
    out["step distillation, public code's settings"] = {"history_layers": 0, **public}
    out[f"ARD (N_h={nh}), public code's settings"] = {"history_layers": nh, **public}
    out[f"ARD (N_h={nh}), on-policy p=0.5 from step {steps // 2}"] = {
        "history_layers": nh, "on_policy_prob": 0.5, "on_policy_start": steps // 2}
    out[f"ARD (N_h={nh}), on-policy p=0.5 from step {steps // 2}, teacher-relabelled"] = {
        "history_layers": nh, "on_policy_prob": 0.5, "on_policy_start": steps // 2, "on_policy_targets": "teacher"}
    return out


def t2i_variants(depth: int, all_steps: tuple[int, ...], history_layers: int | None = None,
                 extra_step_distillation: bool = True) -> dict[str, dict]:
    """Step distillation and ARD (identical but for history_layers) for the first S; ARD (and, if asked,
    step distillation) for every other S, whose names end in ", S=<S>"."""
    nh = _history_layers(depth, history_layers)
    out = {}
    for i, S in enumerate(all_steps):
        suffix = "" if i == 0 else f", S={S}"
        if i == 0 or extra_step_distillation:
            out[f"step distillation{suffix}"] = {"history_layers": 0, "num_steps": S}
        out[f"ARD (N_h={nh}){suffix}"] = {"history_layers": nh, "num_steps": S}
    return out
