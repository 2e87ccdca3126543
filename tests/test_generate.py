"""Few-step generation to ADM .npz / PNG, and evaluation of .npz batches."""

import numpy as np
import pytest
import torch

from ardistill.evaluation.adm import read_adm_npz, to_uint8_nhwc, write_adm_npz
from ardistill.models.dit import build_dit
from ardistill.evaluation.evaluate import evaluate_npz
from ardistill.evaluation.features import FunctionFeatures
from ardistill.generate import balanced_labels, generate, sample_student, student_grid_png
from ardistill.models.student import build_student
from ardistill.io.student_io import save_student
from tiny_teachers import random_from_global_rng


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    t = random_from_global_rng(lambda: build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10,
                                                 learn_sigma=False), std=0.05)
    st = build_student(t, num_steps=3, history_layers=1, block_times=[999.0, 666.0, 333.0])
    path = tmp_path_factory.mktemp("student") / "ema.safetensors"
    save_student(path, st)
    return path


def test_generate_npz_is_batch_size_independent_and_ordered(student_file, tmp_path):
    a = generate(student_file, tmp_path / "a.npz", num_samples=13, batch_size=4, progress=False)
    b = generate(student_file, tmp_path / "b.npz", num_samples=13, batch_size=13, progress=False)
    A, B = read_adm_npz(a, require_images=True), read_adm_npz(b, require_images=True)
    assert A.images().shape == (13, 8, 8, 1) and A.images().dtype == np.uint8
    assert np.array_equal(A.labels, balanced_labels(np.arange(13), 10))
    # per-sample seeds: uint8 images agree whatever the batch size (float bits may differ by rounding)
    assert np.abs(A.images().astype(int) - B.images().astype(int)).max() <= 1
    assert not list(tmp_path.glob("*.rank*"))  # rank files merged and removed


def test_sample_student_matches_npz_and_png(student_file, tmp_path):
    from ardistill.io.student_io import load_student
    st = load_student(student_file)
    imgs = sample_student(st, [0, 1, 2], torch.tensor([0, 1, 2]))
    out = generate(student_file, tmp_path / "s.npz", num_samples=3, progress=False)
    # generate samples the same 3 seeds in one batch with the same sampler: the same path, so exact
    assert np.array_equal(read_adm_npz(out, require_images=True).images(), to_uint8_nhwc(imgs))
    png = student_grid_png(student_file, tmp_path / "g.png", seeds=list(range(10)), scale=2)
    from PIL import Image
    assert Image.open(png).size[0] > 10 * 16


def test_evaluate_npz_identical_sets_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    write_adm_npz(tmp_path / "ref.npz", ref)
    write_adm_npz(tmp_path / "same.npz", ref)
    net = FunctionFeatures("pixels", lambda x: x.float().flatten(1)[:, :16])
    r = evaluate_npz(tmp_path / "same.npz", tmp_path / "ref.npz", net)
    assert abs(r["fd"]) < 1e-6 and r["precision"] == 1.0 and r["recall"] == 1.0
    shifted = np.clip(ref.astype(int) + 60, 0, 255).astype(np.uint8)
    write_adm_npz(tmp_path / "shift.npz", shifted)
    assert evaluate_npz(tmp_path / "shift.npz", tmp_path / "ref.npz", net)["fd"] > 100
    with pytest.raises(ValueError, match="mu"):
        evaluate_npz(tmp_path / "same.npz", tmp_path / "ref.npz", net, reference_stats="file")
    with pytest.raises(FileNotFoundError):
        evaluate_npz(tmp_path / "missing.npz", tmp_path / "ref.npz", net)


def test_cli_generate_and_evaluate(student_file, tmp_path):
    from ardistill.cli import main
    assert main(["generate", "--student", str(student_file), "--out", str(tmp_path / "s.npz"), "--num-samples", "20"]) == 0
    assert main(["generate", "--student", str(student_file), "--out", str(tmp_path / "g.png"), "--num-samples", "10"]) == 0
    write_adm_npz(tmp_path / "ref.npz", np.zeros((20, 8, 8, 1), np.uint8) + 128)
    assert main(["evaluate", "--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "ref.npz"),
                 "--features", "digits", "--out", str(tmp_path / "m.json")]) == 0
    assert (tmp_path / "m.json").is_file()
    assert main(["evaluate", "--samples", str(tmp_path / "nope.npz"), "--reference", str(tmp_path / "ref.npz"),
                 "--features", "digits"]) == 2
