"""Few-step sampling from a distilled student: PNG grids and ADM-style .npz sample batches.

Every sample has its own seed (noise depends only on it) and a class-balanced label, so results do
not depend on batch size or process count. Under torchrun each rank samples the indices i with
i % world == rank into its own file (rank-local shards); rank 0 then merges them in index order into
one ADM .npz (uint8 NHWC ``arr_0``). Each rank file has a ``.json`` beside it with the settings it
was made with (student sha256, count, seeds, batch size, VAE, device, world size): a rerun reuses it
only when they all match, and samples again otherwise. Latent students decode through a VAE folder
(``--vae``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ardistill.io import distributed as dist
from ardistill.io.fileio import atomic_write_json
from ardistill.sampling.ode import randn_from_seeds


def balanced_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Label of sample i: i % num_classes (class-balanced for any count that is a multiple)."""
    return (np.asarray(indices) % num_classes).astype(np.int64)


@torch.no_grad()
def sample_student(student, seeds: list[int], labels: torch.Tensor, batch_size: int = 64, codec=None,
                   device="cpu", progress: bool = False, compile: bool = False) -> torch.Tensor:
    """Final samples (N, C, H, W) in [-1, 1] image space (decoded when ``codec`` is given), on CPU.

    ``compile``: run the KV-cached sampler through ``torch.compile`` (one compilation per batch shape;
    equal to eager within float32 rounding, tests/test_compile.py).
    """
    sample = torch.compile(student.sample) if compile else student.sample
    shape = (student.cfg.teacher.in_channels, student.cfg.teacher.input_size, student.cfg.teacher.input_size)
    out = []
    for i in tqdm(range(0, len(seeds), batch_size), disable=not progress, desc="generate", leave=False):
        noise = randn_from_seeds(seeds[i:i + batch_size], shape, device=device)
        x = sample(noise, labels[i:i + batch_size].to(device))
        if codec is not None:
            x = codec.decode(x)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def generate(student_path: str | Path, out: str | Path, num_samples: int, base_seed: int = 0,
             batch_size: int = 64, vae: str | None = None, device: str | None = None,
             progress: bool = True, compile: bool = False) -> Path | None:
    """Sample ``num_samples`` images into an ADM .npz (``out``); works under torchrun.

    Args:
        student_path: student weights, checkpoint folder or run folder.
        out: the merged .npz (``arr_0`` uint8 NHWC, ``arr_1`` labels); rank files sit beside it.
        num_samples: sample i has seed base_seed + i and label i % num_classes.
        vae: a diffusers AutoencoderKL folder for latent students (None = pixel space).
        compile: ``torch.compile`` the sampler (the same samples within float32 rounding; it does not
            enter the rank files' settings, so a rerun with or without it reuses finished ranks).
    Returns the merged file on rank 0 (None on other ranks).
    """
    from ardistill.evaluation.adm import read_adm_npz, to_uint8_nhwc, write_adm_npz
    from ardistill.io.student_io import load_student

    dev = dist.init(device)
    out = Path(out)
    try:
        student = _class_student(load_student(student_path, device=dev), student_path)
        codec = None
        if vae is not None:
            from ardistill.data.vae import load_codec
            codec = load_codec(vae, device=dev)
        rank, world = dist.rank(), dist.world_size()
        idx = np.arange(rank, num_samples, world)
        part = out.with_name(f"{out.stem}.rank{rank:03d}-of-{world:03d}.npz")
        settings = rank_settings(student_path, num_samples, base_seed, batch_size, vae, dev, rank, world)
        _drop_stale_rank_file(part, settings)
        if not part.exists():  # a finished rank file made with the same settings is kept on rerun
            atomic_write_json(_settings_path(part), settings)  # before the samples: no rank file without its settings
            labels = torch.from_numpy(balanced_labels(idx, student.cfg.teacher.num_classes))
            t0 = time.perf_counter()
            imgs = sample_student(student, (base_seed + idx).tolist(), labels, batch_size, codec, dev,
                                  progress and dist.is_main(), compile=compile)
            write_adm_npz(part, to_uint8_nhwc(imgs), labels=labels.numpy())
            if dist.is_main():
                print(f"rank 0: {len(idx)} samples in {time.perf_counter() - t0:.1f} s")
        dist.barrier()
        if not dist.is_main():
            return None
        parts = [read_adm_npz(out.with_name(f"{out.stem}.rank{r:03d}-of-{world:03d}.npz"), require_images=True)
                 for r in range(world)]
        n = sum(p.num_images for p in parts)
        images = np.empty((n, *parts[0].image_shape[1:]), dtype=np.uint8)  # image_shape is (N, H, W, C)
        labels = np.empty(n, dtype=np.int64)
        for r, p in enumerate(parts):  # back to index order: sample i came from rank i % world
            images[r::world] = p.images()
            labels[r::world] = p.labels
        write_adm_npz(out, images, labels=labels)
        for r in range(world):
            done = out.with_name(f"{out.stem}.rank{r:03d}-of-{world:03d}.npz")
            done.unlink()
            _settings_path(done).unlink(missing_ok=True)
        return out
    finally:
        dist.cleanup()


