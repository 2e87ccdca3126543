"""Latent codecs: a tiny random AutoencoderKL from a config, saved and reloaded from a local folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from ardistill.data.vae import SD_VAE_SCALE, TINY_VAE_CONFIG, IdentityCodec, LatentCodec, load_codec  # noqa: E402
from tolerances import assert_paths_agree  # noqa: E402


@pytest.fixture(scope="module")
def codec() -> LatentCodec:
    return LatentCodec.from_config(TINY_VAE_CONFIG, seed=0)


def test_scale_constant_is_dits():
    assert SD_VAE_SCALE == 0.18215


def test_encode_is_scaled_posterior_mean(codec):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert codec.latent_shape(16) == (4, 8, 8)
    ref = codec.vae.encode(x).latent_dist.mean * SD_VAE_SCALE
    torch.testing.assert_close(z, ref)


def test_decode_undoes_the_scale(codec):
    z = torch.randn(2, 4, 8, 8)
    img = codec.decode(z)
    assert img.shape == (2, 3, 16, 16)
    torch.testing.assert_close(img, codec.vae.decode(z / SD_VAE_SCALE).sample)


@pytest.mark.numerics
def test_micro_batching_does_not_change_results(codec):
    # batches of 2 vs 5 run other conv and attention kernels: float32 rounding (measured 7e-7 of the scale)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    small = LatentCodec(codec.vae, batch_size=2)
    assert_paths_agree(small.encode(x), codec.encode(x))
    z = torch.randn(5, 4, 8, 8)
    assert_paths_agree(small.decode(z), codec.decode(z))


@pytest.mark.numerics
def test_posterior_sample_depends_only_on_each_images_seed(codec):
    sampler = LatentCodec(codec.vae, posterior="sample", batch_size=2)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    a = sampler.encode(x, seeds=[7, 8, 9])
    b = sampler.encode(x[1:], seeds=[8, 9])
    assert_paths_agree(a[1:], b)  # micro-batches [0, 1], [2] vs [1, 2]: other batch compositions, other kernels
    assert not torch.allclose(a, codec.encode(x))  # noise was added
    with pytest.raises(ValueError, match="one seed per image"):
        sampler.encode(x)


def test_shape_errors_name_the_expectation(codec):
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(B, 4, h, w\)"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        codec.latent_shape(15)


def test_from_pretrained_loads_a_local_folder(codec, tmp_path):
    codec.vae.save_pretrained(tmp_path / "vae")
    loaded = load_codec(tmp_path / "vae")
    assert isinstance(loaded, LatentCodec) and loaded.describe()["source"] == str(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(x), codec.encode(x))


def test_from_pretrained_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LatentCodec.from_pretrained(tmp_path / "nowhere")


def test_identity_codec():
    c = load_codec(None, channels=1)
    assert isinstance(c, IdentityCodec)
    x = torch.randn(2, 1, 8, 8)
    assert c.encode(x) is x and c.decode(x) is x
    assert c.latent_shape(8) == (1, 8, 8)
