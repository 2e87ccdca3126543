"""Diffusion processes: schedules, conversions between eps / x0 / velocity / x_t, timestep grids.

Two teacher types:
- ``VPProcess``: DiT's discrete variance-preserving process. Linear betas 1e-4..0.02 over 1000
  steps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, model predicts eps, times are the integer
  indices 0..999 (the model sees the original index even after respacing, as in DiT).
- ``FlowProcess``: rectified flow / flow matching. In the process's own time t in [0, 1]
  x_t = (1 - t) x0 + t eps (t = 1 is noise) and the ODE is dx/dt = eps - x0. What the *network*
  sees and predicts is a named convention of the teacher, three explicit options:
  ``time_direction`` ("noise_at_1": the network's time is t; "data_at_1": it is 1 - t, SiT's
  interpolant from noise at 0 to data at 1), ``velocity_sign`` ("noise_minus_data": the network
  predicts eps - x0; "data_minus_noise": x0 - eps, SiT's) and ``time_scale`` (the network sees
  its time times this: 1000 lets the DiT timestep embedder serve as in SD3; SiT and REPA use 1).
  ``FLOW_CONVENTIONS`` names the known teachers' settings ("flow" = SD3-style, "sit", "repa").
  Solvers, grids and recordings always work in the process's own t; only ``model_time`` and
  ``velocity_from_output`` / ``training_target`` cross to the network's convention.

Glossary: abar = alpha-bar (cumulative product of 1 - beta); sigma = sqrt((1 - abar) / abar) is the
noise level of the scaled state x / sqrt(abar), in which DDIM is exactly Euler's method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Timestep respacing (guided-diffusion's space_timesteps, as DiT uses it: "25" -> 25 timesteps)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """Timesteps kept from the original process, ascending; DiT's ``space_timesteps``.

    "25" keeps 25 evenly strided steps (0, 42, 83, ..., 999 for 1000); "ddim25" uses DDIM's integer
    stride; "10,15,20" splits the range into sections with that many steps each.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return sorted(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


def _expand(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class VPProcess:
    """DiT's discrete VP process (linear betas, eps prediction)."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    kind: str = "vp"
    prediction: str = "eps"

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        # DiT scales by 1000 / T so other lengths keep the same endpoints ("linear" schedule).
        scale = 1000 / self.num_timesteps
        betas = np.linspace(scale * self.beta_start, scale * self.beta_end, self.num_timesteps, dtype=np.float64)
        return np.cumprod(1.0 - betas)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps t (float64)."""
        return self._abar_table[t.long().cpu()].to(t.device)

    @cached_property
    def _abar_table(self) -> torch.Tensor:
        return torch.from_numpy(self.alphas_cumprod)

    def timesteps(self, steps: int | str) -> list[int]:
        """Sampling grid, descending (first = noisiest), DiT's respacing."""
        return sorted(space_timesteps(self.num_timesteps, str(steps)), reverse=True)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: the original integer timestep."""
        return t.long()

    # conversions; t are integer timesteps (B,)
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return _expand(a.sqrt(), x0) * x0 + _expand((1 - a).sqrt(), x0) * eps

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return _expand((1 / a).sqrt(), x_t) * x_t - _expand((1 / a - 1).sqrt(), x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return (_expand((1 / a).sqrt(), x_t) * x_t - x0) / _expand((1 / a - 1).sqrt(), x_t)

    def x0_from_output(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.x0_from_eps(x_t, t, out)

    def eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps

    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator).to(device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return ((1 - a) / a).sqrt()


TIME_DIRECTIONS = ("noise_at_1", "data_at_1")
VELOCITY_SIGNS = ("noise_minus_data", "data_minus_noise")


@dataclass(frozen=True)
class FlowProcess:
    """Rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1]; the network's conventions are named options."""

    time_scale: float = 1000.0  # the network sees its time * time_scale
    shift: float = 1.0  # SD3-style timestep shift of the sampling grid (1 = uniform)
    kind: str = "flow"
    prediction: str = "velocity"
    time_direction: str = "noise_at_1"  # "data_at_1": the network's time is 1 - t (SiT)
    velocity_sign: str = "noise_minus_data"  # "data_minus_noise": the network predicts x0 - eps (SiT)

    def __post_init__(self):
        if self.time_direction not in TIME_DIRECTIONS:
            raise ValueError(f"FlowProcess: time_direction must be one of {TIME_DIRECTIONS}, got {self.time_direction!r}")
        if self.velocity_sign not in VELOCITY_SIGNS:
            raise ValueError(f"FlowProcess: velocity_sign must be one of {VELOCITY_SIGNS}, got {self.velocity_sign!r}")
        if not self.time_scale > 0:
            raise ValueError(f"FlowProcess: time_scale must be > 0, got {self.time_scale}")
        if not self.shift > 0:
            raise ValueError(f"FlowProcess: shift must be > 0, got {self.shift}")

    def timesteps(self, steps: int | str) -> list[float]:
        """Sampling grid t_0 = 1 > ... > t_{n-1} > 0 (the final t = 0 is implicit), descending."""
        n = int(steps)
        t = np.linspace(1.0, 0.0, n + 1)[:-1]
        t = self.shift * t / (1 + (self.shift - 1) * t)
        return [float(v) for v in t]

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input (float32): t, or 1 - t for "data_at_1", times time_scale."""
        t = t.double()
        if self.time_direction == "data_at_1":
            t = 1 - t
        return (t * self.time_scale).float()

    @property
    def _sign(self) -> float:
        return 1.0 if self.velocity_sign == "noise_minus_data" else -1.0

    def velocity_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """The network's output -> dx/dt = eps - x0 in the process's time."""
        return out if self._sign > 0 else -out

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = _expand(t.double(), x0)
        return (1 - t) * x0 + t * eps

    def x0_from_output(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x_t - _expand(t.double(), x_t) * self.velocity_from_output(out)

    def eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x_t + (1 - _expand(t.double(), x_t)) * self.velocity_from_output(out)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output: eps - x0, with the convention's sign."""
        return self._sign * (eps - x0)

    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64).to(device)


