"""Teacher checkpoints: original DiT ``.pt`` files, diffusers DiT folders, and our safetensors format.

- facebookresearch/DiT ``.pt``: a bare state dict (the released DiT-XL-2-256x256.pt) or a training
  checkpoint ``{"model", "ema", "opt", "args"}``; names are ours already. ``load_dit_pt``.
- willisma/SiT and sihyun-yu/REPA ``.pt``: DiT's keys (REPA adds projector heads, dropped), flow-matching
  conventions named in the config (``process`` "sit" / "repa"). ``load_sit_pt``.
- diffusers ``DiTTransformer2DModel`` folder (config.json + safetensors, maybe sharded): names are
  mapped to ours, our numerics are kept (see docs/checkpoints.md). ``load_diffusers_dit`` /
  ``save_diffusers_dit``.
- ours: one safetensors file whose metadata holds the config JSON, so a model rebuilds from the file
  alone. ``save_model`` / ``load_state_and_config`` (any module), ``save_checkpoint_safetensors`` /
  ``load_teacher`` (the DiT), ``load_text_teacher`` (the text-conditioned TextDiT, kind ``text-teacher``).

``load_any_teacher`` dispatches on what a path is. Every error names the file and the keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ardistill.models.dit import DiT, DiT_models, DiTConfig
from ardistill.models.text_dit import TextDiT, TextDiTConfig, pixart_pos_embed
from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.models.layers import get_2d_sincos_pos_embed

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


def _new_dit(cfg: DiTConfig) -> DiT:
    with torch.device("meta"):
        return DiT(cfg)


def _fixed_pos_embed(cfg: DiTConfig) -> torch.Tensor:
    grid = cfg.input_size // cfg.patch_size
    return torch.from_numpy(get_2d_sincos_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0)


# ------------------------------------------------------------------------------------------------
# Original facebookresearch/DiT .pt files


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


# ------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel folders

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"
_EMB = "transformer_blocks.{}.norm1.emb."  # per-block copy of the timestep/class embedders in diffusers
_EMB_PARTS = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
              "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
              "class_embedder.embedding_table.weight")
# Constructor defaults of the two classes (diffusers 0.42) for the fields we read.
_DIFFUSERS_DEFAULTS = {
    "DiTTransformer2DModel": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                                  num_layers=28, attention_bias=True, sample_size=32, patch_size=2,
                                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_zero", norm_elementwise_affine=False),
    "Transformer2DModel": dict(num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None,
                               num_layers=1, attention_bias=False, sample_size=None, patch_size=None,
                               activation_fn="geglu", num_embeds_ada_norm=None, norm_type="layer_norm",
                               norm_elementwise_affine=True, cross_attention_dim=None, only_cross_attention=False,
                               double_self_attention=False, attention_type="default", interpolation_scale=None),
}


def _diffusers_pairs(depth: int) -> list[tuple[str, str]]:
    """(our name, diffusers name) of every 1:1 tensor; qkv (split in three) is handled apart."""
    mods = [("x_embedder.proj", "pos_embed.proj"),
            ("t_embedder.mlp.0", _EMB.format(0) + "timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", _EMB.format(0) + "timestep_embedder.linear_2"),
            ("final_layer.adaLN_modulation.1", "proj_out_1"),
            ("final_layer.linear", "proj_out_2")]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        mods += [(ours + "adaLN_modulation.1", theirs + "norm1.linear"),
                 (ours + "attn.proj", theirs + "attn1.to_out.0"),
                 (ours + "mlp.fc1", theirs + "ff.net.0.proj"),
                 (ours + "mlp.fc2", theirs + "ff.net.2")]
    pairs = [(f"{a}.{s}", f"{b}.{s}") for a, b in mods for s in ("weight", "bias")]
    return pairs + [("y_embedder.embedding_table.weight", _EMB.format(0) + "class_embedder.embedding_table.weight")]


def dit_to_diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers names (qkv split into to_q/to_k/to_v, embedders copied per block)."""
    out = {theirs: state[ours] for ours, theirs in _diffusers_pairs(depth)}
    for i in range(depth):
        for s in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{s}"].chunk(3, dim=0)  # rows are [q | k | v], heads inside
            for name, t in (("to_q", q), ("to_k", k), ("to_v", v)):
                out[f"transformer_blocks.{i}.attn1.{name}.{s}"] = t
        if i > 0:
            for part in _EMB_PARTS:
                out[_EMB.format(i) + part] = out[_EMB.format(0) + part]
    return {k: v.clone() for k, v in out.items()}  # safetensors refuses shared storage


