"""History attention kernels: dense-masked SDPA or block-sparse FlexAttention, and the rule between them.

The lower ``history_layers`` of a student attend over all S*N tokens of the trajectory with the block
mask M1-M4 (models/masks.py). Two kernels compute the same thing:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` with the dense boolean (S*N, S*N) mask of
  ``masks.token_mask``; every (query, key) pair is computed and the masked ones are discarded.
- ``"flex"``: ``torch.nn.attention.flex_attention`` (compiled with ``torch.compile``) with a
  ``BlockMask`` built from the same rule; tiles of the score matrix that the mask empties are skipped,
  so M4 over S blocks computes (S + 1) / (2 S) of the pairs, M1 1 / S.
- ``"auto"``: the faster of the two, measured once per (device, shapes, dtype, mask, with or without
  gradients) on the first call at the real shapes (:func:`choose`); where FlexAttention cannot run
  (its backward on the CPU is not implemented in PyTorch), SDPA without measuring.

The choice is a runtime setting of the model (``student.attention = "flex"``; default from the
environment variable ``ARDISTILL_ATTENTION``, else ``"sdpa"``), never part of StudentConfig: the saved
configuration, the checkpoints and the KV-cached sampler do not depend on it. Both kernels compute
the same function; they differ by float32 rounding (different summation order and online softmax).

FlexAttention on the CPU is inference-only in PyTorch (pytorch/pytorch#148752, #169224: "FlexAttention
does not support backward on CPU"); ``"flex"`` there raises for a pass that needs gradients, and
``"auto"`` takes SDPA. Glossary: S blocks, N tokens per block, L = S*N, H heads, hd head width.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ardistill.models.masks import block_mask, check_mask, token_mask

BACKENDS = ("sdpa", "flex", "auto")
ENV_VAR = "ARDISTILL_ATTENTION"

try:  # prototype API; present since torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment,misc]
    flex_attention = create_block_mask = create_mask = None  # type: ignore[assignment]


def flex_available() -> bool:
    return flex_attention is not None


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name != "sdpa" and not flex_available():
        raise ValueError(f"attention {name!r} needs torch.nn.attention.flex_attention (torch >= 2.5), "
                         f"this is torch {torch.__version__}")
    return name


def default_backend() -> str:
    """The backend a new student starts with: ``$ARDISTILL_ATTENTION`` if set, else "sdpa"."""
    return check_backend(os.environ.get(ENV_VAR, "sdpa") or "sdpa")


# ---- the block mask as a FlexAttention mask_mod ---------------------------------------------------
def mask_mod_for(kind: str, num_blocks: int, tokens_per_block: int, device=None):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of history mask ``kind`` over S blocks of N tokens.

    Token i belongs to block i // N; the pair is allowed where masks.block_mask(kind, S) is (a
    (S, S) lookup table, so the rule is masks.py's by construction, and the four masks share one
    compiled kernel per shape: the table is a kernel input, not code).
    """
    allowed = block_mask(check_mask(kind), num_blocks).to(device)
    N = tokens_per_block

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx // N, kv_idx // N]

    return mask_mod


def flex_block_size(tokens_per_block: int, device) -> int:
    """The BlockMask tile: on the CPU the largest of 128/64/32/16 dividing N, elsewhere torch's 128.

    A tile that divides N never straddles two trajectory blocks, so every tile is full or empty and
    the kernel skips exactly the masked pairs (the CPU benchmark: N = 64 at tile 64 is ~2-3x faster
    than at the default 128, whose diagonal tiles are half masked). On CUDA the Triton kernel's own
    tile (BLOCK_M, 128 in most default configs) must divide the BlockMask tile, so it keeps the
    default 128 (exact for N = 256, DiT-XL/2 at 256 px); smaller N there get partial tiles, still
    correct (mask_mod is evaluated inside them). Not measured on a GPU.
    """
    if torch.device(device).type != "cpu":
        return 128
    for b in (128, 64, 32, 16):
        if tokens_per_block % b == 0:
            return b
    return 128


@functools.lru_cache(maxsize=64)
def _block_mask_cached(kind: str, num_blocks: int, tokens_per_block: int, device: str, block_size: int):
    L = num_blocks * tokens_per_block
    return create_block_mask(mask_mod_for(kind, num_blocks, tokens_per_block, device), None, None, L, L, device=device,
                             BLOCK_SIZE=block_size)


