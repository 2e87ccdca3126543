"""The text-conditioned DiT (PixArt form): diffusers parity, CFG, padding invariance, save/load."""

from __future__ import annotations

import pytest
import torch

from ardistill.models.kv_cache import KVCache
from ardistill.models.masks import token_mask
from ardistill.models.layers import unpatchify
from ardistill.models.text_dit import TextDiT, TextDiTConfig, pad_text, text_dit_config
from ardistill.sampling.guidance import make_text_model_fn
from tolerances import assert_paths_agree


def tiny(**kw) -> TextDiT:
    torch.manual_seed(0)
    model = TextDiT(text_dit_config("TextDiT-T", **kw)).eval()
    # A fresh model zeroes its output and cross-attention projections; randomise them so tests see text.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and float(p.abs().sum()) == 0:
                p.normal_(0, 0.05)
    return model


def text_batch(lengths, C=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    text = torch.randn(len(lengths), T, C, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return text * mask[..., None], mask


def _diffusers_twin(cfg: TextDiTConfig):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size, sample_size=cfg.sample_size, patch_size=cfg.patch_size,
        caption_channels=cfg.caption_channels, interpolation_scale=cfg.interpolation_scale,
        use_additional_conditions=False).eval()


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_state_dict_names_match_diffusers_pixart(learn_sigma):
    model = tiny(learn_sigma=learn_sigma)
    ref = _diffusers_twin(model.cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


@pytest.mark.numerics
@pytest.mark.parametrize("size", [(8, 16), (8, 8)])
def test_forward_matches_diffusers_pixart(size):
    model = tiny(input_size=size)
    ref = _diffusers_twin(model.cfg)
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 1, *size)
    t = torch.tensor([5.0, 400.0, 999.0])
    text, mask = text_batch([2, 5, 7])
    with torch.no_grad():
        ours = model(x, t, text, mask)
        theirs = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask.long()).sample
    assert ours.shape == theirs.shape == (3, 1, *size)
    assert_paths_agree(ours, theirs)  # two implementations: float32 rounding only


@pytest.mark.numerics
def test_padding_does_not_change_the_output():
    model = tiny()
    x, t = torch.randn(2, 1, 8, 16), torch.tensor([100.0, 700.0])
    text, mask = text_batch([3, 6])
    with torch.no_grad():
        base = model(x, t, text, mask)
        longer = model(x, t, *pad_text(text, mask, 11))
        garbage = text.clone()
        garbage[~mask] = 7.0  # whatever sits under the padding is never read
        # same shapes and kernels; the padded values only meet exact zeros (masked attention weights): bit-equal
        assert torch.equal(model(x, t, garbage, mask), base)
        alone = model(x[:1], t[:1], text[:1, :3], mask[:1, :3])  # caption 0 in its own, unpadded batch
    # 11 text keys instead of 6, a batch of 1 instead of 2: other shapes, other kernels, float32 rounding
    assert_paths_agree(longer, base)
    assert_paths_agree(alone, base[:1])


@pytest.mark.numerics
def test_text_changes_the_output():
    model = tiny()
    x, t = torch.randn(1, 1, 8, 16).expand(2, -1, -1, -1), torch.tensor([300.0, 300.0])
    text, mask = text_batch([4, 4])
    with torch.no_grad():
        a = model(x, t, text, mask)
        b = model(x, t, text.flip(0), mask)
    # a caption in the other row of the batch may meet other kernel tails: float32 rounding, not bit-equality
    assert_paths_agree(b.flip(0), a)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.numerics
def test_cfg_scale_one_is_the_unguided_model_and_guidance_mixes():
    model = tiny()
    x, t = torch.randn(2, 1, 8, 16), torch.tensor([200.0, 800.0])
    text, mask = text_batch([3, 5])
    null, null_mask = text_batch([1], seed=9)
    with torch.no_grad():
        plain = model(x, t, text, mask)
        fn1 = make_text_model_fn(model, null, null_mask, cfg_scale=1.0)
        assert torch.equal(fn1(x, t, (text, mask)), plain)  # scale 1 is one plain forward: the same call, bit-equal
        uncond = model(x, t, null.expand(2, -1, -1), null_mask.expand(2, -1))
        fn = make_text_model_fn(model, null, null_mask, cfg_scale=3.0)
        guided = fn(x, t, (text, mask))
    # one padded batch of 4 vs two of 2 (other kernels); uncond + w (cond - uncond) carries 2w - 1 = 5 times
    # their rounding
    assert_paths_agree(guided, uncond + 3.0 * (plain - uncond), gain=5)


