"""The whole latent pipeline on CPU: image folder -> VAE latents -> record -> distill -> sample -> decode -> metrics.

Everything is tiny and random (an AutoencoderKL built from a config, a latent DiT teacher with random
weights), so the test checks the plumbing and the shapes/determinism, not sample quality.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")

from ardistill.io.checkpoints import save_checkpoint_safetensors  # noqa: E402
from ardistill.evaluation.features import FunctionFeatures  # noqa: E402
from ardistill.data.image_folder import ImageFolder, LatentStore, encode_latents  # noqa: E402
from ardistill.evaluation.metrics import FeatureStats, frechet_distance, precision_recall  # noqa: E402
from ardistill.sampling.ode import randn_from_seeds  # noqa: E402
from ardistill.data.record import RecordConfig, record  # noqa: E402
from ardistill.io.student_io import load_student  # noqa: E402
from ardistill.training.distill import DistillConfig, distill  # noqa: E402
from ardistill.data.trajectory_dataset import TrajectoryDataset  # noqa: E402
from ardistill.data.vae import TINY_VAE_CONFIG, LatentCodec  # noqa: E402
from tiny_teachers import random_dit, tiny_dit_config  # noqa: E402
from tolerances import assert_paths_agree  # noqa: E402




def draw_folder(root: Path) -> Path:
    """2 classes x 4 RGB 32x32 PNGs: red discs and blue squares at varying places."""
    rng = np.random.default_rng(0)
    for cls, colour in (("disc", (220, 40, 40)), ("square", (40, 60, 220))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            im = Image.new("RGB", (32, 32), (240, 240, 230))
            x, y = rng.integers(4, 16, 2)
            box = (int(x), int(y), int(x) + 12, int(y) + 12)
            (ImageDraw.Draw(im).ellipse if cls == "disc" else ImageDraw.Draw(im).rectangle)(box, fill=colour)
            im.save(root / cls / f"{i}.png")
    return root


def pooled(images: torch.Tensor) -> torch.Tensor:
    """A stand-in feature network: 4x4 average-pooled colours (48 numbers per image)."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def test_latent_pipeline_end_to_end(tmp_path):
    # data and codec: 32 px PNGs, ADM crop to 16 px, tiny VAE (2x down) -> 4 x 8 x 8 latents
    data = ImageFolder(draw_folder(tmp_path / "images"), image_size=16, hflip=True)
    codec = LatentCodec.from_config(TINY_VAE_CONFIG, seed=0)
    assert codec.latent_shape(16) == (4, 8, 8)
    summary = encode_latents(data, codec, tmp_path / "latents", batch_size=4, shard_size=4, progress=False)
    real = LatentStore(tmp_path / "latents", verify_checksums=True)
    assert summary.count == len(real) == 8 and real.shape == (4, 8, 8)
    z, labels = real.batch(range(8))
    torch.testing.assert_close(z, codec.encode(torch.stack([data.load(i) for i in range(8)])), atol=2e-3, rtol=2e-3)
    assert labels.tolist() == [0] * 4 + [1] * 4

    # a latent DiT teacher (random weights; DiT's zero init would make it trivial)
    tcfg = tiny_dit_config(num_classes=2)
    teacher = random_dit(tcfg, std=0.05)
    save_checkpoint_safetensors(teacher, tmp_path / "teacher.safetensors")

    # record in latent space (legacy 3-channel guidance, as the ImageNet preset does)
    rcfg = RecordConfig(count=16, num_steps=4, teacher_steps=8, cfg_scale=1.5, guidance_channels=3, shard_size=8,
                        batch_size=8, dtype="float32")
    record(teacher, tmp_path / "rec", rcfg, progress=False)
    traj = TrajectoryDataset(tmp_path / "rec")
    assert traj.batch([0])["inputs"].shape == (1, 4, 4, 8, 8)

    # distil a few steps
    result = distill(DistillConfig(recording=str(tmp_path / "rec"), teacher=str(tmp_path / "teacher.safetensors"),
                                   run_dir=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-3, history_layers=1,
                                   ema_decay=0.5, ckpt_every=3, log_every=1, tensorboard=False, progress=False))
    assert np.isfinite(result.loss)
    student = load_student(tmp_path / "run")
    assert student.cfg.history_layers == 1 and student.cfg.teacher == tcfg

    # sample latents from held-out seeds, decode to images
    seeds = list(range(1000, 1008))
    y = torch.tensor([0, 1] * 4)
    noise = randn_from_seeds(seeds, (4, 8, 8))
    latents = student.sample(noise, y)
    assert latents.shape == (8, 4, 8, 8)
    # a batch of 3 vs 8 runs other kernels: float32 rounding of S = 4 sampler steps
    assert_paths_agree(student.sample(randn_from_seeds(seeds[:3], (4, 8, 8)), y[:3]), latents[:3], gain=4)
    images = codec.decode(latents)
    assert images.shape == (8, 3, 16, 16) and torch.isfinite(images).all()
    teacher_images = codec.decode(traj.batch(range(8))["targets"][:, -1])  # the recorded final samples

    # metrics against the real images, in a stand-in feature space
    net = FunctionFeatures("pooled", pooled)
    real_feats = net.features(torch.stack([data.load(i) for i in range(8)]))
    results = {}
    for name, imgs in (("student", images), ("teacher", teacher_images)):
        feats = net.features(imgs)
        mu, sigma = FeatureStats().update(feats).mu_sigma()
        mu_r, sigma_r = FeatureStats().update(real_feats).mu_sigma()
        pr = precision_recall(real_feats, feats, k=3)
        results[name] = (frechet_distance(mu, sigma, mu_r, sigma_r), float(pr.precision), float(pr.recall))
    for fd, precision, recall in results.values():
        assert np.isfinite(fd) and fd >= 0 and 0 <= precision <= 1 and 0 <= recall <= 1
    # the real set against itself is the zero point of the distance
    mu_r, sigma_r = FeatureStats().update(real_feats).mu_sigma()
    assert frechet_distance(mu_r, sigma_r, mu_r, sigma_r) < 1e-6 < results["student"][0]


