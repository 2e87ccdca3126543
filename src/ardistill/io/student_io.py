"""Student weight files: ardistill's safetensors format (checkpoints.save_model), kind "ard-student"
(or "ard-text-student" for the student of a text teacher).

The StudentConfig is JSON in the file's metadata, so ``load_student(path)`` rebuilds the student from
the file alone (no teacher, no recording). A path may also be a training run folder or one of its
checkpoint folders; the EMA weights are preferred there, since they are what the paper evaluates.

Students trained with the public ARD code (alsdudrla10/ARD, ``models_ARD.py``) are ``.pt`` files:
``train_ARD.py`` writes {"model", "ema", "opt", "args"} whose state dicts are DiT-XL/2's keys with
one final layer per step (``final_layer``, ``final_layer2``, ... ``final_layer4``, each with the
teacher's learned-sigma outputs, of which the public code uses the first C channels).
``import_public_ard`` (and ``load_student`` on a .pt path) turns one into an ``ARDStudent`` with the
public code's settings: heads per step, k/S time labels from t = 999, x0-prediction targets,
history in the lower ``args.stack`` layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ardistill.io.checkpoints import (CheckpointError, _require, _select_state, _strip_wrapper_prefix,
                                      _torch_load, check_state_dict, infer_dit_config, load_state_and_config,
                                      save_model)
from ardistill.io.fileio import read_json
from ardistill.models.student import ARDStudent, StudentConfig, TextStudentConfig, recipe_student_config

STUDENT_KIND = "ard-student"
TEXT_STUDENT_KIND = "ard-text-student"
_KINDS = {STUDENT_KIND: StudentConfig, TEXT_STUDENT_KIND: TextStudentConfig}  # file kind -> its config class


def save_student(path: str | Path, student: ARDStudent, extra_metadata: dict | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the student's weights with its config atomically; ``extra_metadata`` e.g. {"step": 100}.

    ``state_dict``: whole tensors to write instead of the module's own (an FSDP-sharded student's, gathered).
    """
    student = getattr(student, "module", student)  # DDP-wrapped models carry the student in .module
    kind = TEXT_STUDENT_KIND if student.arch.conditioning == "text" else STUDENT_KIND
    return save_model(student, student.cfg.to_dict(), path, kind=kind, extra_metadata=extra_metadata,
                      state_dict=state_dict)


def read_student_file(path: str | Path) -> tuple[StudentConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, state dict, metadata) of a student weight file; errors name the file."""
    state, config, meta = load_state_and_config(path)
    if meta.get("kind") not in _KINDS:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not an ARD student "
                              f"({' or '.join(map(repr, _KINDS))})")
    try:
        cfg = _KINDS[meta["kind"]].from_dict(config)
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
    if (path / "dcp").is_dir():  # a sharded (FSDP) checkpoint holds no single-file weights until exported
        step = (path.name[5:].lstrip("0") or "0") if path.name[5:].isdigit() else "N"
        raise FileNotFoundError(f"{path} is a sharded (FSDP) checkpoint: export its weights first with "
                                f"`ardistill export-checkpoint --run-dir {path.parent.parent} --step {step}`")
    raise FileNotFoundError(f"no student weights in {path} (looked for {names} and checkpoints/latest.json)")


def load_student(path: str | Path, device: str | torch.device = "cpu", prefer: str = "ema") -> ARDStudent:
    """Rebuild a student (eval mode) from a weight file, a checkpoint folder or a run folder.

    A ``.pt``/``.pth`` file is a public-ARD checkpoint (``import_public_ard``, its history layers from args.stack).
    """
    file = resolve_student_path(path, prefer)
    if file.suffix.lower() in (".pt", ".pth"):
        return import_public_ard(file, which=prefer if prefer in ("ema", "model") else None).to(device)
    cfg, state, _ = read_student_file(file)
    student = ARDStudent(cfg)
    check_state_dict(student.state_dict(), state, str(file))
    student.load_state_dict(state, strict=True)
    return student.to(device).eval()


# ------------------------------------------------------------------------------------------------
# The public ARD code's checkpoints (models_ARD.py)

PUBLIC_ARD_TIME = 999.0  # sample_ARD.py / train_ARD.py feed t = 999; block k sees t * (S - k) / S


def public_ard_head_name(k: int) -> str:
    """models_ARD.py's name of the head of step k (0-based): final_layer, final_layer2, final_layer3, ..."""
    return "final_layer" if k == 0 else f"final_layer{k + 1}"