def rank_settings(student_path, num_samples: int, base_seed: int, batch_size: int, vae, device, rank: int,
                  world: int) -> dict:
    """What a rank file's samples depend on; a rank file is reused only when all of it matches."""
    from ardistill.io.fileio import sha256_file
    from ardistill.io.student_io import resolve_student_path
    return {"student_sha256": sha256_file(resolve_student_path(student_path)), "num_samples": int(num_samples),
            "base_seed": int(base_seed), "batch_size": int(batch_size),
            "vae": None if vae is None else str(Path(vae).resolve()), "device": torch.device(device).type,
            "sampler": "ARDStudent.sample, KV cache; seed base_seed + i, label i % num_classes",
            "rank": rank, "world_size": world}


def _settings_path(part: Path) -> Path:
    return part.with_suffix(".json")


def _drop_stale_rank_file(part: Path, settings: dict) -> None:
    """Delete a rank file (left by a killed run) that was made with other settings, saying so."""
    import sys

    from ardistill.data.shard_runs import plan_differences
    meta = _settings_path(part)
    if not part.exists():
        meta.unlink(missing_ok=True)
        return
    try:
        old = json.loads(meta.read_text())
    except (OSError, ValueError):
        old = None
    if old == settings:
        return
    why = ("it carries no settings" if old is None
           else "it was made with other settings: " + "; ".join(plan_differences(old, settings)[:6]))
    print(f"generate: {part} is left from an interrupted run and {why}; sampling again", file=sys.stderr)
    part.unlink()
    meta.unlink(missing_ok=True)
def student_prompt_grid(student_path: str | Path, out: str | Path, prompts: list[str], seeds: list[int],
                        scale: int = 8, device: str = "cpu") -> Path:
    """A text student's samples for each prompt (one row per prompt, one column per seed), captions under the columns.

    The encoder is rebuilt from the ``text_encoder`` spec in the student file's metadata (written by
    ``ardistill distill`` when the recording's prompt store holds one, as the t2i demo's do).
    """
    from ardistill.data.text_encoder import encoder_from_spec
    from ardistill.io.checkpoints import load_state_and_config
    from ardistill.io.images import save_captioned_grid
    from ardistill.io.student_io import load_student, resolve_student_path
    from ardistill.sampling.ode import randn_from_seeds

    if not prompts or not seeds:
        raise ValueError("student_prompt_grid: needs at least one prompt and one seed")
    file = resolve_student_path(student_path)
    student = load_student(file, device=device)
    if student.arch.conditioning != "text":
        raise ValueError(f"{file} is a class-conditional student; --prompt is for text-to-image students")
    meta = load_state_and_config(file)[2]
    if "text_encoder" not in meta:
        raise ValueError(f"{file}: no 'text_encoder' spec in its metadata (its prompt store did not record one); "
                         "encode the captions yourself and call student.sample(noise, text, text_mask)")
    encoder = encoder_from_spec(meta["text_encoder"], f"{file}: text_encoder")
    text, mask = encoder.encode(list(prompts))
    tc = student.cfg.teacher
    rows = {}
    for s in seeds:
        noise = randn_from_seeds([s] * len(prompts), (tc.in_channels, *tc.input_size), device=device)
        rows[f"seed {s}"] = student.sample(noise, text.to(device), mask.to(device)).float().cpu()
    return save_captioned_grid(rows, list(prompts), out, scale=scale)


def _class_student(student, path):
    """The class-conditional student this module samples; a text student is named as such."""
    if student.arch.conditioning == "text":
        raise ValueError(f"{path} is a text-to-image student: it samples from captions, not labels "
                         f"(student.sample(noise, text, text_mask); `ardistill demo --task t2i` draws its grids)")
    return student


def student_grid_png(student_path: str | Path, out: str | Path, seeds: list[int], labels: list[int] | None = None,
                     nrow: int | None = None, scale: int | None = None, vae: str | None = None,
                     device: str = "cpu") -> Path:
    """A PNG grid of student samples (labels default to balanced); ``scale`` None: x8 below 64 px, else x1."""
    from ardistill.io.images import save_image_grid
    from ardistill.io.student_io import load_student

    student = _class_student(load_student(student_path, device=device), student_path)
    codec = None
    if vae is not None:
        from ardistill.data.vae import load_codec
        codec = load_codec(vae, device=device)
    nc = student.cfg.teacher.num_classes
    y = torch.tensor(labels if labels else balanced_labels(np.arange(len(seeds)), nc).tolist())
    if len(y) != len(seeds):
        y = y.repeat((len(seeds) + len(y) - 1) // len(y))[:len(seeds)]
    imgs = sample_student(student, list(seeds), y, codec=codec, device=device)
    if imgs.shape[1] not in (1, 3):
        raise ValueError(f"{student_path}: samples have {imgs.shape[1]} channels (latents?); pass --vae to decode")
    scale = scale or (8 if imgs.shape[-1] < 64 else 1)
    return save_image_grid(imgs, out, nrow=nrow or min(nc, 16), padding=max(1, scale // 4), scale=scale)
