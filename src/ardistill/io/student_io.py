"""Student weight files: ardistill's safetensors format (checkpoints.save_model), kind "ard-student"
(or "ard-text-student" for the student of a text teacher, models/text_student.py).

The StudentConfig is JSON in the file's metadata, so ``load_student(path)`` rebuilds the student from
the file alone (no teacher, no recording). A path may also be a training run folder or one of its
checkpoint folders; the EMA weights are preferred there, since they are what the paper evaluates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ardistill.io.checkpoints import CheckpointError, check_state_dict, load_state_and_config, save_model
from ardistill.io.fileio import read_json
from ardistill.models.student import ARDStudent, StudentConfig
from ardistill.models.text_student import TextARDStudent, TextStudentConfig

STUDENT_KIND = "ard-student"
TEXT_STUDENT_KIND = "ard-text-student"
_KINDS = {STUDENT_KIND: (StudentConfig, ARDStudent), TEXT_STUDENT_KIND: (TextStudentConfig, TextARDStudent)}


def save_student(path: str | Path, student: ARDStudent, extra_metadata: dict | None = None) -> Path:
    """Write the student's weights with its config atomically; ``extra_metadata`` e.g. {"step": 100}."""
    student = getattr(student, "module", student)  # DDP-wrapped models carry the student in .module
    kind = TEXT_STUDENT_KIND if isinstance(student, TextARDStudent) else STUDENT_KIND
    return save_model(student, student.cfg.to_dict(), path, kind=kind, extra_metadata=extra_metadata)


def read_student_file(path: str | Path) -> tuple[StudentConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, state dict, metadata) of a student weight file; errors name the file."""
    state, config, meta = load_state_and_config(path)
    if meta.get("kind") not in _KINDS:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not an ARD student "
                              f"({' or '.join(map(repr, _KINDS))})")
    try:
        cfg = _KINDS[meta["kind"]][0].from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid student config: {e}") from e
    return cfg, state, meta


def resolve_student_path(path: str | Path, prefer: str = "ema") -> Path:
    """A weight file from a file, a checkpoint folder or a run folder (final weights, else latest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"student weights not found: {path}")
    names = [f"{prefer}.safetensors", "ema.safetensors", "student.safetensors"]
    for name in names:
        if (path / name).is_file():
            return path / name
    pointer = path / "checkpoints" / "latest.json"
    if pointer.is_file():  # a run that has not finished: its latest checkpoint
        return resolve_student_path(path / "checkpoints" / read_json(pointer, "checkpoint pointer")["dir"], prefer)
    raise FileNotFoundError(f"no student weights in {path} (looked for {names} and checkpoints/latest.json)")


def load_student(path: str | Path, device: str | torch.device = "cpu", prefer: str = "ema") -> ARDStudent | TextARDStudent:
    """Rebuild a student (eval mode) from a weight file, a checkpoint folder or a run folder."""
    file = resolve_student_path(path, prefer)
    cfg, state, _ = read_student_file(file)
    student = TextARDStudent(cfg) if isinstance(cfg, TextStudentConfig) else ARDStudent(cfg)
    check_state_dict(student.state_dict(), state, str(file))
    student.load_state_dict(state, strict=True)
    return student.to(device).eval()