def test_encode_latents_cli_with_a_local_vae_folder(tmp_path, capsys):
    from ardistill.cli import main

    data = draw_folder(tmp_path / "images")
    codec = LatentCodec.from_config(TINY_VAE_CONFIG, seed=0)
    codec.vae.save_pretrained(tmp_path / "vae")
    args = ["encode-latents", "--images", str(data), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "z"),
            "--image-size", "16", "--batch-size", "4", "--shard-size", "3", "--num-workers", "0", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    assert "8 latents" in capsys.readouterr().out
    store = LatentStore(tmp_path / "z", verify_checksums=True)
    assert len(store.shards) == 3 and store.manifest["codec"]["source"] == str(tmp_path / "vae")
    z, _ = store.batch([0, 5])
    ds = ImageFolder(data, image_size=16)
    torch.testing.assert_close(z, codec.encode(torch.stack([ds.load(0), ds.load(5)])), atol=2e-3, rtol=2e-3)
    assert main(args) == 0 and "[complete]" in capsys.readouterr().out
    assert main(args + ["--posterior", "sample"]) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err


def _gpu_check():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_markdown_sections_are_replaced_per_card(tmp_path):
    gc = _gpu_check()
    assert gc.card_peak("NVIDIA H100 80GB HBM3") == 989.4e12 and gc.card_peak("NVIDIA H100 PCIe") == 756.0e12
    assert gc.card_peak("NVIDIA H200") == 989.4e12 and gc.card_peak("Some GPU") is None
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    gc.write_markdown(doc, "A", gc.MARK.format("A") + "\nfirst A\n")
    gc.write_markdown(doc, "B", gc.MARK.format("B") + "\nB\n")
    gc.write_markdown(doc, "A", gc.MARK.format("A") + "\nsecond A\n")
    text = doc.read_text()
    assert "intro" in text and "second A" in text and "first A" not in text and text.count("gpu_check: A") == 1
    assert text.index("gpu_check: A") < text.index("gpu_check: B")


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    gc = _gpu_check()
    out = tmp_path / "r.json"
    assert gc.main(["--tiny", "--device", "cpu", "--out", str(out), "--markdown", str(tmp_path / "b.md")]) == 0
    import json
    r = json.loads(out.read_text())
    assert {t["model"] for t in r["train"]} == {"naive reference (full mask, per-token adaLN)", "ARDStudent",
                                                 "ARDStudent + activation checkpointing"}
    assert all(t["step_s"] > 0 for t in r["train"]) and len(r["sampling"]) == 3
    assert all(e["rel_max_err"] < 1e-4 for e in r["equivalence"] if "fp32" in e["check"])
    assert "gpu_check: CPU" in (tmp_path / "b.md").read_text()
    px = r["pixart"]  # the PixArt-XL-2 256 text student, tiny here
    assert len(px["train"]) == 4 and all(t["step_s"] > 0 for t in px["train"]) and len(px["sampling"]) == 2
    assert [e["rel_max_err"] < 1e-4 for e in px["equivalence"] if "fp32" in e["check"]] == [True]
    assert "Text-to-image student of tiny PixArt" in (tmp_path / "b.md").read_text()
