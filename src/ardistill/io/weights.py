"""The checkpoint file format, our teacher files, and the checks every loader shares.

Ours: one safetensors file whose metadata holds the config JSON and a ``kind`` (teacher, text teacher,
student, ...), so a model rebuilds from the file alone: ``save_model`` / ``load_state_and_config``;
``save_checkpoint_safetensors`` / ``load_teacher`` for teachers of either conditioning.
``check_state_dict`` / ``assign_state`` load a state dict strictly, naming the file and the keys;
``torch_load`` reads a ``.pt`` with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ardistill.io.fileio import atomic_write, read_json
from ardistill.models.dit import DiT, DiTConfig
from ardistill.models.layers import get_2d_sincos_pos_embed
from ardistill.models.pixart_layers import pixart_pos_embed
from ardistill.models.text_dit import TextDiTConfig

FORMAT = "ardistill"
FORMAT_VERSION = "1"
TEACHER_KIND = "dit"
TEXT_TEACHER_KIND = "text-teacher"
_TEACHER_KINDS = (TEACHER_KIND, "teacher")  # "teacher": what teacher_training.py writes
_RESERVED_METADATA = ("format", "format_version", "kind", "config")


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be loaded; the message names the file and the keys."""


# ------------------------------------------------------------------------------------------------
# Shared checks


def _require(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: dict[str, torch.Tensor], state: dict, source: str) -> None:
    """Raise CheckpointError naming missing / unexpected / wrong-shape keys (first few + counts)."""
    bad_type = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})" for k, v in expected.items()
             if k in state and k not in bad_type and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{len(keys)} {name}: {_list(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong),
                 ("non-tensor values", bad_type)) if keys]
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into a model built on the meta device (no wasted init), strict, in float32."""
    check_state_dict(model.state_dict(), state, source)
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # requires_grad of the module is kept
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors not restored by the state dict: {_list(left)}")
    return model.eval()


def _new_dit(cfg) -> DiT:
    """The DiT backbone of ``cfg`` (DiTConfig or TextDiTConfig) on the meta device: every weight comes from a
    file, so nothing is initialised; a PixArt-form model's fixed position table (a non-persistent buffer, a
    function of the config) is rebuilt."""
    with torch.device("meta"):
        model = DiT(cfg)
    if cfg.conditioning == "text":
        pos = pixart_pos_embed(cfg.hidden_size, cfg.grid_size, cfg.sample_size // cfg.patch_size,
                               cfg.pos_interpolation_scale)
        model.pos_embed.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
    return model


def _fixed_pos_embed(cfg: DiTConfig) -> torch.Tensor:
    grid = cfg.input_size // cfg.patch_size
    return torch.from_numpy(get_2d_sincos_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0)



def _torch_load(path: Path) -> object:
    """torch.load(weights_only=True); DiT's training checkpoints also hold an argparse.Namespace."""
    try:
        # Namespace is a plain attribute bag; allowing it keeps weights_only's guarantees for the rest.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means "not a loadable checkpoint"; keep the cause
        raise CheckpointError(f"{path} is not a checkpoint that torch.load(weights_only=True) can read "
                              f"({torch_load_reason(e)})") from e


def torch_load_reason(e: BaseException) -> str:
    """torch.load's error on one line: its boilerplate dropped, the refused global (or other cause) kept whole."""
    paragraphs = [" ".join(p.split()) for p in str(e).replace("\n\t", "\n\n").split("\n\n")]
    boiler = ("Weights only load failed", "Check the documentation of torch.load", "(1) In PyTorch",
              "(2) Alternatively")
    kept = [p for p in paragraphs if p and not p.startswith(boiler)]
    return f"{type(e).__name__}: {' '.join(kept) or ' '.join(paragraphs)}"



def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_model(module: nn.Module, config: dict, path: str | os.PathLike, kind: str,
               extra_metadata: dict | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Any module + its config dict -> one safetensors file (config JSON in the metadata), atomically.

    ``state_dict``: the tensors to write instead of ``module.state_dict()`` (e.g. gathered from FSDP shards).
    """
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "config": json.dumps(config, sort_keys=True)}
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"extra_metadata key {key!r} is reserved ({_RESERVED_METADATA})")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    tensors = _plain_tensors(module.state_dict() if state_dict is None else state_dict)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state_and_config(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(state dict, config dict, metadata) of a file written by ``save_model``.

    The config comes from the metadata, or else from a ``config.json`` beside the file.
    """
    path = _require(path, "checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if "config" in metadata:
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata 'config' is not valid JSON: {e}") from e
    else:
        beside = path.parent / "config.json"
        if not beside.exists():
            raise CheckpointError(f"{path} has no 'config' in its safetensors metadata and no {beside} beside it")
        config = read_json(beside, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is a {type(config).__name__}, expected an object")
    return state, config, metadata


def save_checkpoint_safetensors(model: DiT, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
    """A DiT teacher -> safetensors with its DiTConfig in the metadata."""
    return save_model(model, model.cfg.to_dict(), path, kind=TEACHER_KIND, extra_metadata=extra_metadata)


_TEACHER_CONFIGS = {**{k: DiTConfig for k in _TEACHER_KINDS}, TEXT_TEACHER_KIND: TextDiTConfig}  # file kind -> config


def load_teacher(path: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> DiT:
    """A teacher from our safetensors format (config in the metadata or a config.json beside): the DiT
    backbone with the conditioning its config names (kind ``dit``: class labels; ``text-teacher``: text).

    ``kinds``: the file kinds accepted (default: every teacher kind).
    """
    state, config, metadata = load_state_and_config(path)
    kind = metadata.get("kind", TEACHER_KIND)
    kinds = kinds or tuple(_TEACHER_CONFIGS)
    if kind not in kinds:
        what = "text-conditioned teacher" if kinds == (TEXT_TEACHER_KIND,) else "DiT teacher"
        raise CheckpointError(f"{path} holds a {kind!r} model, not a {what} (kind {' or '.join(kinds)})")
    config_cls = _TEACHER_CONFIGS[kind]
    try:
        cfg = config_cls.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {'TextDiT' if kind == TEXT_TEACHER_KIND else 'DiT'} config: {e}") from e
    return _assign(_new_dit(cfg), state, str(path))


def load_text_teacher(path: str | os.PathLike) -> DiT:
    """A text-conditioned teacher from our safetensors format (kind ``text-teacher``); other kinds are refused."""
    return load_teacher(path, kinds=(TEXT_TEACHER_KIND,))
