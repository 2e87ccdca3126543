"""Image-folder data (ImageNet layout) with ADM's centre crop, and a pre-encoded latent store.

Layout: ``root/<class folder>/**/<image>``. Class indices follow the sorted folder names, and files
are listed in sorted order inside each class (torchvision's ImageFolder order, which DiT's training
used, so class 0 of ImageNet is ``n01440764`` = tench). Preprocessing is DiT's: ``center_crop_arr``
(ADM), optional horizontal flip, then [0, 255] -> [-1, 1]. torchvision is not needed.

``encode_latents`` runs the VAE over the data set once and writes the latents to a sharded,
checksummed, resumable store (the trajectory store's machinery, see ``shard_files.py`` and ``shard_runs.py``); the GAN
stage reads its real latents from there instead of running the VAE every step.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ardistill.data.shard_files import read_manifest
from ardistill.data.shard_runs import ShardRun
from ardistill.data.sharded_records import ShardedRecords
from ardistill.data.trajectory_format import check_image_field, float_format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, DiT): halve by BOX while the short side >= 2 * size, BICUBIC, crop.

    Returns a uint8 array (image_size, image_size, C).
    """
    # Repeated BOX halving first: a cheap anti-aliased downscale, then one BICUBIC resize to the target.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(relative path, class index)]) of an ImageNet-layout folder, in torchvision's order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class folders (expected root/<class>/<images>)")
    items: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.relpath(os.path.join(dirpath, fname), root), idx))
    if not items:
        raise ValueError(f"image folder {root} has class folders but no images with extensions {IMAGE_EXTENSIONS}")
    return classes, items


@dataclass
class ImageFolder:
    """An ImageNet-layout folder as (image in [-1, 1] (3, S, S), class index) pairs.

    Args:
        root: folder with one sub-folder per class.
        image_size: output side S (ADM centre crop).
        hflip: random horizontal flip with probability 1/2, decided by (seed, epoch, index) so that a
            run is reproducible on any number of workers or ranks (call ``set_epoch`` every epoch).
        seed: seed of the flips.
    """

    root: str | Path
    image_size: int = 256
    hflip: bool = False
    seed: int = 0
    classes: list[str] = field(init=False)
    items: list[tuple[str, int]] = field(init=False)
    epoch: int = field(init=False, default=0)

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"ImageFolder: image_size must be >= 1, got {self.image_size}")
        self.root = Path(self.root)
        self.classes, self.items = list_image_folder(self.root)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is mirrored in the current epoch."""
        if not self.hflip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def load(self, index: int, flip: bool = False) -> torch.Tensor:
        """Item ``index`` as float32 (3, S, S) in [-1, 1], mirrored when ``flip``."""
        path = self.root / self.items[index][0]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        if flip:
            arr = arr[:, ::-1]
        return to_model_range(arr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index, self.flipped(index)), self.items[index][1]

    def describe(self) -> dict:
        return {"root": str(self.root), "image_size": self.image_size, "num_images": len(self),
                "num_classes": self.num_classes, "hflip": self.hflip, "seed": self.seed}


# ------------------------------------------------------------------------------------------------
# Pre-encoded latents: the trajectory store's shard/manifest machinery with a latent record

LATENT_FORMAT = "ardistill-latents"
LATENT_VERSION = 1


@dataclass(frozen=True)
class LatentLayout:
    """One latent record: image index, label, the latent (C, h, w) and optionally its mirror image's latent."""

    shape: tuple[int, int, int]
    dtype: str = "float16"
    flipped: bool = False

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        check_image_field("LatentLayout", self.shape, self.dtype, "C, h, w")

    def record_dtype(self) -> np.dtype:
        f = float_format(self.dtype)
        fields = [("index", "<i8"), ("label", "<i8"), ("latent", f, self.shape)]
        if self.flipped:
            fields.append(("latent_flipped", f, self.shape))
        return np.dtype(fields)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "flipped": self.flipped,
                "record_bytes": self.record_dtype().itemsize}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentLayout":
        return cls(shape=tuple(d["shape"]), dtype=d["dtype"], flipped=d["flipped"])


@dataclass
class EncodeSummary:
    """What a latent pre-encoding run did (over all processes)."""

    out: str
    count: int
    encoded: int  # images encoded by this run (the rest were already on disk)
    total_bytes: int
    seconds: float
    status: str  # "fresh", "resume" or "complete"

    def __str__(self) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 else float("nan")
        return (f"{self.out}: {self.count} latents, {self.total_bytes / 2**20:.1f} MiB; this run encoded "
                f"{self.encoded} in {self.seconds:.1f} s ({rate:.1f} images/s) [{self.status}]")


def _latent_plan(dataset: ImageFolder, codec, layout: LatentLayout, shard_size: int, batch_size: int,
                 base_seed: int, device: torch.device) -> dict:
    return {
        "format": LATENT_FORMAT,
        "version": LATENT_VERSION,
        "count": len(dataset),
        "shard_size": shard_size,
        "layout": layout.to_dict(),
        "dataset": {k: v for k, v in dataset.describe().items() if k not in ("hflip", "seed")},
        "classes": list(dataset.classes),
        "codec": codec.describe(),
        "seeds": {"base_seed": base_seed, "rule": "posterior noise seed = base_seed + index (mirror: same seed)"},
        "numerics": {"batch_size": batch_size, "device": device.type, "torch": torch.__version__},
    }


