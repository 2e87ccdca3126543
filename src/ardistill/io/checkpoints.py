"""Teacher checkpoints: whatever a path holds -> the one DiT backbone (models/dit.py), class or text conditioned.

- ours (io/weights.py): one safetensors file with its config in the metadata; ``load_teacher`` reads
  a class-conditional (kind ``dit``) or text-conditioned (kind ``text-teacher``) teacher.
- original ``.pt`` files of DiT, SiT and REPA (io/dit_pt.py), diffusers DiT folders (io/diffusers_dit.py),
  PixArt checkpoints (io/pixart.py: ``load_any_text_teacher``).

``load_any_teacher`` dispatches on what a path is. Every error names the file and the keys. The
loaders' names are importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from ardistill.io.diffusers_dit import (DIFFUSERS_BIN, DIFFUSERS_CONFIG, DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS,  # noqa: F401
                                        _model_folder, diffusers_config_to_dit, diffusers_to_dit_state,
                                        dit_to_diffusers_state, load_diffusers_dit, save_diffusers_dit)
from ardistill.io.dit_pt import (SIT_PROCESSES, _dit_from_obj, _select_state, _sit_from_obj,  # noqa: F401
                                 _strip_wrapper_prefix, detect_sit_process, infer_dit_config, load_dit_pt, load_sit_pt,
                                 sit_to_dit_state)
from ardistill.io.fileio import read_json
from ardistill.io.pixart import is_pixart_folder, load_pixart_diffusers
from ardistill.io.weights import (FORMAT, FORMAT_VERSION, TEACHER_KIND, TEXT_TEACHER_KIND, CheckpointError,  # noqa: F401
                                  _TEACHER_KINDS, _assign, _new_dit, _require, load_teacher, load_text_teacher,
                                  save_checkpoint_safetensors, _torch_load, check_state_dict,
                                  load_state_and_config, save_model, torch_load_reason)
from ardistill.models.dit import DiT


def load_any_teacher(path: str | os.PathLike, *, which: str | None = None, num_heads: int | None = None,
                     prediction: str = "eps", process: str | None = None) -> DiT:
    """A teacher from whatever ``path`` is: DiT/SiT/REPA .pt/.pth, our .safetensors (class or text teacher), or a
    diffusers folder (DiT or PixArt; an original PixArt ``.pth`` needs ``io.pixart.load_any_text_teacher``).

    ``which``, ``num_heads``, ``prediction`` and ``process`` apply to .pt files only (the other formats
    carry a config). A .pt file is SiT/REPA when ``process`` is "sit"/"repa" or when the file says so
    (REPA's projector heads, or a SiT/REPA training checkpoint's args); a bare SiT state dict has
    DiT's keys and shapes, so it needs ``process="sit"`` (or ``ardistill import-teacher --process sit``).
    """
    p = _require(path, "teacher checkpoint")
    if p.is_dir():
        if is_pixart_folder(p):
            return load_pixart_diffusers(p)
        folder = _model_folder(p)
        config = folder / DIFFUSERS_CONFIG
        if config.exists() and "_class_name" in read_json(config, "config"):
            return load_diffusers_dit(folder)
        ours = sorted(folder.glob("*.safetensors"))
        if config.exists() and len(ours) == 1:
            return load_teacher(ours[0])
        raise CheckpointError(f"{p}: not a teacher folder; expected a diffusers folder ({DIFFUSERS_CONFIG} with "
                              f"_class_name) or one .safetensors file with a config.json")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        if process in SIT_PROCESSES:
            return load_sit_pt(p, process=process, which=which, num_heads=num_heads)
        if process not in (None, "vp", "flow"):
            raise ValueError(f"process must be one of ('vp', 'flow') + {SIT_PROCESSES} or None, got {process!r}")
        obj = _torch_load(p)
        if process is None and isinstance(obj, dict):
            state, args = _select_state(obj, p, which)
            if detect_sit_process(_strip_wrapper_prefix(state), args) is not None:
                return _sit_from_obj(obj, p, None, None, which, num_heads)
        return _dit_from_obj(obj, p, None, which, num_heads, "velocity" if process == "flow" else prediction)
    if suffix == ".safetensors":
        beside = p.parent / DIFFUSERS_CONFIG
        try:
            with safe_open(str(p), framework="pt") as f:
                has_config = "config" in (f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{p} is not a readable safetensors file: {e}") from e
        if not has_config and beside.exists() and "_class_name" in read_json(beside, "config"):
            return load_diffusers_dit(p.parent)
        return load_teacher(p)
    raise CheckpointError(f"{p}: unrecognised teacher checkpoint; expected a facebookresearch/DiT .pt/.pth file, "
                          f"an ardistill .safetensors file, or a diffusers DiTTransformer2DModel folder")


def import_teacher(path: str | os.PathLike, out: str | os.PathLike, *, process: str | None = None,
                   which: str | None = None, num_heads: int | None = None) -> Path:
    """Any teacher file (DiT/SiT/REPA .pt, diffusers folder, ours) -> our .safetensors, conventions in its config.

    ``process`` says what a .pt holds ("vp" DiT, "flow" SD3-style, "sit", "repa"; None = what the file says,
    else DiT). Every later command then needs no flag: the config carries the process.
    """
    model = load_any_teacher(path, which=which, num_heads=num_heads, process=process)
    return save_checkpoint_safetensors(model, out, extra_metadata={"imported_from": Path(path).name})