def _public_ard_steps(state: dict, source: str) -> int:
    """S = the number of final layers, which must be final_layer, final_layer2, ..., final_layerS."""
    found = sorted({int(m.group(1) or 1) for k in state if (m := re.match(r"final_layer(\d*)\.", k))})
    if not found:
        raise CheckpointError(f"{source}: no final layers (final_layer.*, final_layer2.*, ...): not a public-ARD "
                              f"student checkpoint")
    S = max(found)
    missing = [public_ard_head_name(k) for k in range(S) if k + 1 not in found]
    if missing:
        raise CheckpointError(f"{source}: final layers {missing} are missing (found {S} as the last, so the "
                              f"student has {S} steps and needs final_layer, final_layer2, ..., final_layer{S})")
    if S < 2:
        raise CheckpointError(f"{source}: only final_layer; a public-ARD student has one final layer per step "
                              f"(final_layer2, ... missing): is this a teacher checkpoint?")
    return S


def public_ard_student_config(teacher, num_steps: int = 4, history_layers: int = 6) -> StudentConfig:
    """The public ARD code's student for a DiT teacher config: k/S labels from t = 999, heads per step, x0 targets."""
    cfg = recipe_student_config("public-ard", teacher, num_steps, history_layers)
    want = tuple(PUBLIC_ARD_TIME * (num_steps - k) / num_steps for k in range(num_steps))
    if cfg.block_times != want:  # the recipe derives them from the teacher's grid; the public code hard-codes 999
        raise ValueError(f"the public ARD code is for DiT's VP process (block times {want}); this teacher's "
                         f"process gives {cfg.block_times}")
    return cfg


def public_ard_layout(student: ARDStudent) -> dict[str, torch.Tensor]:
    """The models_ARD.py state dict of ``student``: heads renamed to final_layer*, learned-sigma rows zero."""
    tc = student.cfg.teacher
    out = {}
    for name, t in student.state_dict().items():
        m = re.match(r"heads\.(\d+)\.(.*)", name)
        if not m:
            out[name] = t
            continue
        key = f"{public_ard_head_name(int(m.group(1)))}.{m.group(2)}"
        if tc.learn_sigma and m.group(2).startswith("linear."):
            p, C = tc.patch_size, tc.in_channels
            full = torch.zeros(p * p, 2 * C, *t.shape[1:], dtype=t.dtype)
            full[:, :C] = t.view(p * p, C, *t.shape[1:])
            t = full.reshape(p * p * 2 * C, *t.shape[1:])
        out[key] = t
    return out


def import_public_ard(path: str | Path, history_layers: int | None = None, which: str | None = None,
                      num_heads: int | None = None) -> ARDStudent:
    """A public-ARD ``.pt`` (train_ARD.py's checkpoint or a bare models_ARD state dict) -> ARDStudent (eval).

    Args:
        path: the .pt file; a training checkpoint's "ema" entry is used unless ``which="model"``.
        history_layers: N_h; None = the checkpoint's args.stack (required for a bare state dict).
        which: "ema" or "model" entry of a training checkpoint.
        num_heads: attention heads, when args.model and the registry cannot tell.
    """
    path = _require(path, "public-ARD checkpoint")
    state, args = _select_state(_torch_load(path), path, which)
    state = _strip_wrapper_prefix(state)
    source = str(path)
    S = _public_ard_steps(state, source)
    stack = getattr(args, "stack", None) if not isinstance(args, dict) else args.get("stack")
    if history_layers is None:
        if stack is None:
            raise CheckpointError(f"{source}: the number of history layers is not in the file (no args.stack); "
                                  f"pass history_layers=... (the public code's --stack, 6 by default)")
        history_layers = int(stack)
    elif stack is not None and int(stack) != history_layers:
        raise CheckpointError(f"{source}: history_layers={history_layers} contradicts the file's args.stack = {stack}")
    model_name = getattr(args, "model", None) if not isinstance(args, dict) else args.get("model")
    teacher = infer_dit_config(state, num_heads, "eps", source, model_name)
    try:
        cfg = public_ard_student_config(teacher, S, history_layers)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    student = ARDStudent(cfg)
    check_state_dict(public_ard_layout(student), state, source)  # errors name the file's keys
    ours = {}
    for name in student.state_dict():
        m = re.match(r"heads\.(\d+)\.(.*)", name)
        if not m:
            ours[name] = state[name]
            continue
        t = state[f"{public_ard_head_name(int(m.group(1)))}.{m.group(2)}"]
        if teacher.learn_sigma and m.group(2).startswith("linear."):  # the public code keeps the first C channels
            p, C = teacher.patch_size, teacher.in_channels
            t = t.view(p * p, 2 * C, *t.shape[1:])[:, :C].reshape(p * p * C, *t.shape[1:])
        ours[name] = t.float().contiguous()
    student.load_state_dict(ours, strict=True)
    return student.eval()


def import_public_ard_file(path: str | Path, out: str | Path, history_layers: int | None = None,
                           which: str | None = None) -> Path:
    """A public-ARD .pt -> our student .safetensors (config inside), so ``generate`` and ``evaluate`` read it."""
    student = import_public_ard(path, history_layers=history_layers, which=which)
    return save_student(out, student, extra_metadata={"imported_from": Path(path).name})
