"""ARDPipeline: folders written and read back (referenced or copied parts), per-image seeds, named errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("diffusers")

from t2i_tiny import tiny_pixart, write_tiny_clip, write_tiny_pixart_pipeline, write_tiny_t5  # noqa: E402

from ardistill.cli import main  # noqa: E402
from ardistill.io.pixart import load_pixart_diffusers  # noqa: E402
from ardistill.io.student_io import save_student  # noqa: E402
from ardistill.models.student import build_student  # noqa: E402
from ardistill.pipeline import ARDPipeline  # noqa: E402
from tolerances import assert_paths_agree  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pixart = write_tiny_pixart_pipeline(root / "pixart")
    teacher = load_pixart_diffusers(pixart)
    student = build_student(teacher, num_steps=3, history_layers=1, block_times=[999.0, 666.0, 333.0])
    save_student(root / "student.safetensors", student)
    return root


@pytest.mark.numerics
def test_pipeline_folder_round_trip_and_seeds(parts, tmp_path):
    pipe = ARDPipeline.from_parts(parts / "student.safetensors", parts / "pixart", parts / "pixart", max_length=10,
                                  device="cpu")
    imgs = pipe(["a photo of a cat", "two dogs"], num_images_per_prompt=2, seed=5, output_type="pt")
    assert imgs.shape == (4, 3, 16, 16) and imgs.abs().max() <= 1
    # per-image seeds: the batch size does not change the images; another seed does
    again = pipe(["a photo of a cat", "two dogs"], num_images_per_prompt=2, seed=5, output_type="pt", batch_size=1)
    # batches of 1 vs 4 run other kernels: float32 rounding of 5 passes in a row (T5, 3 student steps, VAE
    # decoder; measured 1.4e-6 of the scale)
    assert_paths_agree(again, imgs, gain=5)
    assert (pipe("a photo of a cat", seed=6, output_type="pt")[0] - imgs[0]).abs().max() > 1e-3
    ref = pipe.save_pretrained(tmp_path / "referenced")
    index = json.loads((ref / "model_index.json").read_text())
    assert index["student"] == "student.safetensors" and index["text_encoder"].startswith("/")
    copied = pipe.save_pretrained(tmp_path / "copied", copy_parts=True)
    moved = shutil.move(str(copied), str(tmp_path / "moved"))  # relative paths: the folder can move
    for folder in (ref, moved):
        loaded = ARDPipeline.from_pretrained(folder, device="cpu")
        assert loaded.max_length == 10 and loaded.encoder.preprocess == "lower"
        out = loaded(["a photo of a cat", "two dogs"], num_images_per_prompt=2, seed=5, output_type="pt")
        # the same pipeline and batch on weights read back: the same path (the default tolerance is looser)
        torch.testing.assert_close(out, imgs)
    pil = ARDPipeline.from_pretrained(moved, device="cpu")(["a red car"])
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert np.asarray(pil[0]).dtype == np.uint8


def test_errors_name_what_is_missing_or_wrong(parts, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ARDPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_length"):  # a bare weight file: no run to read the prompt length from
        ARDPipeline.from_parts(parts / "student.safetensors", parts / "pixart", device="cpu")
    wide = write_tiny_t5(tmp_path / "t5")  # the same width: accepted
    ARDPipeline.from_parts(parts / "student.safetensors", wide, parts / "pixart", max_length=8, device="cpu")
    clip = write_tiny_clip(tmp_path / "clip")  # a CLIP folder is not a T5 folder
    with pytest.raises(ValueError, match="not a T5 encoder"):
        ARDPipeline.from_parts(parts / "student.safetensors", clip, max_length=8, device="cpu")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    rc = main(["generate", "--prompts", str(prompts), "--student", str(parts / "student.safetensors"),
               "--out", str(tmp_path / "g")])
    assert rc == 2 and "--text-encoder" in capsys.readouterr().err
    rc = main(["generate", "--prompts", str(prompts), "--student", str(parts / "student.safetensors"),
               "--text-encoder", str(tmp_path / "missing-t5"), "--max-length", "8", "--out", str(tmp_path / "g")])
    assert rc == 2 and "missing-t5" in capsys.readouterr().err
    rc = main(["evaluate", "--prompts", str(tmp_path / "g")])
    assert rc == 2 and "--clip" in capsys.readouterr().err
    rc = main(["evaluate", "--prompts", str(tmp_path / "nothing"), "--clip", str(clip)])
    assert rc == 2 and "samples.npz" in capsys.readouterr().err
    # a latent student without its VAE cannot write images
    rc = main(["generate", "--prompts", str(prompts), "--student", str(parts / "student.safetensors"),
               "--text-encoder", str(parts / "pixart"), "--max-length", "8", "--out", str(tmp_path / "g")])
    assert rc == 2 and "--vae" in capsys.readouterr().err


def test_micro_conditioned_teacher_in_a_pipeline(tmp_path):
    tiny_pixart(micro=True, seed=3).save_pretrained(tmp_path / "t")
    teacher = load_pixart_diffusers(tmp_path / "t")
    assert teacher.cfg.use_additional_conditions and teacher.cfg.micro_resolution == (64, 64)
    student = build_student(teacher, num_steps=2, history_layers=1, block_times=[999.0, 500.0])
    save_student(tmp_path / "s.safetensors", student)
    t5 = write_tiny_t5(tmp_path / "t5")
    pipe = ARDPipeline.from_parts(tmp_path / "s.safetensors", t5, max_length=8, device="cpu")
    latents = pipe(["a cat"], output_type="pt")  # no VAE: latents (pixel-space students give images)
    assert latents.shape == (1, 4, 8, 8)
