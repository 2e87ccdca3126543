"""The PixArt recipe of docs/t2i.md, run line by line at tiny size: embed -> record -> distil -> generate ->
evaluate -> export -> ARDPipeline; plus CLIP score on a tiny random CLIP."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("diffusers")

from t2i_tiny import write_tiny_clip, write_tiny_pixart_pipeline  # noqa: E402

from ardistill.cli import main  # noqa: E402
from ardistill.evaluation.adm import write_adm_npz  # noqa: E402
from ardistill.evaluation.clip_score import CLIPScorer, CLIPScoreStats, clip_score  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "t2i.md"
TRAIN = ["a photo of a cat", "two red cars under the sky", "a big house on the tree", "a small blue dog"]
EVAL = ["a photo of a cat", "a red house", "three dogs", "the blue sky", "a big tree", "two small cars"]


def recipe_commands(variables: dict[str, str]) -> list[list[str]]:
    """The ardistill command lines of the doc's recipe block, variables substituted, torchrun prefix dropped."""
    text = DOC.read_text()
    block = text.split("<!-- t2i-recipe -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    doc_vars = dict(re.findall(r"(?:^|\s)([A-Z_]+)=(\S+)", "\n".join(
        ln.split("#")[0] for ln in block.splitlines() if not ln.startswith(("ardistill", "torchrun")))))
    assert set(doc_vars) == set(variables), f"the doc's variables {sorted(doc_vars)} changed"
    out = []
    for line in block.splitlines():
        if not line.startswith(("ardistill ", "torchrun ")):
            continue
        for name in sorted(variables, key=len, reverse=True):
            line = line.replace(f"${name}", variables[name])
        argv = shlex.split(line)
        if argv[0] == "torchrun":
            argv = argv[argv.index("ardistill"):]
        out.append(argv[1:])
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    pixart = write_tiny_pixart_pipeline(root / "pixart")
    clip = write_tiny_clip(root / "clip")
    ref = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    write_adm_npz(root / "ref.npz", ref)
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    return root