def diffusers_to_dit_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers names -> ours (without pos_embed, which diffusers does not store)."""
    out = {ours: state[theirs] for ours, theirs in _diffusers_pairs(depth)}
    for i in range(depth):
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(
                [state[f"transformer_blocks.{i}.attn1.{n}.{s}"] for n in ("to_q", "to_k", "to_v")], dim=0)
    return out


def diffusers_config_to_dit(config: dict, source: str = "config.json") -> DiTConfig:
    """DiTConfig from a diffusers DiTTransformer2DModel (or patched Transformer2DModel) config."""
    cls = config.get("_class_name")
    if cls not in _DIFFUSERS_DEFAULTS:
        raise CheckpointError(f"{source}: _class_name {cls!r} is not a DiT transformer "
                              f"(expected one of {sorted(_DIFFUSERS_DEFAULTS)})")
    c = {**_DIFFUSERS_DEFAULTS[cls], **config}
    required = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False, cross_attention_dim=None, only_cross_attention=False,
                    double_self_attention=False, attention_type="default")
    for field, want in required.items():
        if field in c and c[field] != want:
            raise CheckpointError(f"{source}: {field} = {c[field]!r}; a DiT needs {want!r}")
    for field in ("in_channels", "patch_size", "sample_size", "num_embeds_ada_norm"):
        if not isinstance(c.get(field), int):
            raise CheckpointError(f"{source}: {field} must be an integer, got {c.get(field)!r}")
    # diffusers' Transformer2DModel scales positions for sample_size >= 128; ours are DiT's, unscaled.
    interp = c.get("interpolation_scale") or (max(c["sample_size"] // 64, 1) if cls == "Transformer2DModel" else 1)
    if interp != 1:
        raise CheckpointError(f"{source}: position interpolation_scale {interp} is not supported (DiT uses 1)")
    C = c["in_channels"]
    out = c["out_channels"] if c["out_channels"] is not None else C
    if out not in (C, 2 * C):
        raise CheckpointError(f"{source}: out_channels {out} must be in_channels {C} or 2x (learned sigma)")
    try:
        return DiTConfig(input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=C,
                         hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
                         num_heads=c["num_attention_heads"], mlp_ratio=4.0,  # diffusers' FeedForward: mult 4
                         class_dropout_prob=0.1,  # diffusers always has the null-class row
                         num_classes=c["num_embeds_ada_norm"], learn_sigma=out == 2 * C,
                         prediction=config.get("_ardistill_prediction", "eps"),
                         process=config.get("_ardistill_process"))
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid DiT config: {e}") from e


def _model_folder(folder: Path) -> Path:
    """A transformer folder, or a pipeline folder (model_index.json) whose transformer/ is one."""
    if not (folder / DIFFUSERS_CONFIG).exists() and (folder / "model_index.json").exists():
        return folder / "transformer"
    return folder


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _read_diffusers_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a diffusers model folder (single file, sharded index, or legacy .bin)."""
    if (folder / DIFFUSERS_WEIGHTS).exists():
        return _read_safetensors(folder / DIFFUSERS_WEIGHTS), str(folder / DIFFUSERS_WEIGHTS)
    if (folder / DIFFUSERS_INDEX).exists():
        index_path = folder / DIFFUSERS_INDEX
        weight_map = read_json(index_path, "diffusers weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(_require(folder / shard, f"shard listed in {index_path}")))
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise CheckpointError(f"{index_path}: {len(absent)} keys listed but not in the shards: {_list(absent)}")
        return state, str(index_path)
    if (folder / DIFFUSERS_BIN).exists():
        state, _ = _select_state(_torch_load(folder / DIFFUSERS_BIN), folder / DIFFUSERS_BIN, None)
        return state, str(folder / DIFFUSERS_BIN)
    raise CheckpointError(f"{folder}: no diffusers weights ({DIFFUSERS_WEIGHTS}, {DIFFUSERS_INDEX} or {DIFFUSERS_BIN})")


def _check_shared_embedders(state: dict[str, torch.Tensor], depth: int, source: str) -> None:
    """Our DiT has one timestep/class embedder; diffusers keeps a copy per block, which must agree."""
    for i in range(1, depth):
        for part in _EMB_PARTS:
            a, b = state[_EMB.format(0) + part], state[_EMB.format(i) + part]
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                raise CheckpointError(f"{source}: {_EMB.format(i) + part} differs from block 0's copy (max abs "
                                      f"diff {diff:.3g}); our DiT shares one embedder across blocks, as the "
                                      f"original DiT does, so per-block embedders cannot be loaded")


def load_diffusers_dit(folder: str | os.PathLike) -> DiT:
    """A diffusers DiTTransformer2DModel folder -> DiT (eval mode, float32, original DiT numerics)."""
    folder = _model_folder(_require(folder, "diffusers model folder"))
    config_path = folder / DIFFUSERS_CONFIG
    cfg = diffusers_config_to_dit(read_json(config_path, "diffusers config"), str(config_path))
    state, source = _read_diffusers_weights(folder)
    model = _new_dit(cfg)
    check_state_dict(dit_to_diffusers_state(model.state_dict(), cfg.depth), state, source)
    _check_shared_embedders(state, cfg.depth, source)
    ours = diffusers_to_dit_state(state, cfg.depth)
    ours["pos_embed"] = _fixed_pos_embed(cfg)  # fixed, not stored by diffusers: recomputed
    return _assign(model, ours, source)


def save_diffusers_dit(model: DiT, folder: str | os.PathLike) -> Path:
    """Write a diffusers DiTTransformer2DModel folder (weights, then config.json) from our DiT."""
    cfg, folder = model.cfg, Path(folder)
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT has mlp_ratio 4; this model has {cfg.mlp_ratio}")
    if cfg.class_dropout_prob <= 0:
        raise ValueError("diffusers' DiT always has a null-class row; this model has none (class_dropout_prob 0)")
    state = dit_to_diffusers_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg.depth)
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = {
        "_class_name": "DiTTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "dropout": 0.0, "in_channels": cfg.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # diffusers' pre-MLP LayerNorm then matches DiT's eps (its default is 1e-5)
        "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": cfg.num_heads,
        "num_embeds_ada_norm": cfg.num_classes, "num_layers": cfg.depth, "out_channels": cfg.out_channels,
        "patch_size": cfg.patch_size, "sample_size": cfg.input_size, "upcast_attention": False,
        "_ardistill_prediction": cfg.prediction,  # diffusers ignores "_" keys; we read it back
    }
    if cfg.process is not None:
        config["_ardistill_process"] = cfg.process
    try:
        import diffusers
        config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    atomic_write_json(folder / DIFFUSERS_CONFIG, config)
    return folder