@pytest.mark.numerics
def test_block_api_per_trajectory_block_with_history_mask_and_cache():
    """Blocks run on K concatenated trajectory blocks with per-block times (the student's layout), and the
    KV-cached one-block-at-a-time run equals the masked full-sequence run."""
    model = tiny()
    B, K, N = 2, 3, model.cfg.num_patches
    xs = torch.randn(B, K, 1, 8, 16)
    times = torch.tensor([999.0, 600.0, 250.0])
    text, mask = text_batch([2, 6])
    with torch.no_grad():
        ctx = model.context(text, mask)
        kvs = ctx.kvs
        h = model.embed(xs.flatten(0, 1)).reshape(B, K * N, -1)
        t_mod, t_emb = model.modulation(times.expand(B, K), ctx)  # (B, K, 6D), (B, K, D)
        full = h
        for block, kv in zip(model.transformer_blocks, kvs):
            full = block(full, t_mod, kv, attn_mask=token_mask("M4", K, N))
        full = model.output(full, t_emb)
        cache = KVCache(model.cfg.depth, "M4")
        steps = []
        for k in range(K):
            hk = h[:, k * N:(k + 1) * N]
            for i, (block, kv) in enumerate(zip(model.transformer_blocks, kvs)):
                hk = block(hk, t_mod[:, k], kv, kv_cache=cache.layer(i))
            cache.advance()
            steps.append(model.output(hk, t_emb[:, k]))
        # The per-block layout (B*K, N, D) reads each sample's text too.
        per_block = h.reshape(B * K, N, -1)
        for block, kv in zip(model.transformer_blocks, kvs):
            per_block = block(per_block, t_mod.reshape(B * K, -1), kv)
        single = [model(xs[:, k], times[k].expand(B), text, mask) for k in range(K)]
    assert_paths_agree(torch.cat(steps, dim=1), full)  # cached vs masked full sequence: two code paths
    per_block = model.output(per_block, t_emb.reshape(B * K, -1))
    imgs = unpatchify(per_block, 2, 1, model.cfg.grid_size).view(B, K, 1, 8, 16)
    for k in range(K):
        assert_paths_agree(imgs[:, k], single[k])  # a batch of B * K blocks vs B images: other shapes


def test_config_validation_and_round_trip():
    cfg = text_dit_config("TextDiT-digits")
    assert TextDiTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_patches == 32 and cfg.grid_size == (4, 8)
    with pytest.raises(ValueError, match="patch_size"):
        TextDiTConfig(input_size=(8, 15), patch_size=2)
    with pytest.raises(ValueError, match="num_heads"):
        TextDiTConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ValueError, match="unknown fields"):
        TextDiTConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="prediction"):
        TextDiTConfig(prediction="x0")
    with pytest.raises(KeyError, match="TextDiT-T"):
        text_dit_config("nope")


def test_rejects_bad_text():
    model = tiny()
    x, t = torch.randn(1, 1, 8, 16), torch.tensor([1.0])
    text, mask = text_batch([3])
    with pytest.raises(ValueError, match="at least one"):
        model(x, t, text, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        model(x, t, text[..., :16], mask)


def test_save_and_load_round_trip(tmp_path):
    from ardistill.io.checkpoints import CheckpointError, load_teacher, load_text_teacher, save_model
    model = tiny()
    path = save_model(model, model.cfg.to_dict(), tmp_path / "t.safetensors", kind="text-teacher")
    back = load_text_teacher(path)
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # load_teacher reads a teacher of either conditioning (the config in the file picks it) ...
    assert load_teacher(path).cfg == model.cfg and load_teacher(path).conditioning.name == "text"
    # ... and load_text_teacher still refuses a class-conditional one, naming the kinds
    from ardistill.io.checkpoints import save_checkpoint_safetensors
    from ardistill.models.dit import build_dit
    class_file = save_checkpoint_safetensors(build_dit("DiT-T/2", input_size=8), tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="not a text-conditioned teacher .kind text-teacher"):
        load_text_teacher(class_file)