def test_the_documented_recipe_runs_end_to_end(parts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the doc writes under runs/
    variables = {"PIXART": str(parts / "pixart"), "CLIP": str(parts / "clip"), "REF": str(parts / "ref.npz"),
                 "PROMPTS": str(parts / "train.txt"), "EVAL_PROMPTS": str(parts / "eval.txt"),
                 "COUNT": "8", "STEPS": "4", "BATCH": "4", "NH": "1", "NPROC": "1"}
    commands = recipe_commands(variables)
    assert [c[0] for c in commands] == ["embed-prompts", "record", "record", "distill", "distill", "generate",
                                        "evaluate", "export-pipeline"]
    tiny = {"embed-prompts": ["--device", "cpu"], "record": ["--device", "cpu", "--no-progress"],
            "distill": ["--device", "cpu", "--no-progress", "--no-tensorboard", "--ckpt-every", "4"],
            "generate": ["--device", "cpu"], "evaluate": ["--device", "cpu", "--batch-size", "8"]}
    for argv in commands:
        rc = main(argv + tiny.get(argv[0], []))
        assert rc == 0, f"{argv}: {capsys.readouterr().err[-2000:]}"
    runs = tmp_path / "runs" / "sigma256"
    for s in (3, 4):
        assert json.loads((runs / f"rec-s{s}" / "manifest.json").read_text())["sampler"]["cfg_scale"] == 4.5
        assert (runs / f"ard-s{s}" / "ema.safetensors").exists()
    rows = [json.loads(ln) for ln in (runs / "gen-s3" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == EVAL and len(list((runs / "gen-s3" / "images").glob("*.png"))) == 6
    report = json.loads((runs / "eval-s3.json").read_text())
    assert report["num_samples"] == 6 and 0 <= report["clip_score"] <= 100
    assert np.isfinite(report["fd"]) and report["feature_network"] == "clip" and report["num_reference"] == 12

    from ardistill.pipeline import ARDPipeline
    pipe = ARDPipeline.from_pretrained(runs / "pipeline-s3")
    images = pipe(["a photo of a cat"], num_images_per_prompt=4)
    assert len(images) == 4 and images[0].size == (16, 16) and images[0].mode == "RGB"
    # image 0 (seed 0) is generate's first sample (the same prompt and seed, another batch)
    from ardistill.evaluation.adm import read_adm_npz
    first = read_adm_npz(runs / "gen-s3" / "samples.npz").images()[0].astype(int)
    assert np.abs(np.asarray(images[0]).astype(int) - first).max() <= 1
    assert pipe.student.cfg.num_steps == 3 and pipe.student.cfg.history_layers == 1
    # the student file carries the prompt encoding (max length, preprocessing, storage dtype) of its store
    from ardistill.io.student_io import read_student_file
    meta = read_student_file(runs / "ard-s3" / "ema.safetensors")[2]
    assert json.loads(meta["prompt_encoding"]) == {"max_length": 300, "preprocess": "lower", "embedding_dtype": "float16"}


@pytest.mark.numerics
def test_clip_score_streams_and_matches_a_direct_computation(parts):
    scorer = CLIPScorer(parts / "clip")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8, generator=g)
    prompts = ["a cat", "a red car", "the sky", "two dogs", "a house"]
    whole = scorer.scores(images, prompts)
    assert whole.shape == (5,) and (whole >= 0).all() and (whole <= 100).all()
    streamed = clip_score(scorer, images, prompts, batch_size=2)
    # batches of 2 vs 5 through CLIP run other kernels: float32 rounding of scores of ~30 (measured 7e-6, 2.3e-7
    # of the largest score); the bound is 1e-5 of it (tests/tolerances.py)
    assert streamed.count == 5 and abs(streamed.mean - float(whole.mean())) <= 1e-5 * float(whole.abs().max())
    # the definition: 100 * max(cos, 0) of CLIP's projected embeddings, computed by hand
    m = scorer.model
    pix = scorer.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    tok = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        b = m.text_projection(m.text_model(**tok).pooler_output)
    ref = (100 * torch.nn.functional.cosine_similarity(a, b)).clamp(min=0)
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
    float_images = images.float() / 127.5 - 1  # [-1, 1] floats are quantised as saved samples are
    torch.testing.assert_close(scorer.scores(float_images, prompts), whole, atol=1e-4, rtol=1e-4)
    merged = CLIPScoreStats().update(whole[:2]).merge(CLIPScoreStats().update(whole[2:]))
    assert merged.count == 5 and abs(merged.std - float(whole.std(unbiased=False))) < 1e-4
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer.scores(images, prompts[:4])
    with pytest.raises(FileNotFoundError, match="no-clip"):
        CLIPScorer(parts / "no-clip")


def test_original_pth_teacher_records_and_distils(parts, tmp_path):
    """A PixArt .pth teacher: record needs its image size; distil finds it again through the recording's manifest."""
    from ardistill.io.pixart import load_pixart_diffusers, save_pixart_pth
    save_pixart_pth(load_pixart_diffusers(parts / "pixart"), tmp_path / "pixart.pth")
    assert main(["embed-prompts", "--prompts", str(parts / "train.txt"), "--text-encoder", str(parts / "pixart"),
                 "--out", str(tmp_path / "prompts"), "--max-length", "12", "--device", "cpu"]) == 0
    # the file stores pos_embed (non-MS PixArt), so the size is read from it; alpha's position scale at 64 px
    rec = ["record", "--teacher", str(tmp_path / "pixart.pth"), "--prompt-store", str(tmp_path / "prompts"),
           "--out", str(tmp_path / "rec"), "--count", "4", "--num-steps", "2", "--teacher-steps", "6",
           "--cfg-scale", "4.5", "--variant", "alpha", "--num-heads", "4", "--device", "cpu", "--no-progress"]
    assert main(rec) == 0
    assert main(["distill", "--recording", str(tmp_path / "rec"), "--teacher", str(tmp_path / "pixart.pth"),
                 "--run-dir", str(tmp_path / "run"), "--history-layers", "1", "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--no-progress", "--no-tensorboard", "--ckpt-every", "2"]) == 0
    assert (tmp_path / "run" / "ema.safetensors").exists()


def test_vae_folder_uses_its_own_scaling_factor(tmp_path):
    from ardistill.data.vae import TINY_VAE_CONFIG, LatentCodec, load_vae_folder
    vae = LatentCodec.from_config({**TINY_VAE_CONFIG, "scaling_factor": 0.13025}).vae  # SDXL VAE's factor
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    codec = load_vae_folder(tmp_path / "pipe")  # a pipeline folder: its vae/
    assert codec.scale == 0.13025
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z / 0.13025).sample
    torch.testing.assert_close(codec.decode(z), ref)
    with pytest.raises(FileNotFoundError, match="no-vae"):
        load_vae_folder(tmp_path / "no-vae")
