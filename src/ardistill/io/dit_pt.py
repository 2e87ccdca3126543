"""Original ``.pt`` teachers: facebookresearch/DiT, willisma/SiT and sihyun-yu/REPA.

- facebookresearch/DiT ``.pt``: a bare state dict (the released DiT-XL-2-256x256.pt) or a training
  checkpoint ``{"model", "ema", "opt", "args"}``; names are ours already. ``load_dit_pt``.
- willisma/SiT and sihyun-yu/REPA ``.pt``: DiT's keys (REPA adds projector heads, dropped), flow-matching
  conventions named in the config (``process`` "sit" / "repa"). ``load_sit_pt``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ardistill.io.weights import CheckpointError, _assign, _list, _new_dit, _require, _torch_load
from ardistill.models.dit import DiT, DiT_models, DiTConfig


def _select_state(obj: object, path: Path, which: str | None) -> tuple[dict, object]:
    """A bare state dict, or the ``which`` entry ("ema" first by default) of a training checkpoint."""
    if which not in (None, "ema", "model"):
        raise ValueError(f"which must be 'ema', 'model' or None, got {which!r}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or a training checkpoint dict, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None  # bare state dict (the released files): one set of weights, `which` does not apply
    present = [k for k in ("ema", "model") if isinstance(obj.get(k), dict)]
    if not present:
        raise CheckpointError(f"{path}: neither a state dict nor a training checkpoint with 'model'/'ema' "
                              f"entries; top-level keys: {_list(sorted(map(str, obj)))}")
    key = which or present[0]  # EMA first, as DiT's own find_model
    if key not in present:
        raise CheckpointError(f"{path}: training checkpoint has no {key!r} entry (it has {present})")
    return obj[key], obj.get("args")


def _strip_wrapper_prefix(state: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes when every key has them."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _registered_heads(hidden_size: int, model_name: str | None) -> int | None:
    """Heads of the registry size named by the checkpoint's args, else the unique one for this width."""
    if model_name in DiT_models and DiT_models[model_name]["hidden_size"] == hidden_size:
        return DiT_models[model_name]["num_heads"]
    heads = {d["num_heads"] for d in DiT_models.values() if d["hidden_size"] == hidden_size}
    return heads.pop() if len(heads) == 1 else None


def infer_dit_config(state: dict[str, torch.Tensor], num_heads: int | None = None, prediction: str = "eps",
                     source: str = "state dict", model_name: str | None = None) -> DiTConfig:
    """DiTConfig from original-layout weight shapes; heads come from num_heads, model_name or the registry."""
    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: cannot infer the DiT config: key {key!r} is missing")
        return state[key]

    w = get("x_embedder.proj.weight")
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    D, C, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    n_tokens = int(get("pos_embed").shape[1])
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise CheckpointError(f"{source}: pos_embed has {n_tokens} tokens, not a square grid")
    out = int(get("final_layer.linear.weight").shape[0])
    if out not in (p * p * C, 2 * p * p * C):
        raise CheckpointError(f"{source}: final_layer.linear has {out} outputs; expected {p * p * C} "
                              f"or {2 * p * p * C} (learned sigma) for patch {p} and {C} channels")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError(f"{source}: no transformer blocks (keys blocks.<i>.*) found")
    mlp_hidden = int(get("blocks.0.mlp.fc1.weight").shape[0])
    heads = num_heads or _registered_heads(D, model_name)
    if heads is None:
        raise CheckpointError(f"{source}: the number of attention heads cannot be inferred from weight shapes and "
                              f"hidden size {D} matches no registered DiT size; pass num_heads=... (or a DiTConfig)")
    try:
        return DiTConfig(input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                         num_heads=heads, mlp_ratio=mlp_hidden / D, class_dropout_prob=0.1,
                         # DiT's label table has a last "null class" row for classifier-free guidance
                         num_classes=int(get("y_embedder.embedding_table.weight").shape[0]) - 1,
                         learn_sigma=out == 2 * p * p * C, prediction=prediction)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from e


