"""Image folder (ADM centre crop, flips, class order) and the resumable latent store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ardistill.data.image_folder import (ImageFolder, LatentStore, center_crop_arr, encode_latents, list_image_folder,
                                  load_latent_manifest)
from ardistill.data.shard_files import CorruptRecordingError
from ardistill.data.vae import IdentityCodec


def make_folder(root: Path, classes=("b_cat", "a_dog"), per_class=3, size=(40, 24), seed=0) -> Path:
    """Small RGB PNGs (and one JPEG) in class folders; sizes differ so the crop matters."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c / "sub").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
            folder = root / c / ("sub" if i == 0 else "")
            Image.fromarray(arr).save(folder / f"img{i}.{'jpg' if i == 1 else 'png'}")
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_center_crop_matches_adm_reference():
    # guided-diffusion's center_crop_arr, written out independently of the implementation
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8))
    out = center_crop_arr(im, 16)
    ref = im
    while min(*ref.size) >= 32:
        ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), resample=Image.BOX)
    s = 16 / min(*ref.size)
    ref = np.array(ref.resize((round(ref.size[0] * s), round(ref.size[1] * s)), resample=Image.BICUBIC))
    y, x = (ref.shape[0] - 16) // 2, (ref.shape[1] - 16) // 2
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, ref[y:y + 16, x:x + 16])
    # the BOX halving (70 -> 35 px) matters: one direct bicubic resize gives other pixels
    direct = np.array(im.resize((round(150 * 16 / 70), 16), resample=Image.BICUBIC))
    x0 = (direct.shape[1] - 16) // 2
    assert not np.array_equal(out, direct[:, x0:x0 + 16])


def test_class_order_and_files(tmp_path):
    root = make_folder(tmp_path / "data")
    classes, items = list_image_folder(root)
    assert classes == ["a_dog", "b_cat"]  # sorted folder names, not creation order
    assert [c for _, c in items] == [0, 0, 0, 1, 1, 1]
    assert all(not p.endswith(".txt") for p, _ in items)
    assert items[0][0] == "a_dog/img1.jpg" and items[2][0] == "a_dog/sub/img0.png"  # os.walk order, sorted


def test_items_are_in_model_range_and_flip_is_a_mirror(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "data"), image_size=8, hflip=True, seed=3)
    x = ds.load(0)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    torch.testing.assert_close(ds.load(0, flip=True), x.flip(-1))
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        flips.append([ds.flipped(i) for i in range(len(ds))])
    every = [f for row in flips for f in row]
    assert any(every) and not all(every)  # some, not all, items mirrored
    assert len({tuple(row) for row in flips}) > 1  # changes with the epoch
    ds.set_epoch(0)
    assert [ds.flipped(i) for i in range(len(ds))] == flips[0]  # reproducible
    assert not ImageFolder(ds.root, image_size=8).flipped(0)
    img, label = ds[3]
    assert label == 1


def test_empty_or_missing_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolder(tmp_path / "none")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_encode_latents_store_roundtrip_and_resume(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "data"), image_size=8)
    out = tmp_path / "latents"
    s = encode_latents(ds, IdentityCodec(3), out, batch_size=2, shard_size=4, dtype="float32", progress=False)
    assert s.status == "fresh" and s.encoded == 6
    store = LatentStore(out, verify_checksums=True)
    assert len(store) == 6 and store.shape == (3, 8, 8) and store.classes == ["a_dog", "b_cat"]
    z, y = store.batch([5, 0])
    torch.testing.assert_close(z[1], ds.load(0))
    assert y.tolist() == [1, 0]
    zf, _ = store.batch([5, 0], flip=[False, True])
    torch.testing.assert_close(zf[1], ds.load(0).flip(-1))
    torch.testing.assert_close(zf[0], z[0])
    a = store.sample(4, torch.Generator().manual_seed(0))
    b = store.sample(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a[0], b[0])
    again = encode_latents(ds, IdentityCodec(3), out, batch_size=2, shard_size=4, dtype="float32", progress=False)
    assert again.status == "complete" and again.encoded == 0
    with pytest.raises(ValueError, match="other settings"):
        encode_latents(ds, IdentityCodec(3), out, batch_size=3, shard_size=4, dtype="float32", progress=False)


def test_encode_latents_resumes_an_interrupted_run(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "data"), image_size=8)
    out = tmp_path / "latents"
    full = encode_latents(ds, IdentityCodec(3), tmp_path / "ref", batch_size=2, shard_size=2, progress=False)
    # simulate a run killed after its first shard: keep the plan and shard 0's progress entry only
    encode_latents(ds, IdentityCodec(3), out, batch_size=2, shard_size=2, progress=False)
    manifest = load_latent_manifest(out)
    plan = {k: v for k, v in manifest.items() if k not in ("shards", "created", "total_bytes")}
    (out / "manifest.json").unlink()
    (out / "recording.json").write_text(json.dumps(plan))
    (out / "progress").mkdir()
    (out / "progress" / "rank-00000.json").write_text(json.dumps({"shards": {"0": manifest["shards"][0]}}))
    for s in manifest["shards"][1:]:
        (out / s["file"]).unlink()
    data = bytearray((out / manifest["shards"][0]["file"]).read_bytes())
    data[-1] ^= 0x01  # the listed shard was damaged before the resume: it is encoded again
    (out / manifest["shards"][0]["file"]).write_bytes(bytes(data))
    resumed = encode_latents(ds, IdentityCodec(3), out, batch_size=2, shard_size=2, progress=False)
    assert resumed.status == "resume" and resumed.encoded == 6
    assert [s["sha256"] for s in load_latent_manifest(out)["shards"]] == \
        [s["sha256"] for s in load_latent_manifest(tmp_path / "ref")["shards"]]
    assert full.total_bytes == resumed.total_bytes


def test_corrupted_shard_is_detected(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "data"), image_size=8)
    out = tmp_path / "latents"
    encode_latents(ds, IdentityCodec(3), out, batch_size=4, shard_size=4, flipped=False, progress=False)
    with pytest.raises(ValueError, match="no mirrored latents"):
        LatentStore(out).batch([0], flip=[True])
    shard = out / "shard-000000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    LatentStore(out)  # sizes still match: only the checksum can tell, before the shard's first use
    with pytest.raises(CorruptRecordingError, match="shard-000000.npy does not match its manifest"):
        LatentStore(out).batch([0])
    assert LatentStore(out, verify_shards=False).batch([0])[0].shape[0] == 1  # the explicit opt-out
    with pytest.raises(CorruptRecordingError, match="checksum"):
        LatentStore(out, verify_checksums=True)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptRecordingError, match="truncated"):
        LatentStore(out)
