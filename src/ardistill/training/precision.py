"""Devices and precision of a training run: TF32 and deterministic algorithms, bf16 autocast on CUDA,
plain fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def setup_backends(device: torch.device, deterministic: bool = False) -> None:
    """TF32 matmuls/convolutions on CUDA (the paper's fp32/TF32); optional deterministic algorithms."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 on CPU; bf16 autocast is refused on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision 'bf16' (autocast) is for CUDA; CPU training runs in fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast context on CUDA, a no-op otherwise; ``precision`` as resolved."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