def load_dit_pt(path: str | os.PathLike, cfg: DiTConfig | None = None, which: str | None = None,
                num_heads: int | None = None, prediction: str = "eps") -> DiT:
    """A facebookresearch/DiT ``.pt`` file -> DiT (eval mode, float32).

    Args:
        path: a bare state dict (released DiT-XL-2-256x256.pt) or a training checkpoint with
            "model"/"ema" entries (DiT's train.py; "opt" and "args" are ignored, except args.model for heads).
        cfg: the architecture; None infers it from the weight shapes.
        which: "ema" or "model" entry of a training checkpoint; None = "ema" if present. Ignored for a
            bare state dict, which holds one set of weights.
        num_heads: attention heads when inferring (shapes cannot tell); default from args.model or the
            registered size with this hidden size.
        prediction: "eps" (DiT) or "velocity" (SD3-style flow) when inferring; SiT and REPA files: ``load_sit_pt``.
    """
    path = _require(path, "DiT checkpoint")
    return _dit_from_obj(_torch_load(path), path, cfg, which, num_heads, prediction)


def _dit_from_obj(obj: object, path: Path, cfg: DiTConfig | None, which: str | None, num_heads: int | None,
                  prediction: str) -> DiT:
    state, args = _select_state(obj, path, which)
    state = _strip_wrapper_prefix(state)
    if cfg is None:
        model_name = getattr(args, "model", None) if not isinstance(args, dict) else args.get("model")
        cfg = infer_dit_config(state, num_heads, prediction, str(path), model_name)
    elif num_heads is not None and num_heads != cfg.num_heads:
        raise ValueError(f"num_heads={num_heads} contradicts cfg.num_heads={cfg.num_heads}")
    return _assign(_new_dit(cfg), state, str(path))


# ------------------------------------------------------------------------------------------------
# SiT (willisma/SiT) and REPA's SiT (sihyun-yu/REPA) .pt files: DiT's key names, flow conventions
#
# SiT: SiT-XL-2-256x256.pt is a bare state dict, train.py writes {"model", "ema", "opt", "args"};
#   learned sigma (2C outputs, the ODE uses the first C); linear interpolant x_t = t x_data + (1 - t) noise,
#   velocity x_data - noise, time in [0, 1] unscaled: process "sit".
# REPA: train.py writes {"model", "ema", "opt", "args", "steps"}; no learned sigma; adds projector MLPs
#   (``projectors.<i>.{0,2,4}``) after block ``encoder_depth`` for its alignment loss only; its linear
#   path is x_t = (1 - t) x_data + t noise with velocity noise - x_data, time unscaled: process "repa".
#   Older REPA files name the blocks after encoder_depth ``decoder_blocks.<i>`` (its --legacy flag).

SIT_PROCESSES = ("sit", "repa")
_REPA_PROJECTOR = "projectors."


def _args_get(args: object, key: str):
    return args.get(key) if isinstance(args, dict) else getattr(args, key, None)


def detect_sit_process(state: dict, args: object) -> str | None:
    """"repa" for a REPA file (projector heads or REPA's training args), "sit" for a SiT training
    checkpoint (its args name the transport), None when the file cannot tell (a bare SiT state dict
    has DiT's keys and shapes exactly)."""
    if any(k.startswith(_REPA_PROJECTOR) for k in state) or any(k.startswith("decoder_blocks.") for k in state):
        return "repa"
    if args is not None and (_args_get(args, "enc_type") is not None or _args_get(args, "proj_coeff") is not None):
        return "repa"
    if args is not None and _args_get(args, "path_type") is not None:
        return "sit"
    return None