Process = VPProcess | FlowProcess


# The network conventions of known flow teachers (docs/checkpoints.md has the table).
FLOW_CONVENTIONS: dict[str, dict] = {
    "flow": dict(),  # ours and SD3's: network time t * 1000, predicts eps - x0
    "sit": dict(time_direction="data_at_1", velocity_sign="data_minus_noise", time_scale=1.0),  # willisma/SiT
    "repa": dict(time_scale=1.0),  # sihyun-yu/REPA's SiT: t = 1 is noise, predicts eps - x0, time unscaled
}
PROCESS_NAMES = ("vp",) + tuple(FLOW_CONVENTIONS)


def make_process(kind: str, **kw) -> Process:
    """'vp' (DiT) or 'flow' (rectified flow), with the fields of that process."""
    if kind == "vp":
        return VPProcess(**kw)
    if kind == "flow":
        return FlowProcess(**kw)
    raise ValueError(f"unknown process {kind!r}; choose 'vp' or 'flow'")


def named_process(name: str) -> Process:
    """A process by name: 'vp' (DiT) or a flow convention of FLOW_CONVENTIONS ('flow', 'sit', 'repa')."""
    if name == "vp":
        return VPProcess()
    if name in FLOW_CONVENTIONS:
        return FlowProcess(**FLOW_CONVENTIONS[name])
    raise ValueError(f"unknown process {name!r}; choose from {PROCESS_NAMES}")


def process_for(teacher) -> Process:
    """The process of a teacher: its DiTConfig's named ``process``, else the default for its prediction.

    ``teacher`` is a DiTConfig (anything with ``prediction`` and ``process``) or a prediction string
    ('eps' -> VP, 'velocity' -> the SD3-style flow).
    """
    if isinstance(teacher, str):
        prediction, name = teacher, None
    else:
        prediction, name = teacher.prediction, getattr(teacher, "process", None)
    if name is not None:
        return named_process(name)
    return VPProcess() if prediction == "eps" else FlowProcess()


def student_grid(teacher_steps: int, num_steps: int, kind: str = "ard") -> list[int]:
    """Positions (0 = noise, teacher_steps = final sample) of the student's S + 1 states on the teacher grid.

    ``"ard"``: the public ARD code's choice. For T = 25, S = 4 it keeps the DDIM indices 15, 10, 5
    (ascending indexing; t = 624, 416, 208), i.e. positions 0, 9, 14, 19, 25 in sampling order. The
    public code is hard-coded to S = 4; our generalisation keeps indices k * (T // (S + 1)),
    k = S-1..1, which gives exactly 15, 10, 5 there.
    ``"uniform"``: positions round(T * s / S).
    """
    T, S = teacher_steps, num_steps
    if not 1 <= S <= T:
        raise ValueError(f"student steps {S} must be in [1, teacher steps {T}]")
    if kind == "ard":
        stride = T // (S + 1)
        pos = [0] + [T - 1 - k * stride for k in range(S - 1, 0, -1)] + [T]
    elif kind == "uniform":
        pos = [int(np.floor(T * s / S + 0.5)) for s in range(S + 1)]
    else:
        raise ValueError(f"unknown grid kind {kind!r}; choose 'ard' or 'uniform'")
    if sorted(set(pos)) != pos:
        raise ValueError(f"grid {kind!r} with {S} of {T} steps has repeated positions {pos}")
    return pos