def flex_block_mask(kind: str, num_blocks: int, tokens_per_block: int, device=None, block_size: int | None = None):
    """The ``BlockMask`` of history mask ``kind`` over S blocks of N tokens (cached per shape and device)."""
    if not flex_available():
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch")
    device = torch.device(device if device is not None else "cpu")
    bs = block_size or flex_block_size(tokens_per_block, device)
    return _block_mask_cached(check_mask(kind), num_blocks, tokens_per_block, str(device), bs)


def dense_from_mask_mod(kind: str, num_blocks: int, tokens_per_block: int) -> torch.Tensor:
    """The boolean (L, L) mask the mask_mod describes, materialised (tests: equals masks.token_mask)."""
    L = num_blocks * tokens_per_block
    return create_mask(mask_mod_for(kind, num_blocks, tokens_per_block), None, None, L, L, device="cpu")[0, 0]


# ---- the kernels ------------------------------------------------------------------------------
_FLEX_COMPILED = None


def _compiled_flex():
    # FlexAttention is only fused under torch.compile (eager is a slow reference that materialises
    # the scores). dynamic=None: a shape is compiled static first, then dynamic after a change.
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """Attention of (B, H, L, hd) tensors; ``attn_mask`` None, a dense bool/additive mask, or a BlockMask."""
    if BlockMask is not None and isinstance(attn_mask, BlockMask):
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                   or v.requires_grad):
            raise NotImplementedError(
                "attention 'flex' needs gradients here, but FlexAttention has no backward on the CPU in "
                f"torch {torch.__version__} (pytorch/pytorch#148752); use attention 'sdpa' or 'auto' for "
                "training on the CPU")
        if q.device.type == "cpu" and not flex_cpu_supported():
            raise NotImplementedError(
                f"attention 'flex' on the CPU needs PyTorch's AVX2 or AVX-512 kernels; this process runs "
                f"{torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY or the CPU), where inductor has no "
                "FlexAttention kernel; use attention 'sdpa' or 'auto'")
        if torch.compiler.is_compiling():  # inside a compiled model: the outer compile fuses it
            return flex_attention(q, k, v, block_mask=attn_mask)
        return _compiled_flex()(q, k, v, block_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def flex_cpu_supported() -> bool:
    """Whether inductor has a FlexAttention kernel for this CPU: it needs PyTorch's AVX2 or AVX-512 kernels
    (``torch.backends.cpu.get_cpu_capability()``; with ``ATEN_CPU_CAPABILITY=default`` or on an older CPU it
    raises "torch.compile on current platform is not supported for CPU")."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def flex_runs(device, needs_grad: bool) -> bool:
    """Whether FlexAttention can run this pass: not on a CPU without AVX2 / AVX-512 kernels, and not where
    it has no backward (CPU, MPS) when gradients are needed."""
    dev = torch.device(device).type
    if not flex_available() or (dev == "cpu" and not flex_cpu_supported()):
        return False
    return not (needs_grad and dev in ("cpu", "mps"))


# ---- "auto": measure once per shape -----------------------------------------------------------
_AUTO: dict[tuple, str] = {}  # key -> "sdpa" | "flex"
_AUTO_TIMES: dict[tuple, tuple[float, float]] = {}  # key -> (median sdpa s, median flex s), for reports
AUTO_MARGIN = 0.95  # flex must be at least 5% faster to replace the default (timing noise on shared machines)
AUTO_REPEATS = 3


def _sync(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


@torch.compiler.disable
def choose(kind: str, num_blocks: int, tokens_per_block: int, shape: tuple[int, int, int], dtype: torch.dtype,
           device, needs_grad: bool) -> str:
    """The rule of ``"auto"``: "flex" if it measured faster than "sdpa" here, at these shapes.

    ``shape`` = (B, H, hd). The first call per (device, shape, dtype, mask, S, N, needs_grad) times
    both kernels on random q/k/v of the real shape (the forward, plus the backward when gradients
    are needed): one warm-up each (FlexAttention compiles there, seconds on the CPU), then
    AUTO_REPEATS interleaved repetitions; flex wins if its median is below AUTO_MARGIN x SDPA's.
    Later calls return the cached choice. Where flex cannot run (CPU backward) it is "sdpa" untimed.
    """
    device = torch.device(device)
    key = (str(device), tuple(shape), dtype, kind, num_blocks, tokens_per_block, bool(needs_grad))
    if key in _AUTO:
        return _AUTO[key]
    if not flex_runs(device, needs_grad):
        _AUTO[key] = "sdpa"
        return "sdpa"
    B, H, hd = shape
    L = num_blocks * tokens_per_block
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, hd, generator=g).to(device=device, dtype=dtype).requires_grad_(needs_grad)
               for _ in range(3))
    masks = {"sdpa": token_mask(kind, num_blocks, tokens_per_block, device=device),
             "flex": flex_block_mask(kind, num_blocks, tokens_per_block, device)}

    def run(name: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(needs_grad):
            out = attend(q, k, v, masks[name])
            if needs_grad:
                out.sum().backward()
        _sync(device)
        return time.perf_counter() - t0

    run("sdpa"), run("flex")  # warm-up (compile)
    times: dict[str, list[float]] = {"sdpa": [], "flex": []}
    for _ in range(AUTO_REPEATS):
        for name in ("sdpa", "flex"):
            times[name].append(run(name))
    t_sdpa, t_flex = statistics.median(times["sdpa"]), statistics.median(times["flex"])
    _AUTO_TIMES[key] = (t_sdpa, t_flex)
    _AUTO[key] = "flex" if t_flex < AUTO_MARGIN * t_sdpa else "sdpa"
    return _AUTO[key]


def history_mask(kind: str, num_blocks: int, tokens_per_block: int, device, backend: str,
                 needs_grad: bool = False, shape: tuple[int, int, int] | None = None,
                 dtype: torch.dtype = torch.float32):
    """What a history layer passes as ``attn_mask``: the dense bool mask (SDPA) or the BlockMask (flex).

    ``backend`` "auto" needs ``shape`` = (B, H, hd) and ``dtype`` of the attention inputs to measure.
    """
    if backend == "auto":
        if shape is None:
            raise ValueError("attention 'auto' needs the attention shape (B, H, hd)")
        backend = choose(kind, num_blocks, tokens_per_block, shape, dtype, device, needs_grad)
    if backend == "flex":
        return _eager_block_mask(kind, num_blocks, tokens_per_block, device)
    return token_mask(kind, num_blocks, tokens_per_block, device=device)


# Inside a compiled model the BlockMask is built eagerly (once per shape, one graph break on the first
# call); the dense mask stays traceable, so "sdpa" compiles into one graph as before.
_eager_block_mask = torch.compiler.disable(flex_block_mask)


class HistoryAttention:
    """Mixin of the students: the runtime ``attention`` setting and the history masks it selects.

    Not saved anywhere (neither StudentConfig nor the state dict); set it on a built or loaded
    student (``student.attention = "flex"``). The subclass sets ``self._mask_cache = {}`` first.
    """

    _attention = "sdpa"

    @property
    def attention(self) -> str:
        """"sdpa" | "flex" | "auto": the kernel of the history layers' teacher-forced attention."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        self._attention = check_backend(name)

    def _history_mask(self, K: int, N: int, h: torch.Tensor, num_heads: int, needs_grad: bool = False):
        """The history layers' ``attn_mask`` for K blocks of N tokens of ``h`` (B*K, N, D): dense or BlockMask.

        Built once per (kernel, K, N, device); with "auto" the kernel is measured once per shape (:func:`choose`).
        """
        backend = self._attention
        if backend == "auto":
            dtype = (torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type)
                     else h.dtype)
            B = h.shape[0] // K
            backend = choose(self.cfg.mask, K, N, (B, num_heads, h.shape[-1] // num_heads), dtype, h.device,
                             needs_grad)
        key = (backend, K, N, str(h.device))
        if key not in self._mask_cache:  # built once per shape
            self._mask_cache[key] = history_mask(self.cfg.mask, K, N, h.device, backend)
        return self._mask_cache[key]


def needs_grad(h: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether a pass of ``module`` on ``h`` builds a graph (the attention inputs will require grad)."""
    return torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in module.parameters()))
