"""The ARD student: one DiT over the whole few-step trajectory.

The S input states x_{tau_S}, ..., x_{tau_1} (block 0 = the initial noise) are patch-embedded with the
teacher's shared embedder and the same 2-D position embedding, and concatenated into one sequence of
S*N tokens. Every block carries its own time (token-wise time embedding): the adaLN conditioning is
c_k = t_emb(tau_k) + y_emb(y), computed once per block. The lower ``history_layers`` layers attend
with a block mask (M4 by default: each block sees all earlier ones); the layers above see only their
own block (M1), so they are computed per block, without a mask. Block k predicts state k + 1.
With ``history_layers = 0`` (or mask M1) this is exactly step distillation.

Glossary: S num_steps (blocks), N tokens per block, D width, N_h history_layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ardistill.models.configs import strict_from_dict
from ardistill.models.attention import HistoryAttention, default_backend, needs_grad
from ardistill.models.conditioning import conditioning_for
from ardistill.models.dit import DiT, DiTConfig
from ardistill.models.kv_cache import KVCache
from ardistill.models.layers import unpatchify
from ardistill.models.masks import MASKS
from ardistill.models.text_dit import TextDiTConfig

TARGETS = ("state", "x0")  # ODE states (paper figure) or the teacher's x0-predictions (public code)
TIME_LABELS = ("true", "uniform")  # true grid times, or the public code's k/S labels
HEADS = ("shared", "per_step")
OUTPUTS = ("direct", "ode_step")  # head output is the target itself, or the teacher-style eps/velocity of one ODE jump


@dataclass(frozen=True)
class StudentConfig:
    """Everything that defines an ARD student; saved inside every checkpoint."""

    teacher: DiTConfig
    num_steps: int = 4
    history_layers: int = 6
    mask: str = "M4"
    target: str = "state"
    time_labels: str = "true"
    heads: str = "shared"
    block_times: tuple[float, ...] = ()  # the network's time input for each of the S input blocks
    output: str = "direct"
    step_coeffs: tuple[tuple[float, float], ...] = ()  # (A_k, B_k): prediction = A_k x_k + B_k head_k ("ode_step")
    grad_checkpointing: bool = False  # recompute block activations in backward (memory at scale)

    def __post_init__(self):
        if isinstance(self.teacher, dict):
            object.__setattr__(self, "teacher", DiTConfig.from_dict(self.teacher))
        object.__setattr__(self, "block_times", tuple(float(t) for t in self.block_times))
        if self.num_steps < 1:
            raise ValueError(f"StudentConfig: num_steps must be >= 1, got {self.num_steps}")
        if not 0 <= self.history_layers <= self.teacher.depth:
            raise ValueError(f"StudentConfig: history_layers must be in [0, depth={self.teacher.depth}], "
                             f"got {self.history_layers}")
        if self.mask not in MASKS:
            raise ValueError(f"StudentConfig: mask must be one of {MASKS}, got {self.mask!r}")
        object.__setattr__(self, "step_coeffs", tuple((float(a), float(b)) for a, b in self.step_coeffs))
        for name, choices in (("target", TARGETS), ("time_labels", TIME_LABELS), ("heads", HEADS), ("output", OUTPUTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"StudentConfig: {name} must be one of {choices}, got {getattr(self, name)!r}")
        if len(self.block_times) != self.num_steps:
            raise ValueError(f"StudentConfig: block_times has {len(self.block_times)} entries, "
                             f"expected num_steps = {self.num_steps}")

        if self.output == "ode_step":
            if self.target != "state":
                raise ValueError("StudentConfig: output 'ode_step' needs target 'state' (inputs must be ODE states)")
            if len(self.step_coeffs) != self.num_steps:
                raise ValueError(f"StudentConfig: step_coeffs has {len(self.step_coeffs)} entries, "
                                 f"expected num_steps = {self.num_steps}")

    @property
    def uses_history(self) -> bool:
        return self.history_layers > 0 and self.mask != "M1" and self.num_steps > 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_times"] = list(self.block_times)
        d["step_coeffs"] = [list(c) for c in self.step_coeffs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        return strict_from_dict(cls, d)


@dataclass(frozen=True, eq=True)
class TextStudentConfig(StudentConfig):
    """StudentConfig whose teacher is a TextDiTConfig (a text-to-image student); saved inside every checkpoint."""

    teacher: TextDiTConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if isinstance(self.teacher, dict):
            object.__setattr__(self, "teacher", TextDiTConfig.from_dict(self.teacher))
        if not isinstance(self.teacher, TextDiTConfig):
            raise ValueError(f"TextStudentConfig: teacher must be a TextDiTConfig, got {type(self.teacher).__name__}")
        super().__post_init__()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["teacher"] = self.teacher.to_dict()
        return d


def block_times_for(grid_times: list[float], num_steps: int, time_labels: str, model_time=None) -> tuple[float, ...]:
    """Time inputs of the S blocks.

    Args:
        grid_times: the true times of the student's states on the teacher grid (S + 1 values, the last
            is the clean end point), e.g. a recording manifest's ``times``.
        time_labels: "true" -> the true times of the S input states; "uniform" -> the public code's
            labels t_0 * (S - k) / S (999, 749.25, 499.5, 249.75 for DiT with S = 4): in general the
            network times spaced evenly from the first state's (k = 0) towards the data end's (t = 0),
            so a teacher whose network time runs the other way (SiT: 0 = noise) gets 0, 0.25, 0.5, 0.75.
        model_time: maps a process time to the network's input (FlowProcess.model_time); None = identity.
    """
    if len(grid_times) != num_steps + 1:
        raise ValueError(f"grid has {len(grid_times)} times, expected num_steps + 1 = {num_steps + 1}")
    mt = (lambda t: float(model_time(torch.tensor([t], dtype=torch.float64))[0])) if model_time else float
    if time_labels == "true":
        return tuple(mt(t) for t in grid_times[:num_steps])
    if time_labels == "uniform":
        t0, t_data = mt(grid_times[0]), mt(0.0)
        return tuple(t_data + (t0 - t_data) * (num_steps - k) / num_steps for k in range(num_steps))
    raise ValueError(f"time_labels must be one of {TIME_LABELS}, got {time_labels!r}")


def ode_step_coeffs(process, grid_times: list[float]) -> tuple[tuple[float, float], ...]:
    """(A_k, B_k) so that A_k x_k + B_k * eps (VP) or velocity (flow) is one Euler/DDIM jump t_k -> t_{k+1}.

    With ``output="ode_step"`` the student starts as the teacher taking S big DDIM steps (without
    guidance) and learns corrections from there; a parameterisation beyond the paper.
    """
    from ardistill.sampling.diffusion import VPProcess
    from ardistill.sampling.ode import CLEAN_TIME
    out = []
    for t, t_next in zip(grid_times[:-1], grid_times[1:]):
        if isinstance(process, VPProcess):
            a = float(process.abar(torch.tensor([t]))[0])
            a2 = 1.0 if t_next == CLEAN_TIME else float(process.abar(torch.tensor([t_next]))[0])
            A = (a2 / a) ** 0.5
            out.append((A, (1 - a2) ** 0.5 - A * (1 - a) ** 0.5))
        else:  # the head predicts the network's velocity, whose sign is the teacher's convention
            sign = 1.0 if process.velocity_sign == "noise_minus_data" else -1.0
            out.append((1.0, sign * ((0.0 if t_next == CLEAN_TIME else t_next) - t)))
    return tuple(out)


class ARDStudent(HistoryAttention, nn.Module):
    """Few-step student that reads its own trajectory history (ARD), for every conditioning; names follow the teacher's.

    The conditioning of its teacher's config (models/conditioning.py) supplies the embedders, the layers
    and the heads: ``student(x, y)`` / ``student.sample(noise, y)`` for a class-conditional teacher,
    ``student(x, text, text_mask)`` / ``student.sample(noise, text, text_mask)`` for a text teacher, whose
    caption keys/values are computed once per sample and shared by all blocks (history never enters
    cross-attention, the text never enters the history cache). ``attention`` ("sdpa" | "flex" | "auto",
    models/attention.py) picks the kernel of the history layers in the teacher-forced pass; a runtime
    setting, not part of the config or the checkpoint.
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        tc = cfg.teacher
        self.conditioning = conditioning_for(tc)
        self.in_channels = tc.in_channels
        self.patch_size = tc.patch_size
        self.conditioning.build(self, tc, teacher=False)
        num_heads = cfg.num_steps if cfg.heads == "per_step" else 1
        self.heads = nn.ModuleList([self.conditioning.make_head(tc) for _ in range(num_heads)])
        self.register_buffer("block_times", torch.tensor(cfg.block_times, dtype=torch.float32), persistent=False)
        coeffs = cfg.step_coeffs or ((1.0, 1.0),) * cfg.num_steps
        self.register_buffer("step_coeffs", torch.tensor(coeffs, dtype=torch.float32), persistent=False)
        self._mask_cache: dict[tuple, object] = {}  # (kernel, K, N, device) -> dense mask or BlockMask
        self.attention = default_backend()

    @property
    def arch(self):
        """The architecture config: the teacher's."""
        return self.cfg.teacher

    @property
    def layers(self) -> nn.ModuleList:
        return self.conditioning.layers(self)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: DiT, cfg: StudentConfig) -> "ARDStudent":
        """A student whose every weight starts from the teacher's (heads from its output layer)."""
        if teacher.cfg != cfg.teacher:
            raise ValueError(f"teacher config {teacher.cfg} differs from the student's teacher config {cfg.teacher}")
        student = cls(cfg)
        sd = teacher.state_dict()
        own = {k: v for k, v in sd.items() if not student.conditioning.is_output_key(k)}
        missing, unexpected = student.load_state_dict(own, strict=False)
        if unexpected or not all(k.startswith("heads.") for k in missing):
            raise ValueError(f"teacher and student names differ: unexpected {unexpected[:5]}, missing {missing[:5]}")
        head_sd = student.conditioning.head_state(sd, cfg.teacher)
        for head in student.heads:
            head.load_state_dict(head_sd)
        return student

    # ---- pieces ---------------------------------------------------------------------------------
    def _condition(self, ctx, blocks: slice, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block adaLN inputs of the layers and the heads, (B, K, .): computed once per block, not per token."""
        return self.conditioning.block_modulation(self, self.block_times[blocks], ctx, batch)

    def _head(self, h: torch.Tensor, c: torch.Tensor, first_block: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, K*N, D) -> predictions (B, K, C, H, W) through the shared or per-step heads.

        ``c`` (B, K, .) is the heads' conditioning; ``x`` (B, K, C, H, W) are the blocks' inputs, used by
        the "ode_step" output.
        """
        B, K = c.shape[:2]
        N = h.shape[1] // K
        if len(self.heads) == 1:
            out = self.heads[0](h, c).view(B * K, N, -1)
        else:
            hb = h.view(B, K, N, -1)
            out = torch.stack([self.heads[first_block + k](hb[:, k], c[:, k:k + 1]) for k in range(K)], dim=1)
            out = out.view(B * K, N, -1)
        img = unpatchify(out, self.patch_size, self.in_channels, self.arch.grid_size)
        img = img.view(B, K, *img.shape[1:])
        if self.cfg.output == "ode_step":
            ab = self.step_coeffs[first_block:first_block + K].to(img.dtype)  # (K, 2)
            A, Bc = ab[:, 0].view(1, K, 1, 1, 1), ab[:, 1].view(1, K, 1, 1, 1)
            img = A * x + Bc * img
        return img

    def _run_block(self, block: nn.Module, *args, **kw) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kw)
        return block(*args, **kw)

    # ---- teacher-forced forward -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: inputs (B, K, C, H, W) for blocks 0..K-1 and the condition -> predictions of states 1..K.

        K <= num_steps; usually K = num_steps (the whole recorded trajectory, one pass).
        """
        B, K = x.shape[:2]
        if K > self.cfg.num_steps:
            raise ValueError(f"got {K} blocks, the student has num_steps = {self.cfg.num_steps}")
        ctx = self.conditioning.context(self, cond, False)  # once per sample, shared by all K blocks
        h = self.conditioning.embed(self, x.flatten(0, 1))  # (B*K, N, D)
        N, D = h.shape[1:]
        c, c_out = self._condition(ctx, slice(0, K), B)  # (B, K, .)
        c_flat = c.reshape(B * K, 1, -1)
        history = self.cfg.uses_history and K > 1
        if history:  # dense bool mask (SDPA) or BlockMask (FlexAttention), see models/attention.py
            mask = self._history_mask(K, N, h, self.arch.num_heads, needs_grad(h, self.layers[0]))
        cond_args = self.conditioning.block_args
        for i, block in enumerate(self.layers):
            if history and i < self.cfg.history_layers:
                h = self._run_block(block, h.reshape(B, K * N, D), *cond_args(c, ctx, i), attn_mask=mask)
                h = h.view(B * K, N, D)
            else:  # own block only: attention per block, no mask (cross-attention reads the sample's text)
                h = self._run_block(block, h, *cond_args(c_flat, ctx, i))
        return self._head(h.reshape(B, K * N, D), c_out, 0, x)

    # ---- KV-cached autoregressive sampling ------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, *cond: torch.Tensor, return_all: bool = False, history: bool = True):
        """Few-step sampling: step s runs one block; the lower history_layers read the KV cache.

        Returns the final state (B, C, H, W), or with ``return_all`` all S predictions (B, S, C, H, W).
        ``history=False`` is the history-cut ablation: the same weights, but every block sees only
        itself (mask M1), which measures how much the student relies on its history.
        """
        S, Nh = self.cfg.num_steps, (self.cfg.history_layers if self.cfg.uses_history and history else 0)
        ctx = self.conditioning.context(self, cond, False)  # e.g. the text keys/values: once, before the first step
        cache = KVCache(Nh, self.cfg.mask)
        cond_args = self.conditioning.block_args
        x, outs = noise, []
        for s in range(S):
            h = self.conditioning.embed(self, x)  # (B, N, D)
            c, c_out = self._condition(ctx, slice(s, s + 1), x.shape[0])  # (B, 1, .)
            for i, block in enumerate(self.layers):
                h = block(h, *cond_args(c, ctx, i), kv_cache=cache.layer(i) if i < Nh else None)
            if Nh:
                cache.advance()
            x = self._head(h, c_out, s, x.unsqueeze(1))[:, 0]
            outs.append(x)
        return torch.stack(outs, dim=1) if return_all else x


TextARDStudent = ARDStudent  # the one student; a TextStudentConfig makes it a text-to-image student


def student_config_for(teacher_cfg, **kw) -> StudentConfig:
    """The StudentConfig of a teacher config of either conditioning (TextStudentConfig for a text teacher)."""
    return (TextStudentConfig if teacher_cfg.conditioning == "text" else StudentConfig)(teacher=teacher_cfg, **kw)


def build_student(teacher: DiT, **kw) -> ARDStudent:
    """Convenience: a student of ``teacher`` (any conditioning) with config fields ``kw``, initialised from it."""
    return ARDStudent.from_teacher(teacher, student_config_for(teacher.cfg, **kw))


# ------------------------------------------------------------------------------------------------
# Named student recipes

# The public ARD code's student (alsdudrla10/ARD models_ARD.py, train_ARD.py): the teacher's
# x0-predictions as inputs/targets, k/S time labels (999, 749.25, 499.5, 249.75 for DiT, S = 4),
# one output head per step, block-causal history (M4) in the lower ``--stack`` layers.
STUDENT_RECIPES: dict[str, dict] = {
    "public-ard": dict(mask="M4", target="x0", time_labels="uniform", heads="per_step", output="direct"),
}


def recipe_student_config(recipe: str, teacher: DiTConfig, num_steps: int = 4, history_layers: int = 6,
                          teacher_steps: int = 25, grid: str = "ard", **overrides) -> StudentConfig:
    """The StudentConfig of a named recipe, its block times computed from the teacher's process and grid.

    Args:
        recipe: a key of STUDENT_RECIPES ("public-ard").
        teacher: the teacher's DiTConfig (its process decides the network times).
        num_steps, history_layers: S and N_h (the public code: 4 and ``--stack`` = 6).
        teacher_steps, grid: the teacher grid the recording uses (diffusion.student_grid).
        overrides: any other StudentConfig field.
    """
    from ardistill.sampling.diffusion import process_for, student_grid
    from ardistill.sampling.ode import grid_times
    if recipe not in STUDENT_RECIPES:
        raise ValueError(f"unknown student recipe {recipe!r}; choose from {sorted(STUDENT_RECIPES)}")
    fields = {**STUDENT_RECIPES[recipe], **overrides}
    process = process_for(teacher)
    times = grid_times(process, teacher_steps)
    on_grid = [times[p] for p in student_grid(teacher_steps, num_steps, grid)]
    block_times = block_times_for(on_grid, num_steps, fields["time_labels"], process.model_time)
    return StudentConfig(teacher=teacher, num_steps=num_steps, history_layers=history_layers,
                         block_times=block_times, **fields)


def public_ard_student(teacher: DiT, num_steps: int = 4, history_layers: int = 6, **kw) -> ARDStudent:
    """An ARD student with the public ARD code's settings, initialised from ``teacher``."""
    return ARDStudent.from_teacher(teacher, recipe_student_config("public-ard", teacher.cfg, num_steps,
                                                                  history_layers, **kw))
