"""Teacher checkpoints: original DiT .pt files, diffusers folders, our safetensors format, and every bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ardistill.io.checkpoints import (CheckpointError, diffusers_to_dit_state, dit_to_diffusers_state, load_any_teacher,
                                   load_diffusers_dit, load_dit_pt, load_state_and_config, load_teacher,
                                   save_checkpoint_safetensors, save_diffusers_dit, save_model)
from ardistill.models.dit import DiTConfig
from tolerances import assert_paths_agree


# The torch.equal checks of _out() below compare our DiT holding weights read back from a file with our DiT
# holding the originals: the same code and kernels on the same inputs and shapes, so bit-equality is valid.
def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture
def src(random_dit, dit_inputs):
    """A random tiny DiT and inputs for it."""
    model = random_dit(seed=3)
    return model, dit_inputs(model.cfg)


# ------------------------------------------------------------------------------------------------
# Original DiT .pt files


def test_bare_state_dict_infers_config_and_loads(tmp_path, src):
    model, inputs = src
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    loaded = load_dit_pt(tmp_path / "DiT-tiny.pt")
    assert loaded.cfg == model.cfg and not loaded.training
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    assert not loaded.pos_embed.requires_grad and loaded.blocks[0].attn.qkv.weight.requires_grad


@pytest.mark.parametrize("overrides", [dict(learn_sigma=False), dict(patch_size=4, in_channels=3, num_classes=7),
                                       dict(hidden_size=128, depth=3, input_size=16, mlp_ratio=2.0)])
def test_config_inference_over_shapes(tmp_path, random_dit, overrides):
    model = random_dit(**overrides)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert load_dit_pt(tmp_path / "m.pt").cfg == model.cfg  # 128 wide -> 4 heads (the digits size)


def test_training_checkpoint_ema_and_model(tmp_path, random_dit, dit_inputs):
    model, ema = random_dit(seed=1), random_dit(seed=2)
    inputs = dit_inputs(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(*inputs).sum().backward()
    opt.step()
    # exactly what DiT's train.py writes, args Namespace included
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=10, global_seed=0)}
    torch.save(ckpt, tmp_path / "0100000.pt")
    default, as_model = load_dit_pt(tmp_path / "0100000.pt"), load_dit_pt(tmp_path / "0100000.pt", which="model")
    assert torch.equal(_out(default, inputs), _out(ema.eval(), inputs))  # EMA by default
    assert torch.equal(_out(as_model, inputs), _out(model.eval(), inputs))
    with pytest.raises(ValueError, match="which"):
        load_dit_pt(tmp_path / "0100000.pt", which="opt")
    torch.save({"model": model.state_dict()}, tmp_path / "no_ema.pt")
    assert torch.equal(_out(load_dit_pt(tmp_path / "no_ema.pt"), inputs), _out(model, inputs))
    with pytest.raises(CheckpointError, match=r"no_ema.pt.*no 'ema' entry"):
        load_dit_pt(tmp_path / "no_ema.pt", which="ema")


def test_num_heads_cannot_be_inferred_for_unregistered_widths(tmp_path, random_dit, dit_inputs):
    model = random_dit(hidden_size=80, num_heads=8)
    torch.save(model.state_dict(), tmp_path / "w80.pt")
    with pytest.raises(CheckpointError, match=r"w80.pt.*hidden size 80.*num_heads"):
        load_dit_pt(tmp_path / "w80.pt")
    loaded = load_dit_pt(tmp_path / "w80.pt", num_heads=8)
    assert loaded.cfg == model.cfg
    inputs = dit_inputs(model.cfg)
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    # args.model of a training checkpoint names the size, hence the heads
    m64 = random_dit(num_heads=2)
    torch.save({"ema": m64.state_dict(), "args": argparse.Namespace(model="DiT-T/2")}, tmp_path / "t.pt")
    assert load_dit_pt(tmp_path / "t.pt").cfg.num_heads == 4  # the registry size the args name
    assert load_dit_pt(tmp_path / "t.pt", num_heads=2).cfg == m64.cfg


def test_explicit_config_and_wrapper_prefixes(tmp_path, src):
    model, inputs = src
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert torch.equal(_out(load_dit_pt(tmp_path / "ddp.pt", cfg=model.cfg), inputs), _out(model, inputs))
    wrong = DiTConfig(**{**model.cfg.to_dict(), "hidden_size": 32})
    with pytest.raises(CheckpointError, match=r"ddp.pt: 31 shape mismatches: pos_embed \(file \(1, 16, 64\), model \(1, 16, 32\)\), "
                       r"x_embedder.proj.weight \(file \(64, 4, 2, 2\), model \(32, 4, 2, 2\)\)"):
        load_dit_pt(tmp_path / "ddp.pt", cfg=wrong)
    with pytest.raises(ValueError, match="contradicts"):
        load_dit_pt(tmp_path / "ddp.pt", cfg=model.cfg, num_heads=2)


def test_pt_key_errors_name_the_keys_and_file(tmp_path, src):
    model, _ = src
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: 4 missing keys: blocks.1.mlp.fc1.weight, blocks.1.mlp.fc1.bias"):
        load_dit_pt(tmp_path / "missing.pt")
    extra = {**sd, **{f"extra.{i}": torch.zeros(1) for i in range(7)}}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra.pt: 7 unexpected keys: extra.0, .*\(\+2 more\)"):
        load_dit_pt(tmp_path / "extra.pt")
    bad = {**sd, "blocks.0.attn.proj.bias": torch.zeros(65)}
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape.pt: 1 shape mismatches: blocks.0.attn.proj.bias \(file \(65,\), model \(64,\)\)"):
        load_dit_pt(tmp_path / "shape.pt")
    no_embed = {k: v for k, v in sd.items() if k != "x_embedder.proj.weight"}
    torch.save(no_embed, tmp_path / "noembed.pt")
    with pytest.raises(CheckpointError, match=r"noembed.pt: cannot infer .*'x_embedder.proj.weight'"):
        load_dit_pt(tmp_path / "noembed.pt")


class _NotAllowed:
    pass


def test_pt_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_dit_pt(tmp_path / "nope.pt")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes.pt is not a checkpoint that torch.load\(weights_only=True\)"):
        load_dit_pt(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is not a checkpoint"):
        load_dit_pt(tmp_path / "empty.pt")
    torch.save({"model": _NotAllowed()}, tmp_path / "code.pt")  # arbitrary objects are refused, not built
    with pytest.raises(CheckpointError, match=r"code.pt is not a checkpoint.*_NotAllowed"):
        load_dit_pt(tmp_path / "code.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="tensor.pt: expected a state dict .* got Tensor"):
        load_dit_pt(tmp_path / "tensor.pt")
    torch.save({"step": 3, "lr": 1e-4}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: neither a state dict .* top-level keys: lr, step"):
        load_dit_pt(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------------
# diffusers folders (written by us; a real diffusers model below)


def test_diffusers_folder_round_trip_equals_pt(tmp_path, src):
    model, inputs = src
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_diffusers_dit(model, tmp_path / "transformer")
    cfg = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel" and cfg["attention_head_dim"] == 16
    names = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert "transformer_blocks.1.attn1.to_v.bias" in names and "pos_embed.proj.weight" in names
    assert not any(k.startswith(("blocks.", "pos_embed.pos_embed")) for k in names)
    from_diffusers, from_pt = load_diffusers_dit(tmp_path / "transformer"), load_dit_pt(tmp_path / "m.pt")
    assert from_diffusers.cfg == model.cfg
    ref = _out(model, inputs)
    assert torch.equal(_out(from_diffusers, inputs), ref) and torch.equal(_out(from_pt, inputs), ref)
    # a pipeline folder (model_index.json + transformer/) resolves to its transformer
    (tmp_path / "model_index.json").write_text("{}")
    assert torch.equal(_out(load_diffusers_dit(tmp_path), inputs), ref)


def test_name_mapping_is_a_bijection(src):
    model, _ = src
    sd = model.state_dict()
    theirs = dit_to_diffusers_state(sd, model.cfg.depth)
    back = diffusers_to_dit_state(theirs, model.cfg.depth)
    assert set(back) == set(sd) - {"pos_embed"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    q, k, v = (theirs[f"transformer_blocks.0.attn1.to_{n}.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["blocks.0.attn.qkv.weight"])  # qkv rows are [q | k | v]


def _write_shards(folder, state, n=3):
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_diffusers_sharded_and_bin_weights(tmp_path, src):
    model, inputs = src
    save_diffusers_dit(model, tmp_path / "one")
    state = load_file(tmp_path / "one" / "diffusion_pytorch_model.safetensors")
    for name in ("sharded", "bin"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    _write_shards(tmp_path / "sharded", state)
    torch.save(state, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    ref = _out(model, inputs)
    assert torch.equal(_out(load_diffusers_dit(tmp_path / "sharded"), inputs), ref)
    assert torch.equal(_out(load_diffusers_dit(tmp_path / "bin"), inputs), ref)
    (tmp_path / "sharded" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00003"):
        load_diffusers_dit(tmp_path / "sharded")


def test_diffusers_folder_errors(tmp_path, src):
    model, _ = src
    folder = tmp_path / "d"
    save_diffusers_dit(model, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    good_state, good_cfg = load_file(weights), json.loads((folder / "config.json").read_text())

    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"d/config.json"):
        load_diffusers_dit(folder)
    for field, value, match in [("_class_name", "UNet2DModel", "_class_name 'UNet2DModel'"),
                                ("norm_type", "ada_norm", "norm_type = 'ada_norm'"),
                                ("activation_fn", "geglu", "activation_fn"),
                                ("out_channels", 5, "out_channels 5"),
                                ("patch_size", None, "patch_size must be an integer")]:
        (folder / "config.json").write_text(json.dumps({**good_cfg, field: value}))
        with pytest.raises(CheckpointError, match=rf"d/config.json: .*{match}"):
            load_diffusers_dit(folder)
    (folder / "config.json").write_text(json.dumps(good_cfg))

    renamed = {k.replace("attn1.to_out.0", "attn1.out_proj"): v for k, v in good_state.items()}
    save_file(renamed, weights)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: 4 missing keys: "
                       r"transformer_blocks.0.attn1.to_out.0.weight.*4 unexpected keys: transformer_blocks.0.attn1.out_proj"):
        load_diffusers_dit(folder)
    untied = dict(good_state)
    untied["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] = torch.ones(64)
    save_file(untied, weights)
    with pytest.raises(CheckpointError, match=r"transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias "
                       r"differs from block 0's copy"):
        load_diffusers_dit(folder)
    weights.write_text("not safetensors")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a readable safetensors"):
        load_diffusers_dit(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no diffusers weights"):
        load_diffusers_dit(folder)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        load_diffusers_dit(tmp_path / "missing_folder")


def test_save_diffusers_refuses_what_diffusers_cannot_hold(tmp_path, random_dit):
    with pytest.raises(ValueError, match="mlp_ratio"):
        save_diffusers_dit(random_dit(mlp_ratio=2.0), tmp_path / "a")
    with pytest.raises(ValueError, match="null-class"):
        save_diffusers_dit(random_dit(class_dropout_prob=0.0), tmp_path / "b")
    flow = random_dit(prediction="velocity")
    save_diffusers_dit(flow, tmp_path / "c")
    assert load_diffusers_dit(tmp_path / "c").cfg.prediction == "velocity"  # kept in a "_" key diffusers ignores


# ------------------------------------------------------------------------------------------------
# A real diffusers DiTTransformer2DModel


@pytest.fixture(scope="module")
def diffusers_dit_cls():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers.DiTTransformer2DModel


def _real_diffusers_model(cls, seed=0):
    m = cls(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()  # diffusers' default norm_eps 1e-5
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        emb0 = m.transformer_blocks[0].norm1.emb
        for block in m.transformer_blocks[1:]:  # converted DiT checkpoints hold identical copies
            block.norm1.emb.load_state_dict(emb0.state_dict())
    return m


@pytest.mark.numerics
def test_real_diffusers_model_loads_with_the_same_weights(tmp_path, diffusers_dit_cls, dit_inputs):
    theirs = _real_diffusers_model(diffusers_dit_cls)
    theirs.save_pretrained(tmp_path / "real")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_diffusers_dit(tmp_path / "real")
    assert ours.cfg == DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                 num_classes=10)
    mapped = dit_to_diffusers_state(ours.state_dict(), 2)
    assert mapped.keys() == theirs.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in theirs.state_dict().items())
    x, t, y = dit_inputs(ours.cfg)
    ref = _out(ours, (x, t, y))
    assert torch.equal(_out(load_diffusers_dit(tmp_path / "sharded"), (x, t, y)), ref)
    with torch.no_grad():
        raw = theirs(x, t, class_labels=y).sample
        # diffusers' forward differs by its timestep frequencies (i / (half - 1)) and pre-MLP eps (1e-5):
        diff = (raw - ref).abs().amax(dim=(1, 2, 3))
        assert diff[0] < 1e-4 and diff[1:].min() > 1e-2  # t = 0: sinusoid identical; t = 500, 999: not
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's frequencies i / half
        # eps only: 1e-5 vs 1e-6 moves the outputs by 1.3e-5, rounding of two implementations by ~1e-6 (of 2.7)
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, ref, atol=1e-4, rtol=0)


@pytest.mark.numerics
def test_our_diffusers_folder_loads_in_diffusers(tmp_path, diffusers_dit_cls, src):
    model, (x, t, y) = src
    save_diffusers_dit(model, tmp_path / "d")
    theirs = diffusers_dit_cls.from_pretrained(tmp_path / "d").eval()
    assert theirs.config.norm_eps == 1e-6
    with torch.no_grad():
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        # diffusers' DiT and ours are two implementations (separate q/k/v projections vs one fused qkv, their
        # own timestep and norm modules): bit-identical on the CPUs measured, but only float32 rounding is
        # guaranteed across BLAS builds and instruction sets
        assert_paths_agree(theirs(x, t, class_labels=y).sample, model(x, t, y))


def test_fresh_diffusers_model_has_untied_embedders(tmp_path, diffusers_dit_cls):
    m = diffusers_dit_cls(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=4,
                          patch_size=2, num_embeds_ada_norm=3)
    m.save_pretrained(tmp_path / "fresh")
    with pytest.raises(CheckpointError, match="differs from block 0's copy"):
        load_diffusers_dit(tmp_path / "fresh")


# ------------------------------------------------------------------------------------------------
# Our safetensors format and dispatch


def test_our_format_round_trip(tmp_path, src):
    model, inputs = src
    path = save_checkpoint_safetensors(model, tmp_path / "teacher.safetensors", extra_metadata={"step": 1200, "note": "x"})
    loaded = load_teacher(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    state, config, meta = load_state_and_config(path)
    assert config == model.cfg.to_dict() and set(state) == set(model.state_dict())
    assert (meta["format"], meta["kind"], meta["step"], meta["note"]) == ("ardistill", "dit", "1200", "x")
    assert list(tmp_path.iterdir()) == [path]  # atomic: no temp files left
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint_safetensors(model, tmp_path / "t2.safetensors", extra_metadata={"config": "{}"})


def test_save_model_generic_and_kind_check(tmp_path):
    lin = torch.nn.Linear(3, 2)
    lin.extra = torch.nn.Parameter(lin.weight.data[0])  # shares storage: must still save
    save_model(lin, {"width": 3}, tmp_path / "student.safetensors", kind="ard_student")
    state, config, meta = load_state_and_config(tmp_path / "student.safetensors")
    assert config == {"width": 3} and meta["kind"] == "ard_student"
    assert torch.equal(state["extra"], lin.weight.data[0]) and torch.equal(state["weight"], lin.weight.data)
    with pytest.raises(CheckpointError, match="student.safetensors holds a 'ard_student' model, not a DiT teacher"):
        load_teacher(tmp_path / "student.safetensors")


def test_teacher_kind_written_by_teacher_training_loads(tmp_path, src):
    model, inputs = src
    save_model(model, model.cfg.to_dict(), tmp_path / "teacher.safetensors", kind="teacher")
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 10}}))  # a run's config: not the model's
    assert torch.equal(_out(load_any_teacher(tmp_path), inputs), _out(model, inputs))


def test_config_json_beside_a_plain_safetensors(tmp_path, src):
    model, inputs = src
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"weights.safetensors has no 'config' .*/config.json beside it"):
        load_teacher(tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    assert torch.equal(_out(load_teacher(tmp_path / "weights.safetensors"), inputs), _out(model, inputs))
    assert torch.equal(_out(load_any_teacher(tmp_path), inputs), _out(model, inputs))
    (tmp_path / "config.json").write_text(json.dumps({**model.cfg.to_dict(), "depth": "two"}))
    with pytest.raises(CheckpointError, match="weights.safetensors: invalid DiT config"):
        load_teacher(tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**model.cfg.to_dict(), "widht": 3}))
    with pytest.raises(CheckpointError, match=r"weights.safetensors: invalid DiT config: .*widht"):
        load_teacher(tmp_path / "weights.safetensors")


def test_load_any_teacher_dispatch(tmp_path, src):
    model, inputs = src
    ref = _out(model, inputs)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    save_checkpoint_safetensors(model, tmp_path / "b.safetensors")
    save_diffusers_dit(model, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for p in ("a.pt", "b.safetensors", "pipe", "pipe/transformer",
              "pipe/transformer/diffusion_pytorch_model.safetensors"):
        assert torch.equal(_out(load_any_teacher(tmp_path / p), inputs), ref), p
    (tmp_path / "weights.npz").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match=r"weights.npz: unrecognised teacher checkpoint"):
        load_any_teacher(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: not a teacher folder"):
        load_any_teacher(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_any_teacher(tmp_path / "nothing.pt")
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable safetensors file"):
        load_any_teacher(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_teacher(tmp_path / "gone.safetensors")
