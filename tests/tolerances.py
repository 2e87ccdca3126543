"""Float32 tolerances for tests that compare two code paths computing the same function.

Two different computations of one function (a KV-cached sampler and a masked teacher-forced pass, a batch of
another size or composition, a reference re-implementation, diffusers' module layout, one process and two)
add their terms in different orders, so they agree only up to float32 rounding; how they round depends on
the kernels PyTorch picks for the CPU (AVX-512, AVX2 or none: ``ATEN_CPU_CAPABILITY``) and on the BLAS
blocking of each shape. Bit-equality is the right check only where the same kernels run on the same inputs
with the same shapes: a resumed run replaying the same steps, a file read back, one function called twice.

Rounding in a float32 sum of n terms is at most about n * EPS times the sum of the terms' magnitudes
(typically sqrt(n) * EPS of it), so an output element's error scales with the magnitudes flowing through the
network, not with that element: the bound below is relative to the compared tensor's largest magnitude, not
elementwise (an element near zero gets no tighter bound). On the tiny test models (depth 2-4, width 32-96,
sums of at most a few hundred terms) two paths differ by 1-7 ulps of that scale: |a - b| / max|b| <= 7.3e-7,
measured under the AVX-512, AVX2 and default kernels. PATH_REL = 1e-5 (84 ulps) leaves more than 10x for
other CPUs and is far below what a real bug gives (a wrong mask, cache entry, head or weight changes outputs
by 1e-2 of their scale or more).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0
PATH_REL = 1e-5


def assert_paths_agree(actual, expected, gain: float = 1.0, rel: float = PATH_REL, msg: str | None = None) -> None:
    """``|actual - expected| <= gain * rel * max|expected|`` everywhere (tensors or numpy arrays).

    ``gain``: how much the compared result multiplies the rounding of one forward pass. A classifier-free
    guided output uncond + w (cond - uncond) carries |1 - w| + |w| = 2w - 1 times the error of either pass;
    a sampler's output after S steps carries the rounding of S passes.
    """
    a = torch.as_tensor(np.asarray(actual)) if isinstance(actual, np.ndarray) else actual
    e = torch.as_tensor(np.asarray(expected)) if isinstance(expected, np.ndarray) else expected
    scale = float(e.detach().abs().max()) if e.numel() else 0.0
    tol = gain * rel * scale
    if a.shape != e.shape:
        raise AssertionError(f"{msg + ': ' if msg else ''}shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    err = float((a.detach().double() - e.detach().double()).abs().max()) if e.numel() else 0.0
    if not err <= tol:  # a NaN fails too
        raise AssertionError(f"{msg + ': ' if msg else ''}max |difference| {err:.3g} > {tol:.3g} = {gain:g} x {rel:g} "
                             f"x max|expected| ({scale:.3g}); {err / max(scale, 1e-300):.3g} of the scale")
