"""diffusers ``DiTTransformer2DModel`` folders (config.json + safetensors, maybe sharded), both ways.

Names are mapped to ours and our numerics are kept (see docs/checkpoints.md): ``load_diffusers_dit`` /
``save_diffusers_dit``; ``dit_to_diffusers_state`` / ``diffusers_to_dit_state`` map the state dicts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.io.dit_pt import _select_state
from ardistill.io.weights import (CheckpointError, _assign, _fixed_pos_embed, _list, _new_dit, _require, _torch_load,
                                  check_state_dict)
from ardistill.models.dit import DiT, DiTConfig


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