def sit_to_dit_state(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SiT/REPA keys -> DiT's: REPA's projector heads dropped (returned), legacy ``decoder_blocks`` renumbered."""
    dropped = sorted(k for k in state if k.startswith(_REPA_PROJECTOR))
    out = {k: v for k, v in state.items() if not k.startswith(_REPA_PROJECTOR)}
    qk = sorted(k for k in out if re.match(r"blocks\.\d+\.attn\.[qk]_norm\.", k))
    if qk:
        raise CheckpointError(f"{source}: the attention has q/k normalisation (REPA's --qk-norm), which the DiT "
                              f"architecture does not have; keys: {_list(qk)}")
    legacy = [k for k in out if k.startswith("decoder_blocks.")]
    if legacy:  # REPA's load_legacy_checkpoints: decoder_blocks.i -> blocks.(i + encoder_depth)
        encoder_depth = 1 + max((int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        renamed = {}
        for k, v in out.items():
            m = re.match(r"decoder_blocks\.(\d+)\.(.*)", k)
            renamed[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k] = v
        out = renamed
    return out, dropped


def _check_sit_args(args: object, process: str, source: str) -> None:
    """A training checkpoint's args must describe the linear velocity model this loader implements."""
    if args is None:
        return
    path_type, prediction = _args_get(args, "path_type"), _args_get(args, "prediction")
    if path_type is not None and str(path_type).lower() != "linear":
        raise CheckpointError(f"{source}: args.path_type = {path_type!r}; only the linear interpolant is supported "
                              f"(SiT's 'Linear', REPA's 'linear')")
    if prediction is not None and prediction not in ("velocity", "v"):
        raise CheckpointError(f"{source}: args.prediction = {prediction!r}; only velocity prediction is supported")


def load_sit_pt(path: str | os.PathLike, process: str | None = None, cfg: DiTConfig | None = None,
                which: str | None = None, num_heads: int | None = None) -> DiT:
    """A SiT or REPA-SiT ``.pt`` file -> DiT (eval, float32) whose config names its flow convention.

    Args:
        path: SiT's released state dict, or a SiT / REPA training checkpoint ("ema" first, as both repos load).
        process: "sit" (willisma/SiT) or "repa" (sihyun-yu/REPA); None = what the file says (REPA's projector
            heads or either repo's training args), else "sit".
        cfg: the architecture; None infers it from the weight shapes (heads from args.model or the registry).
        which: "ema" or "model" entry of a training checkpoint.
        num_heads: attention heads when inferring an unregistered width.
    REPA's projector heads serve its training loss only; they are dropped with a warning that says so.
    """
    path = _require(path, "SiT checkpoint")
    return _sit_from_obj(_torch_load(path), path, process, cfg, which, num_heads)


def _sit_from_obj(obj: object, path: Path, process: str | None, cfg: DiTConfig | None, which: str | None,
                  num_heads: int | None) -> DiT:
    if process is not None and process not in SIT_PROCESSES:
        raise ValueError(f"process must be one of {SIT_PROCESSES} or None, got {process!r}")
    state, args = _select_state(obj, path, which)
    state = _strip_wrapper_prefix(state)
    found = detect_sit_process(state, args)
    if process is not None and found is not None and found != process:
        raise CheckpointError(f"{path}: asked to load it as {process!r} but the file is a {found!r} checkpoint "
                              f"({'projector heads' if found == 'repa' else 'SiT training args'} found)")
    process = process or found or "sit"
    _check_sit_args(args, process, str(path))
    state, dropped = sit_to_dit_state(state, str(path))
    if dropped:
        warnings.warn(f"{path}: ignoring REPA's projector heads ({len(dropped)} tensors: {_list(dropped, 3)}); "
                      f"they serve only REPA's representation-alignment loss, sampling never uses them",
                      stacklevel=3)
    if cfg is None:
        model_name = _args_get(args, "model") if args is not None else None
        if isinstance(model_name, str):
            model_name = model_name.replace("SiT-", "DiT-", 1)  # same sizes under SiT's names
        cfg = infer_dit_config(state, num_heads, "velocity", str(path), model_name)
    cfg = replace(cfg, prediction="velocity", process=process)
    return _assign(_new_dit(cfg), state, str(path))