class _Images(torch.utils.data.Dataset):
    """(image, label, index) for DataLoader workers (decoding JPEGs is the bottleneck, not the VAE)."""

    def __init__(self, dataset: ImageFolder, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.dataset.load(j), self.dataset.items[j][1], j


@torch.no_grad()
def encode_latents(dataset: ImageFolder, codec, out_dir: str | Path, *, batch_size: int = 64, shard_size: int = 4096,
                   dtype: str = "float16", flipped: bool = True, base_seed: int = 0, num_workers: int = 0,
                   device: str | torch.device | None = None, progress: bool = True) -> EncodeSummary:
    """Encode every image of ``dataset`` once into a sharded, checksummed, resumable latent store.

    Args:
        dataset: an ImageFolder (its own random flip is ignored: mirrors are stored explicitly).
        codec: a LatentCodec (or IdentityCodec for pixel models).
        out_dir: output folder; rerunning with the same settings resumes, other settings are refused.
        batch_size: images per VAE call; part of the settings (it can change the last bits).
        shard_size: latents per shard file.
        dtype: storage dtype, "float16" or "float32".
        flipped: also store the latent of each mirrored image (the reader picks one at random).
        base_seed: posterior-noise seeds (codec posterior "sample"): image i uses base_seed + i.
        num_workers: DataLoader worker processes that decode images.
        device: where the codec runs; defaults to the codec's device.
    Works under torchrun: rank r encodes the shards k with k % world_size == r.
    """
    import time

    from ardistill.io import distributed as dist

    t0 = time.perf_counter()
    out = Path(out_dir)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"encode_latents: batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    device = torch.device(device) if device is not None else getattr(codec, "device", torch.device("cpu"))
    codec.to(device)
    probe = dataset.load(0)
    shape = tuple(codec.encode(probe[None].to(device), seeds=[base_seed]).shape[1:])
    layout = LatentLayout(shape=shape, dtype=dtype, flipped=flipped)
    plan = _latent_plan(dataset, codec, layout, shard_size, batch_size, base_seed, device)

    # as `record`: rank 0 hashes the shards listed before; damaged ones are encoded again
    run = ShardRun(out, plan, layout, background=False)  # DataLoader workers fork: no writer thread
    if run.problems and dist.is_main():
        print(f"encode-latents: {len(run.problems)} listed shard(s) failed their check and are encoded again: "
              f"{'; '.join(run.problems[:10])}", file=sys.stderr)
    bar = _bar(run.mine(), progress and dist.is_main())
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    with run:
        for k in run.todo:
            idx = run.indices(k).tolist()
            loader = torch.utils.data.DataLoader(_Images(dataset, idx), batch_size=batch_size,
                                                 num_workers=num_workers, shuffle=False)
            rec = np.empty(len(idx), dtype=layout.record_dtype())
            pos = 0
            for images, labels, index in loader:  # micro-batches aligned to the shard start
                seeds = (base_seed + index).tolist()
                images = images.to(device)
                parts = {"latent": codec.encode(images, seeds=seeds)}
                if flipped:
                    parts["latent_flipped"] = codec.encode(images.flip(-1), seeds=seeds)
                n = len(index)
                rec["index"][pos:pos + n] = index.numpy()
                rec["label"][pos:pos + n] = labels.numpy()
                for name, z in parts.items():
                    z = z.to(store_dtype).cpu()
                    if not torch.isfinite(z).all():
                        raise ValueError(f"non-finite latents for images {int(index[0])}..{int(index[-1])} "
                                         f"(storage dtype {dtype})")
                    rec[name][pos:pos + n] = z.numpy()
                pos += n
                bar.update(n)
            run.submit(k, rec)
    bar.close()
    run.finish()
    manifest = load_latent_manifest(out)
    return EncodeSummary(out=str(out), count=len(dataset), encoded=run.remaining, total_bytes=manifest["total_bytes"],
                         seconds=time.perf_counter() - t0, status=run.status)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="encode latents", unit="img", dynamic_ncols=True, disable=not enabled or total == 0)


def load_latent_manifest(root: str | Path) -> dict:
    """Read and check a latent store's manifest.json (format, version, shard list covering 0..count-1)."""
    return read_manifest(root, fmt=LATENT_FORMAT, version=LATENT_VERSION, what="latent store manifest",
                         unit="latents", absent="not a latent store",
                         unfinished="encoding is unfinished; run the same command again")


class LatentStore(ShardedRecords):
    """Random access to pre-encoded latents (memory-mapped shards): ``batch`` and seeded ``sample``.

    Sizes and headers are checked on open; each shard's sha256 when it is first read
    (``verify_shards=False`` skips that); ``verify_checksums=True`` hashes every shard up front.
    """

    kind = "latent"
    what = "latent store"

    def __init__(self, root: str | Path, verify_checksums: bool = False, verify_shards: bool = True):
        self.root = Path(root)
        self.verify_shards = verify_shards
        manifest = load_latent_manifest(self.root)
        self._attach(manifest, LatentLayout.from_dict(manifest["layout"]), verified=verify_checksums,
                     checksum=verify_checksums)
        self.classes: list[str] = list(self.manifest["classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layout.shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batch(self, indices, flip=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) float32 and labels (B,); ``flip`` (B,) bools pick the mirrored latents."""
        rec = self.records(indices)
        z = torch.from_numpy(np.ascontiguousarray(rec["latent"])).float()
        if flip is not None:
            flip = torch.as_tensor(np.asarray(flip, dtype=bool))
            if flip.any():
                if not self.layout.flipped:
                    raise ValueError(f"latent store {self.root} holds no mirrored latents (encoded with flipped=False)")
                zf = torch.from_numpy(np.ascontiguousarray(rec["latent_flipped"])).float()
                z = torch.where(flip.view(-1, 1, 1, 1), zf, z)
        return z, torch.from_numpy(rec["label"].copy())

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement); mirrored half the time when the store holds mirrors."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator).numpy()
        flip = (torch.rand(batch_size, generator=generator) < 0.5).numpy() if self.layout.flipped else None
        return self.batch(idx, flip)