# ------------------------------------------------------------------------------------------------
# Our format: safetensors + config JSON in the metadata


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


def load_teacher(path: str | os.PathLike) -> DiT:
    """A DiT from our safetensors format (config in the metadata or a config.json beside)."""
    state, config, metadata = load_state_and_config(path)
    kind = metadata.get("kind", TEACHER_KIND)
    if kind not in _TEACHER_KINDS:
        raise CheckpointError(f"{path} holds a {kind!r} model, not a DiT teacher (kind {' or '.join(_TEACHER_KINDS)})")
    try:
        cfg = DiTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid DiT config: {e}") from e
    return _assign(_new_dit(cfg), state, str(path))


def load_text_teacher(path: str | os.PathLike) -> TextDiT:
    """A text-conditioned TextDiT from our safetensors format (kind ``text-teacher``, TextDiTConfig inside)."""
    state, config, metadata = load_state_and_config(path)
    kind = metadata.get("kind")
    if kind != TEXT_TEACHER_KIND:
        raise CheckpointError(f"{path} holds a {kind!r} model, not a text-conditioned teacher (kind {TEXT_TEACHER_KIND!r})")
    try:
        cfg = TextDiTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid TextDiT config: {e}") from e
    with torch.device("meta"):
        model = TextDiT(cfg)
    # The position embedding is a non-persistent buffer (a function of the config), rebuilt here.
    pos = pixart_pos_embed(cfg.hidden_size, cfg.grid_size, cfg.sample_size // cfg.patch_size, cfg.pos_interpolation_scale)
    model.pos_embed.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
    return _assign(model, state, str(path))


def load_any_teacher(path: str | os.PathLike, *, which: str | None = None, num_heads: int | None = None,
                     prediction: str = "eps", process: str | None = None) -> DiT:
    """A teacher from whatever ``path`` is: DiT/SiT/REPA .pt/.pth, our .safetensors, or a diffusers folder.

    ``which``, ``num_heads``, ``prediction`` and ``process`` apply to .pt files only (the other formats
    carry a config). A .pt file is SiT/REPA when ``process`` is "sit"/"repa" or when the file says so
    (REPA's projector heads, or a SiT/REPA training checkpoint's args); a bare SiT state dict has
    DiT's keys and shapes, so it needs ``process="sit"`` (or ``ardistill import-teacher --process sit``).
    """
    p = _require(path, "teacher checkpoint")
    if p.is_dir():
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
