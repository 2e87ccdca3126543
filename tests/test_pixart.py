"""PixArt checkpoints: diffusers folders (single file and sharded) and the original .pth, forward parity with diffusers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ardistill.io.checkpoints import CheckpointError
from ardistill.io.pixart import (diffusers_to_pixart_pth_state, load_any_text_teacher, load_pixart_diffusers,
                                 load_pixart_pth, pixart_pth_null_caption, save_pixart_diffusers, save_pixart_pth)
from ardistill.models.text_dit import TextDiT, TextDiTConfig
from ardistill.models.student import build_student
from tolerances import assert_paths_agree

diffusers = pytest.importorskip("diffusers")

# A tiny PixArt: 2 blocks, width 96 (divisible by 3 for the micro-conditions), 4 heads, 4 latent channels.
TINY = dict(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=96, sample_size=8, patch_size=2, caption_channels=32)


def _diffusers_pixart(micro: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(**{**TINY, **kw}, use_additional_conditions=micro).eval()
    with torch.no_grad():  # random everything (diffusers' init leaves some zeros): every weight must matter
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _same(a: TextDiTConfig, b: TextDiTConfig) -> bool:
    """Equal configs, an unset interpolation_scale read as its default."""
    return replace(a, interpolation_scale=a.pos_interpolation_scale) == replace(b, interpolation_scale=b.pos_interpolation_scale)


def _inputs(B=3, size=8, T=6, C=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, size, size, generator=g)
    t = torch.tensor([3.0, 450.0, 999.0])[:B]
    text = torch.randn(B, T, C, generator=g)
    mask = torch.arange(T)[None] < torch.tensor([2, 6, 4])[:B, None]
    return x, t, text, mask


def _theirs(ref, x, t, text, mask, resolution=None, aspect_ratio=None):
    added = None if resolution is None else {"resolution": resolution, "aspect_ratio": aspect_ratio}
    with torch.no_grad():
        return ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask.long(),
                   added_cond_kwargs=added).sample


@pytest.mark.numerics
@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_folder_loads_with_diffusers_numerics(tmp_path, micro, sharded):
    ref = _diffusers_pixart(micro)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB" if sharded else "10GB")
    assert any(p.name.endswith(".index.json") for p in (tmp_path / "transformer").iterdir()) == sharded
    model = load_pixart_diffusers(tmp_path / "transformer")
    assert model.cfg.use_additional_conditions == micro and model.cfg.learn_sigma
    x, t, text, mask = _inputs()
    if micro:  # PixArt-alpha 1024's pipeline: resolution (H, W) in pixels and H / W, per sample
        res = torch.tensor([[64.0, 64.0], [48.0, 80.0], [64.0, 64.0]])
        ar = (res[:, 0] / res[:, 1])[:, None]
        with torch.no_grad():
            ours = model(x, t, text, mask, resolution=res, aspect_ratio=ar)
            default = model(x, t, text, mask)  # the config's fixed size: 8 x latent = 64 x 64 px
        # ours and diffusers' PixArt: two implementations, equal up to float32 rounding
        assert_paths_agree(ours, _theirs(ref, x, t, text, mask, res, ar))
        square = torch.tensor([[64.0, 64.0]] * 3)
        assert_paths_agree(default, _theirs(ref, x, t, text, mask, square, torch.ones(3, 1)))
        assert (ours[1] - default[1]).abs().max() > 1e-4  # the micro-condition is read
    else:
        with torch.no_grad():
            ours = model(x, t, text, mask)
        assert_paths_agree(ours, _theirs(ref, x, t, text, mask))  # two implementations: float32 rounding
        with pytest.raises(ValueError, match="no micro-conditions"):
            model(x, t, text, mask, resolution=torch.ones(3, 2), aspect_ratio=torch.ones(3, 1))


@pytest.mark.parametrize("micro", [False, True])
def test_our_folder_loads_in_diffusers_and_back(tmp_path, micro):
    ref = _diffusers_pixart(micro, seed=2)
    model = TextDiT(TextDiTConfig(input_size=(8, 8), sample_size=8, in_channels=4, hidden_size=96, depth=2,
                                  num_heads=4, caption_channels=32, use_additional_conditions=micro))
    model.load_state_dict(ref.state_dict(), strict=True)
    save_pixart_diffusers(model, tmp_path / "single")
    save_pixart_diffusers(model, tmp_path / "sharded", max_shard_bytes=30_000)
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    back = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "single").eval()
    x, t, text, mask = _inputs()
    extra = (torch.tensor([[64.0, 64.0]] * 3), torch.ones(3, 1)) if micro else (None, None)
    # one implementation (diffusers) on weights read back from our folder: the same path, so this could be
    # exact; assert_close's default (1.3e-6 relative + 1e-5) is a looser check of the same thing
    torch.testing.assert_close(_theirs(back, x, t, text, mask, *extra), _theirs(ref, x, t, text, mask, *extra))
    for folder in ("single", "sharded"):
        again = load_pixart_diffusers(tmp_path / folder)
        assert again.cfg == model.cfg
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.numerics
@pytest.mark.parametrize("micro", [False, True])
def test_original_pth_round_trip_and_forward(tmp_path, micro):
    ref = _diffusers_pixart(micro, seed=3, interpolation_scale=0.5 if not micro else None)
    folder = tmp_path / "d"
    ref.save_pretrained(folder)
    model = load_pixart_diffusers(folder)
    null = torch.randn(5, 32)
    save_pixart_pth(model, tmp_path / "pixart.pth", null_caption=null)
    raw = torch.load(tmp_path / "pixart.pth", weights_only=True)["state_dict"]
    assert "blocks.1.attn.qkv.weight" in raw and "blocks.0.cross_attn.kv_linear.bias" in raw
    assert ("csize_embedder.mlp.2.weight" in raw) == micro and ("pos_embed" in raw) == (not micro)
    # 64 px: 8 x the 8-token-wide latent; the non-MS file stores pos_embed, so its size is read from it
    kw = dict(image_size=64, variant="alpha") if micro else dict(variant="sigma", interpolation_scale=0.5)
    back = load_pixart_pth(tmp_path / "pixart.pth", num_heads=4, **kw)
    assert _same(back.cfg, model.cfg)
    x, t, text, mask = _inputs()
    extra = (torch.tensor([[64.0, 64.0]] * 3), torch.ones(3, 1)) if micro else (None, None)
    with torch.no_grad():
        assert_paths_agree(back(x, t, text, mask, *extra), _theirs(ref, x, t, text, mask, *extra))  # ours vs diffusers
    assert torch.equal(pixart_pth_null_caption(tmp_path / "pixart.pth"), null)


def test_pth_errors_name_what_is_wrong(tmp_path):
    ref = _diffusers_pixart(True, seed=4)
    ref.save_pretrained(tmp_path / "d")
    model = load_pixart_diffusers(tmp_path / "d")
    save_pixart_pth(model, tmp_path / "ms.pth")
    with pytest.raises(CheckpointError, match="image_size"):  # PixArtMS stores no pos_embed
        load_pixart_pth(tmp_path / "ms.pth", num_heads=4)
    with pytest.raises(CheckpointError, match="num_heads"):  # width 96 is not 72 x heads
        load_pixart_pth(tmp_path / "ms.pth", image_size=64, variant="alpha")
    plain = _diffusers_pixart(False, seed=5, interpolation_scale=0.5)
    plain.save_pretrained(tmp_path / "p")
    save_pixart_pth(load_pixart_diffusers(tmp_path / "p"), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="pos_embed"):  # alpha's scale (1) is not the file's (0.5)
        load_pixart_pth(tmp_path / "plain.pth", num_heads=4, variant="alpha")
    state = diffusers_to_pixart_pth_state(model.state_dict())
    state.pop("blocks.1.mlp.fc2.bias")
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.bias"):
        load_pixart_pth(tmp_path / "broken.pth", image_size=64, num_heads=4, variant="alpha")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pixart_pth(tmp_path / "nowhere.pth")


def test_load_any_text_teacher_dispatches(tmp_path):
    ref = _diffusers_pixart(False, seed=6)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    a = load_any_text_teacher(tmp_path / "pipe")  # a pipeline folder: its transformer/
    save_pixart_pth(a, tmp_path / "t.pth")
    b = load_any_text_teacher(tmp_path / "t.pth", variant="alpha", num_heads=4)  # sample 8 latent -> interpolation scale 1
    assert _same(a.cfg, b.cfg)
    with pytest.raises(CheckpointError, match="not a text-teacher folder"):
        load_any_text_teacher(tmp_path)


@pytest.mark.numerics
def test_student_of_a_micro_conditioned_teacher_caches_exactly(tmp_path):
    ref = _diffusers_pixart(True, seed=7)
    ref.save_pretrained(tmp_path / "d")
    teacher = load_pixart_diffusers(tmp_path / "d")
    student = build_student(teacher, num_steps=3, history_layers=1, block_times=[999.0, 666.0, 333.0]).eval()
    # the student carries the teacher's micro-condition embedders (they are part of its time embedding)
    assert torch.equal(student.adaln_single.emb.resolution_embedder.linear_1.weight,
                       teacher.adaln_single.emb.resolution_embedder.linear_1.weight)
    _, _, text, mask = _inputs()
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = student.sample(noise, text, mask, return_all=True)
    with torch.no_grad():
        tf = student(torch.cat([noise[:, None], outs[:, :-1]], dim=1), text, mask)
    assert_paths_agree(tf, outs)  # cached sampler vs masked teacher-forced pass: two code paths
