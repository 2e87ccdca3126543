"""Teacher sampling: seeded noise -> probability-flow ODE (guided) -> images, and a PNG grid of them.

Every sample has its own seed (``ode.randn_from_seeds``), so an image depends only on its seed,
label and the solver settings, never on the batch it was drawn in.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ardistill.sampling.diffusion import Process, process_for
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import randn_from_seeds, solve


@torch.no_grad()
def sample_teacher(teacher: nn.Module, process: Process, labels: torch.Tensor | list[int], seeds: list[int],
                   steps: int = 25, solver: str = "ddim", cfg_scale: float = 1.5,
                   guidance_channels: int | None = None, batch_size: int = 500, device=None,
                   heun_last_step: str | None = None) -> torch.Tensor:
    """Final ODE samples (N, C, H, W) for labels[i] from noise seeds[i].

    Args:
        teacher: a DiT (eval mode is set here).
        process: its diffusion process (``diffusion.process_for(teacher.cfg)`` for ours).
        labels: class of each sample (N,).
        seeds: noise seed of each sample (N,).
        steps: solver steps over the process's respaced grid (DDIM-25 is DiT's setting).
        solver: "ddim", "euler" or "heun".
        cfg_scale: classifier-free guidance scale (1 = none).
        guidance_channels: None guides all channels; 3 is DiT's legacy 3-of-4-channel quirk.
        batch_size: samples per solver call (does not change the images).
        device: where to run; default the teacher's device.
        heun_last_step: Heun's last interval, "euler" or "heun" (ode.solve); None = the teacher family's own.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(seeds),):
        raise ValueError(f"sample_teacher: {len(seeds)} seeds but labels of shape {tuple(labels.shape)}")
    teacher.eval()
    device = device or next(teacher.parameters()).device
    cfg = teacher.cfg
    model_fn = make_model_fn(teacher, cfg_scale, guidance_channels)
    out = []
    for i in range(0, len(seeds), batch_size):
        noise = randn_from_seeds(seeds[i:i + batch_size], (cfg.in_channels, cfg.input_size, cfg.input_size), device)
        y = labels[i:i + batch_size].to(device)
        out.append(solve(model_fn, process, noise, y, steps, solver, heun_last_step=heun_last_step).sample.float().cpu())
    return torch.cat(out) if out else torch.empty(0, cfg.in_channels, cfg.input_size, cfg.input_size)


def parse_int_list(spec: str, what: str = "list") -> list[int]:
    """'0-63' / '0,5,7-9' -> non-negative integers (ranges inclusive, order kept)."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad {what} {spec!r}: use non-negative integers and inclusive ranges, "
                             "e.g. '0-63' or '0,5,7-9'")
        lo = int(m.group(1))
        out.extend(range(lo, int(m.group(2)) + 1) if m.group(2) is not None else [lo])
    return out


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (class-balanced when n is a multiple)."""
    return torch.arange(n) % num_classes


