"""PixArt-alpha / PixArt-Sigma checkpoints -> the project's TextDiT, with exact numerics.

Two public formats:
- a diffusers ``PixArtTransformer2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  or a sharded ``*.safetensors.index.json``; a pipeline folder's ``transformer/``). TextDiT's names are
  diffusers' names, so the weights load one to one. ``load_pixart_diffusers`` / ``save_pixart_diffusers``.
- the original PixArt release ``.pth`` (PixArt-alpha/PixArt-alpha ``diffusion/model/nets/PixArt.py``,
  ``PixArtMS.py``; PixArt-Sigma uses the same names): ``{"state_dict": {...}}`` or a bare state dict with
  ``x_embedder``, ``t_embedder``, ``t_block``, ``y_embedder``, ``blocks.i.attn.qkv`` (q, k, v stacked),
  ``blocks.i.cross_attn.q_linear`` / ``kv_linear`` (k, v stacked), ``final_layer``; PixArtMS (alpha 1024)
  adds ``csize_embedder`` / ``ar_embedder`` (the micro-conditions). A ``.pth`` carries no config: the
  image size must be given (or read from a stored ``pos_embed``), the head count is D / 72 (XL/2).
  ``load_pixart_pth`` / ``save_pixart_pth``.

The original release also holds ``y_embedder.y_embedding`` (120, 4096), a learned null caption that
the original sampler uses for guidance; diffusers (and this project) guide with the text encoder's
empty prompt instead. ``pixart_pth_null_caption`` returns it for users who want the original's choice.

``load_any_text_teacher`` dispatches on what a path is (these two, or our text-teacher safetensors).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ardistill.io.diffusers_dit import (DIFFUSERS_CONFIG, DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, _model_folder,
                                        _read_diffusers_weights)
from ardistill.io.weights import CheckpointError, _assign, _new_dit, _require, _torch_load, load_text_teacher
from ardistill.io.fileio import atomic_write, atomic_write_json, read_json
from ardistill.models.text_dit import TextDiT, TextDiTConfig

PIXART_HEAD_DIM = 72  # PixArt-XL/2: 1152 = 16 heads x 72
# PixArt-Sigma's position-embedding scale per image size (its scripts/inference.py); PixArt-alpha uses
# diffusers' default max(sample_size // 64, 1) (lewei_scale 1 at 256/512 px, 2 at 1024 px).
SIGMA_INTERPOLATION_SCALE = {256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0}
VARIANTS = ("alpha", "sigma")
_CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")


# ------------------------------------------------------------------------------------------------
# diffusers folders


def pixart_config_from_diffusers(config: dict, source: str = "config.json") -> TextDiTConfig:
    """A diffusers PixArtTransformer2DModel config -> TextDiTConfig (errors name the field)."""
    c = dict(config)
    name = c.get("_class_name")
    if name not in _CLASS_NAMES:
        raise CheckpointError(f"{source}: _class_name is {name!r}, expected one of {_CLASS_NAMES}")
    if c.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise CheckpointError(f"{source}: norm_type {c.get('norm_type')!r} is not PixArt's 'ada_norm_single'")
    checks = {"activation_fn": "gelu-approximate", "norm_elementwise_affine": False, "attention_bias": True}
    for key, want in checks.items():
        if c.get(key, want) != want:
            raise CheckpointError(f"{source}: {key} = {c[key]!r}; PixArt (and TextDiT) use {want!r}")
    if c.get("norm_eps", 1e-6) != 1e-6:
        raise CheckpointError(f"{source}: norm_eps = {c['norm_eps']}; PixArt (and TextDiT) use 1e-6")
    for key in ("sample_size", "patch_size", "in_channels", "num_attention_heads", "attention_head_dim",
                "num_layers", "caption_channels"):
        if not isinstance(c.get(key), int):
            raise CheckpointError(f"{source}: field {key!r} missing or not an integer (got {c.get(key)!r})")
    D = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("cross_attention_dim", D) not in (None, D):
        raise CheckpointError(f"{source}: cross_attention_dim {c['cross_attention_dim']} != inner dim {D} "
                              "(PixArt projects the caption to the model width)")
    C = c["in_channels"]
    out = c.get("out_channels") or C
    if out not in (C, 2 * C):
        raise CheckpointError(f"{source}: out_channels {out} must be in_channels {C} or 2x (learned sigma)")
    micro = c.get("use_additional_conditions")
    if micro is None:  # diffusers' rule
        micro = c["sample_size"] == 128
    s = c["sample_size"]
    try:
        return TextDiTConfig(
            input_size=(s, s), patch_size=c["patch_size"], in_channels=C, hidden_size=D, depth=c["num_layers"],
            num_heads=c["num_attention_heads"], caption_channels=c["caption_channels"], sample_size=s,
            interpolation_scale=c.get("interpolation_scale"), learn_sigma=out == 2 * C,
            prediction=c.get("_ardistill_prediction", "eps"), use_additional_conditions=bool(micro),
            resolution=c.get("_ardistill_resolution"))
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid PixArt config: {e}") from e


def pixart_diffusers_config(cfg: TextDiTConfig) -> dict:
    """TextDiTConfig -> a diffusers PixArtTransformer2DModel config (square models only)."""
    if cfg.input_size[0] != cfg.input_size[1] or cfg.input_size[0] != cfg.sample_size:
        raise ValueError(f"diffusers' PixArt config describes square models of sample_size; this one is "
                         f"{cfg.input_size} with sample_size {cfg.sample_size}")
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' PixArt has mlp_ratio 4; this model has {cfg.mlp_ratio}")
    config = {
        "_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "attention_type": "default",
        "caption_channels": cfg.caption_channels, "cross_attention_dim": cfg.hidden_size, "dropout": 0.0,
        "in_channels": cfg.in_channels, "interpolation_scale": cfg.interpolation_scale,
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single",
        "num_attention_heads": cfg.num_heads, "num_embeds_ada_norm": 1000, "num_layers": cfg.depth,
        "out_channels": cfg.out_channels, "patch_size": cfg.patch_size, "sample_size": cfg.sample_size,
        "upcast_attention": False, "use_additional_conditions": cfg.use_additional_conditions,
        "_ardistill_prediction": cfg.prediction,  # diffusers ignores "_" keys; we read them back
        "_ardistill_resolution": list(cfg.resolution) if cfg.resolution else None,
    }
    try:
        import diffusers
        config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    return config


def load_pixart_diffusers(folder: str | os.PathLike) -> TextDiT:
    """A diffusers PixArtTransformer2DModel folder (or a pipeline folder) -> TextDiT (eval, float32)."""
    folder = _model_folder(_require(folder, "PixArt diffusers folder"))
    config_path = _require(folder / DIFFUSERS_CONFIG, "config.json of the PixArt transformer")
    cfg = pixart_config_from_diffusers(read_json(config_path, "diffusers config"), str(config_path))
    state, source = _read_diffusers_weights(folder)
    model = _new_dit(cfg)
    return _assign(model, state, source)


def save_pixart_diffusers(model: TextDiT, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write a diffusers PixArtTransformer2DModel folder; ``max_shard_bytes`` splits the weights into shards + index."""
    folder = Path(folder)
    config = pixart_diffusers_config(model.cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        atomic_write(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
            atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        atomic_write_json(folder / DIFFUSERS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(folder / DIFFUSERS_CONFIG, config)
    return folder


# ------------------------------------------------------------------------------------------------
# The original PixArt .pth release


def _block_pairs(i: int) -> list[tuple[str, str]]:
    """(original, diffusers) names of block i's tensors that map one to one."""
    o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    pairs = [("scale_shift_table", "scale_shift_table"),
             ("attn.proj.weight", "attn1.to_out.0.weight"), ("attn.proj.bias", "attn1.to_out.0.bias"),
             ("cross_attn.q_linear.weight", "attn2.to_q.weight"), ("cross_attn.q_linear.bias", "attn2.to_q.bias"),
             ("cross_attn.proj.weight", "attn2.to_out.0.weight"), ("cross_attn.proj.bias", "attn2.to_out.0.bias"),
             ("mlp.fc1.weight", "ff.net.0.proj.weight"), ("mlp.fc1.bias", "ff.net.0.proj.bias"),
             ("mlp.fc2.weight", "ff.net.2.weight"), ("mlp.fc2.bias", "ff.net.2.bias")]
    return [(o + a, d + b) for a, b in pairs]


_TOP_PAIRS = [
    ("x_embedder.proj.weight", "pos_embed.proj.weight"), ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    ("y_embedder.y_proj.fc1.weight", "caption_projection.linear_1.weight"),
    ("y_embedder.y_proj.fc1.bias", "caption_projection.linear_1.bias"),
    ("y_embedder.y_proj.fc2.weight", "caption_projection.linear_2.weight"),
    ("y_embedder.y_proj.fc2.bias", "caption_projection.linear_2.bias"),
    ("t_embedder.mlp.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "adaln_single.emb.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "adaln_single.emb.timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "adaln_single.emb.timestep_embedder.linear_2.bias"),
    ("t_block.1.weight", "adaln_single.linear.weight"), ("t_block.1.bias", "adaln_single.linear.bias"),
    ("final_layer.linear.weight", "proj_out.weight"), ("final_layer.linear.bias", "proj_out.bias"),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
_MICRO_PAIRS = [(f"{o}_embedder.mlp.{i}.{p}", f"adaln_single.emb.{d}_embedder.linear_{j}.{p}")
                for o, d in (("csize", "resolution"), ("ar", "aspect_ratio"))
                for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")]
# Stored by the release but not weights of the network: the fixed position table and the learned null caption.
_PTH_EXTRAS = ("pos_embed", "y_embedder.y_embedding")


def pth_depth(state: dict) -> int:
    """Number of blocks of an original PixArt state dict."""
    idx = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx or idx != set(range(max(idx) + 1)):
        raise CheckpointError(f"no contiguous blocks.N.* keys (found {sorted(idx)[:8]})")
    return max(idx) + 1


def pixart_pth_to_diffusers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original PixArt names -> diffusers' (= TextDiT's); q/k/v and k/v stacks are split. Extras are dropped."""
    state = dict(state)
    for k in _PTH_EXTRAS:
        state.pop(k, None)
    depth = pth_depth(state)
    pairs = list(_TOP_PAIRS) + (_MICRO_PAIRS if "csize_embedder.mlp.0.weight" in state else [])
    out: dict[str, torch.Tensor] = {}
    missing = []

    def take(k):
        if k not in state:
            missing.append(k)
            return None
        return state.pop(k)

    for i in range(depth):
        pairs += _block_pairs(i)
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            qkv = take(b + f"attn.qkv.{part}")
            if qkv is not None:
                for name, t in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
                    out[d + f"attn1.{name}.{part}"] = t
            kv = take(b + f"cross_attn.kv_linear.{part}")
            if kv is not None:
                for name, t in zip(("to_k", "to_v"), kv.chunk(2, dim=0)):
                    out[d + f"attn2.{name}.{part}"] = t
    for o, d in pairs:
        t = take(o)
        if t is not None:
            out[d] = t
    if missing:
        raise CheckpointError(f"original PixArt state dict lacks {len(missing)} keys: {missing[:5]}")
    if state:
        raise CheckpointError(f"original PixArt state dict has {len(state)} unknown keys: {sorted(state)[:5]} "
                              "(kv-compressed or qk-norm PixArt-Sigma variants are not supported)")
    return out


def diffusers_to_pixart_pth_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' (= TextDiT's) names -> the original PixArt release's (q/k/v and k/v stacked)."""
    state = dict(state)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    pairs = list(_TOP_PAIRS) + (_MICRO_PAIRS if "adaln_single.emb.resolution_embedder.linear_1.weight" in state else [])
    out: dict[str, torch.Tensor] = {}
    for i in range(depth):
        pairs += _block_pairs(i)
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.qkv.{part}"] = torch.cat([state.pop(d + f"attn1.{n}.{part}") for n in ("to_q", "to_k", "to_v")])
            out[b + f"cross_attn.kv_linear.{part}"] = torch.cat([state.pop(d + f"attn2.{n}.{part}") for n in ("to_k", "to_v")])
    for o, d in pairs:
        out[o] = state.pop(d)
    if state:
        raise ValueError(f"unmapped TextDiT tensors: {sorted(state)[:5]}")
    return out


def infer_pixart_pth_config(state: dict[str, torch.Tensor], image_size: int | None = None, variant: str = "sigma",
                            interpolation_scale: float | None = None, num_heads: int | None = None,
                            source: str = "PixArt .pth") -> TextDiTConfig:
    """A TextDiTConfig from an original PixArt state dict's shapes plus what the file cannot tell.

    ``image_size`` (pixels; the latent is image_size / 8) may be omitted when the file stores
    ``pos_embed`` (non-MS PixArt); ``interpolation_scale`` defaults per ``variant``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    try:
        w = state["x_embedder.proj.weight"]
        D, C, p, _ = w.shape
        caption = state["y_embedder.y_proj.fc1.weight"].shape[1]
        out = state["final_layer.linear.weight"].shape[0] // (p * p)
    except KeyError as e:
        raise CheckpointError(f"{source}: not an original PixArt state dict (no {e.args[0]!r})") from None
    depth = pth_depth(state)
    if image_size is None:
        if "pos_embed" not in state:
            raise CheckpointError(f"{source}: the file stores no pos_embed (PixArtMS); pass image_size "
                                  "(--image-size: 256, 512, 1024 or 2048 pixels)")
        grid = math.isqrt(state["pos_embed"].shape[1])
        image_size = grid * p * 8
    if image_size % (8 * p):
        raise CheckpointError(f"{source}: image_size {image_size} is not a multiple of 8 x patch {p}")
    latent = image_size // 8
    if interpolation_scale is None:
        if variant == "sigma":
            if image_size not in SIGMA_INTERPOLATION_SCALE:
                raise CheckpointError(f"{source}: PixArt-Sigma has no published position scale for {image_size} px; "
                                      "pass interpolation_scale")
            interpolation_scale = SIGMA_INTERPOLATION_SCALE[image_size]
        else:
            interpolation_scale = float(max(latent // 64, 1))
    if num_heads is None:
        if D % PIXART_HEAD_DIM:
            raise CheckpointError(f"{source}: width {D} is not PixArt-XL's 72 x heads; pass num_heads")
        num_heads = D // PIXART_HEAD_DIM
    try:
        return TextDiTConfig(input_size=(latent, latent), patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                             num_heads=num_heads, caption_channels=caption, sample_size=latent,
                             interpolation_scale=interpolation_scale, learn_sigma=out == 2 * C,
                             use_additional_conditions="csize_embedder.mlp.0.weight" in state)
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid PixArt config: {e}") from e


def _pth_state(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict or {{'state_dict': ...}} of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pixart_pth(path: str | os.PathLike, image_size: int | None = None, variant: str = "sigma",
                    interpolation_scale: float | None = None, num_heads: int | None = None) -> TextDiT:
    """An original PixArt-alpha / PixArt-Sigma ``.pth`` -> TextDiT (eval, float32); see infer_pixart_pth_config."""
    path = _require(path, "PixArt .pth checkpoint")
    state = _pth_state(path)
    cfg = infer_pixart_pth_config(state, image_size, variant, interpolation_scale, num_heads, str(path))
    model = _new_dit(cfg)
    if "pos_embed" in state:  # the release's fixed table must be the one our config computes
        ours = model.pos_embed.pos_embed
        theirs = state["pos_embed"].float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-5):
            raise CheckpointError(f"{path}: stored pos_embed {tuple(theirs.shape)} differs from the one of image_size "
                                  f"{8 * cfg.input_size[0]} with interpolation_scale {cfg.pos_interpolation_scale}; "
                                  "pass the model's image_size / interpolation_scale / variant")
    return _assign(model, pixart_pth_to_diffusers_state(state), str(path))


def pixart_pth_null_caption(path: str | os.PathLike) -> torch.Tensor | None:
    """The original release's learned null caption ``y_embedder.y_embedding`` (T, C), or None if absent."""
    t = _pth_state(_require(path, "PixArt .pth checkpoint")).get("y_embedder.y_embedding")
    return None if t is None else t.float()


def save_pixart_pth(model: TextDiT, path: str | os.PathLike, null_caption: torch.Tensor | None = None) -> Path:
    """Write the original PixArt release format ``{"state_dict": ...}`` (stored pos_embed for non-MS models)."""
    state = diffusers_to_pixart_pth_state({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if not model.cfg.use_additional_conditions:
        state["pos_embed"] = model.pos_embed.pos_embed.detach().cpu().clone()
    if null_caption is not None:
        state["y_embedder.y_embedding"] = null_caption.detach().cpu()
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))


# ------------------------------------------------------------------------------------------------
# Dispatch


def is_pixart_folder(path: str | os.PathLike) -> bool:
    """A diffusers PixArt transformer folder, or a pipeline folder whose transformer/ is one."""
    p = Path(path)
    if not p.is_dir():
        return False
    config = _model_folder(p) / DIFFUSERS_CONFIG
    if not config.exists():
        return False
    c = read_json(config, "config")
    return c.get("_class_name") in _CLASS_NAMES and c.get("norm_type", "ada_norm_single") == "ada_norm_single"


def load_any_text_teacher(path: str | os.PathLike, image_size: int | None = None, variant: str = "sigma",
                          interpolation_scale: float | None = None, num_heads: int | None = None) -> TextDiT:
    """A text teacher from a diffusers PixArt folder, an original PixArt ``.pth``, or our text-teacher file.

    ``image_size``, ``variant``, ``interpolation_scale`` and ``num_heads`` apply to ``.pth`` files only.
    """
    p = _require(path, "text teacher")
    if p.is_dir():
        if is_pixart_folder(p):
            return load_pixart_diffusers(p)
        ours = sorted(p.glob("*.safetensors"))
        if len(ours) == 1:
            return load_text_teacher(ours[0])
        raise CheckpointError(f"{p}: not a text-teacher folder; expected a diffusers PixArtTransformer2DModel folder "
                              f"({DIFFUSERS_CONFIG} with _class_name PixArtTransformer2DModel) or one .safetensors file")
    if p.suffix.lower() in (".pth", ".pt"):
        return load_pixart_pth(p, image_size, variant, interpolation_scale, num_heads)
    if p.suffix.lower() == ".safetensors":
        return load_text_teacher(p)
    raise CheckpointError(f"{p}: unrecognised text teacher; expected a diffusers PixArt folder, an original PixArt "
                          ".pth, or an ardistill text-teacher .safetensors")
