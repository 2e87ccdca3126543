"""Command-line glue of the presets: the preset supplies every value the command line does not set.

``ardistill record --preset`` and ``ardistill distill --preset`` (presets.py resolves and validates the preset
itself; this module only decides which command-line values override it).
"""

from __future__ import annotations

from dataclasses import fields

from ardistill.presets import PATH_KEYS, STUDENT_KEYS, load_preset


def changed_fields(values: dict, defaults: dict) -> dict:
    """The entries of ``values`` that differ from ``defaults``: what a user set on the command line."""
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def _section_overrides(section: str, given: dict, keys) -> dict:
    return {f"{section}.{k}": v for k, v in given.items() if k in keys}


def record_from_cli(preset: str | None, given: dict, defaults: dict) -> tuple[dict, dict]:
    """RecordConfig fields for ``ardistill record``, and the resolved description to print for --dry-run.

    ``given`` are the fields as parsed, ``defaults`` the parser's defaults: a field that differs
    from its default was set on the command line and overrides the preset.
    """
    from ardistill.data.record import RecordConfig
    if preset is None:
        cfg = RecordConfig(**given)
        return given, {"record": {f.name: getattr(cfg, f.name) for f in fields(cfg)}}
    changed = changed_fields(given, defaults)
    if changed.get("count") is None:
        changed.pop("count", None)
    over = _section_overrides("record", changed, given)
    if {"num_steps", "teacher_steps", "grid"} & set(changed) and "positions" not in changed:
        over["record.positions"] = None  # the preset's explicit grid belonged to its own S and T
    if "positions" in changed and "grid" not in changed:
        over["record.grid"] = None  # explicit positions replace the preset's grid rule
    if "solver" in changed and "heun_last_step" not in changed:
        over["record.heun_last_step"] = None  # the preset's Heun choice belonged to its solver
    if "num_steps" in changed:
        over["student.num_steps"] = changed["num_steps"]
    p = load_preset(preset, overrides=over)
    shown = p.to_dict()
    return shown["record"], shown


def distill_from_cli(preset: str | None, given: dict, world_size: int | None = None) -> tuple[dict, dict]:
    """DistillConfig fields for ``ardistill distill`` (``given``: only the options set on the command line).

    Returns (options, resolved description for --dry-run). Paths stay as given.
    """
    if preset is None:
        from ardistill.training.distill import DistillConfig
        missing = {k: f"<{k}>" for k in ("recording", "teacher", "run_dir") if k not in given}
        cfg = DistillConfig(**{**given, **missing})
        return given, {"distill": cfg.to_dict()}
    over = _section_overrides("student", given, STUDENT_KEYS)
    over.update(_section_overrides("distill", given, [k for k in given if k not in STUDENT_KEYS + PATH_KEYS]))
    if "grad_accum" in given:  # an explicit accumulation decides the micro-batch
        over["distill.micro_batch"] = None
    p = load_preset(preset, world_size=world_size, overrides=over)
    options = {**p.distill_fields(), **{k: v for k, v in given.items() if k in PATH_KEYS}}
    shown = p.to_dict()
    shown["paths"] = {k: given.get(k) for k in PATH_KEYS}
    return options, shown