def resolve_labels(spec: str | None, n: int, num_classes: int) -> torch.Tensor:
    """None/'balanced' -> class-balanced; otherwise a list (cycled to n), e.g. '3' or '0-4'."""
    if spec in (None, "", "balanced"):
        return balanced_labels(n, num_classes)
    given = parse_int_list(spec, "labels")
    bad = [c for c in given if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside the teacher's classes 0..{num_classes - 1}")
    return torch.tensor([given[i % len(given)] for i in range(n)])


def sample_grid(teacher_path: str | Path | None, out: str | Path, seeds: str = "0-99", labels: str | None = None,
                steps: int = 25, solver: str = "ddim", cfg_scale: float = 1.5, guidance_channels: int | None = None,
                nrow: int | None = None, scale: int = 8, device: str = "cpu", heun_last_step: str | None = None) -> Path:
    """Sample a teacher (None = the shipped digits teacher) and write a PNG grid; what ``ardistill sample`` runs."""
    from ardistill.assets import DIGITS_TEACHER, shipped
    from ardistill.io.checkpoints import load_any_teacher
    from ardistill.io.images import save_image_grid

    path = shipped(DIGITS_TEACHER, "digits teacher") if teacher_path is None else Path(teacher_path)
    teacher = load_any_teacher(path).to(device)
    seed_list = parse_int_list(seeds, "seeds")
    y = resolve_labels(labels, len(seed_list), teacher.cfg.num_classes)
    images = sample_teacher(teacher, process_for(teacher.cfg), y, seed_list, steps, solver, cfg_scale,
                            guidance_channels, device=device, heun_last_step=heun_last_step)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: the teacher makes {images.shape[1]}-channel images (latents?); "
                         "a PNG grid needs 1 or 3 channels")
    default_nrow = teacher.cfg.num_classes if labels in (None, "", "balanced") and teacher.cfg.num_classes <= 16 else 8
    # grey padding that grows with the upscaling keeps black-background images visibly apart
    return save_image_grid(images, out, nrow=nrow or default_nrow, padding=max(1, scale // 4), scale=scale,
                           pad_value=0.0)


def digits_teacher_metrics(teacher: nn.Module, num_samples: int = 2000, steps: int = 25, solver: str = "ddim",
                           cfg_scale: float = 1.5, classifier: nn.Module | None = None, reference: str = "heldout",
                           first_seed: int = 0, device: str = "cpu"):
    """FD / IS / precision / recall of class-balanced teacher samples on the digits classifier's features."""
    return teacher_metrics(teacher, "digits", num_samples, steps, solver, cfg_scale, classifier, reference,
                           first_seed, device)


def teacher_metrics(teacher: nn.Module, benchmark: str = "digits", num_samples: int = 2000, steps: int = 25,
                    solver: str = "ddim", cfg_scale: float = 1.5, classifier: nn.Module | None = None,
                    reference: str = "heldout", first_seed: int = 0, device: str = "cpu"):
    """FD / IS / precision / recall of class-balanced teacher samples on an embedded benchmark's classifier.

    The reference is a split of the benchmark ('heldout' by default: images the teacher never saw);
    seeds are first_seed .. first_seed + num_samples - 1 and labels cycle through the classes;
    samples are clamped to [-1, 1]. Returns ``evaluate.ImageMetrics``.
    """
    from ardistill.comparison.benchmarks import BENCHMARKS
    from ardistill.evaluation.evaluate import image_metrics
    from ardistill.evaluation.features import get_feature_network

    bench = BENCHMARKS[benchmark]
    net = get_feature_network(bench.features, classifier=classifier, device=device)
    real = net.features(bench.real_images(reference).to(device)).cpu()
    seeds = list(range(first_seed, first_seed + num_samples))
    images = sample_teacher(teacher.to(device), process_for(teacher.cfg),
                            balanced_labels(num_samples, teacher.cfg.num_classes), seeds, steps, solver, cfg_scale,
                            device=device)
    # Clamped to the image range, as when samples are written to image files: a few out-of-range
    # pixels would otherwise push the classifier far outside the features it was trained on.
    return image_metrics(images.clamp(-1, 1).to(device), real, net)


# ---- text-to-image teachers -------------------------------------------------------------------------
@torch.no_grad()
def sample_text_teacher(teacher: nn.Module, encoder, prompts: list[str], seeds: list[int], steps: int = 25,
                        solver: str = "ddim", cfg_scale: float = 3.0, batch_size: int = 500,
                        device=None, heun_last_step: str | None = None) -> torch.Tensor:
    """Final ODE samples (N, C, H, W) of a text teacher for prompts[i] from noise seeds[i].

    Args:
        teacher: a TextDiT (eval mode is set here).
        encoder: its text encoder (``encode`` and ``null``), e.g. data/text_encoder.py's WordEncoder.
        prompts: caption of each sample (N,).
        seeds: noise seed of each sample (N,).
        steps, solver: the ODE solver (DDIM-25 by default); heun_last_step: Heun's last interval (ode.solve).
        cfg_scale: classifier-free guidance scale against the empty prompt (1 = none).
        batch_size: samples per solver call (does not change the images).
        device: where to run; default the teacher's device.
    """
    from ardistill.sampling.guidance import make_text_model_fn

    if len(prompts) != len(seeds):
        raise ValueError(f"sample_text_teacher: {len(seeds)} seeds but {len(prompts)} prompts")
    teacher.eval()
    device = device or next(teacher.parameters()).device
    cfg = teacher.cfg
    null_text, null_mask = encoder.null()
    model_fn = make_text_model_fn(teacher, null_text.to(device), null_mask.to(device), cfg_scale)
    process = process_for(cfg.prediction)
    shape = (cfg.in_channels, *cfg.input_size)
    out = []
    for i in range(0, len(seeds), batch_size):
        text, mask = encoder.encode(list(prompts[i:i + batch_size]))
        noise = randn_from_seeds(seeds[i:i + batch_size], shape, device)
        out.append(solve(model_fn, process, noise, (text.to(device), mask.to(device)), steps, solver,
                         heun_last_step=heun_last_step).sample.float().cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def text_teacher_adherence(teacher: nn.Module, encoder, pairs: str = "seen", num_samples: int = 500,
                           steps: int = 25, solver: str = "ddim", cfg_scale: float = 3.0, seed: int = 1,
                           classifier: nn.Module | None = None, device: str = "cpu"):
    """Prompt adherence of a text teacher on captions of the digit-pairs grammar (evaluation/adherence.py).

    Captions come from ``make_digit_pairs(num_samples, split="heldout", pairs=pairs, seed=seed)``
    ("seen" pairs or the "heldout" pairs the teacher never saw); sample i has noise seed i.
    Returns ``evaluation.adherence.Adherence``.
    """
    from ardistill.data.digit_pairs import make_digit_pairs
    from ardistill.evaluation.adherence import prompt_adherence
    from ardistill.evaluation.classifier import load_digits_classifier

    data = make_digit_pairs(num_samples, split="heldout", pairs=pairs, seed=seed)
    images = sample_text_teacher(teacher.to(device), encoder, list(data.captions), list(range(num_samples)),
                                 steps, solver, cfg_scale, device=device)
    return prompt_adherence(images, data.left, data.right, classifier or load_digits_classifier().to(device))


def sample_prompt_grid(teacher_path: str | Path | None, out: str | Path, prompts: list[str], seeds: str = "0-7",
                       steps: int = 25, solver: str = "ddim", cfg_scale: float = 3.0, nrow: int | None = None,
                       scale: int = 8, device: str = "cpu", heun_last_step: str | None = None) -> Path:
    """Sample a text teacher (None = the shipped two-digit one) for prompts into a PNG grid, one row per prompt.

    What ``ardistill sample --prompt ...`` runs; every prompt gets the same seeds.
    """
    from ardistill.assets import DIGITS_T2I_TEACHER, shipped
    from ardistill.data.text_encoder import load_text_teacher_and_encoder
    from ardistill.io.images import save_image_grid

    if not prompts:
        raise ValueError("sample_prompt_grid: no prompts")
    path = shipped(DIGITS_T2I_TEACHER, "text-to-image teacher") if teacher_path is None else Path(teacher_path)
    teacher, encoder = load_text_teacher_and_encoder(path)
    seed_list = parse_int_list(seeds, "seeds")
    all_prompts = [p for p in prompts for _ in seed_list]
    images = sample_text_teacher(teacher.to(device), encoder, all_prompts, seed_list * len(prompts), steps, solver,
                                 cfg_scale, device=device, heun_last_step=heun_last_step)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: the teacher makes {images.shape[1]}-channel images (latents?); "
                         "a PNG grid needs 1 or 3 channels")
    return save_image_grid(images, out, nrow=nrow or len(seed_list), padding=max(1, scale // 4), scale=scale,
                           pad_value=0.0)
