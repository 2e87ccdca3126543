"""Deterministic samplers for the teacher's probability-flow ODE, written as plain functions.

A solver walks a grid of ``steps + 1`` positions (0 = initial noise, ``steps`` = final sample) and
can return the states and the teacher's x0-predictions at any subset of positions (``record_at``):
that is what the trajectory recorder stores.

VP process (DiT): with abar_i at grid time t_i, the scaled state xh = x / sqrt(abar) follows
d xh / d sigma = eps(x, t), sigma = sqrt((1 - abar) / abar). DDIM (eta = 0) is Euler's method in
this parameterisation; Heun adds the trapezoidal correction (skipped on the last step, where
sigma = 0, as in EDM). The last step ends at abar = 1 (the clean sample), as in DiT's DDIM.
Flow process: d x / d t = v(x, t) = eps - x0, t from 1 (noise) to 0 (data); Euler or Heun. A teacher
with another convention (SiT: time from noise at 0 to data at 1, velocity x0 - eps) runs on the same
grid: the process maps the time it is fed and the velocity it returns (diffusion.FlowProcess).

Heun's last interval (the one that ends at the clean sample) is a named choice, ``heun_last_step``:
"euler" takes an Euler step there (EDM's ``edm_sampler`` and REPA's ``euler_sampler(heun=True)``:
``if i < num_steps - 1``), "heun" corrects there too (torchdiffeq's fixed-grid ``heun2``, which SiT's
``sample.py --sampling-method heun2`` runs). Left unset it is what the teacher family's own sampler
does (``default_heun_last_step``): "heun" for SiT's convention, "euler" for everything else. On the
VP process only "euler" exists: the last interval ends at abar = 1, where an eps network has no timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ardistill.sampling.diffusion import FLOW_CONVENTIONS, FlowProcess, Process, VPProcess
from ardistill.sampling.guidance import ModelFn

SOLVERS = ("ddim", "euler", "heun")
HEUN_LAST_STEPS = ("euler", "heun")  # Heun's last interval: an Euler step (EDM, REPA) or corrected (SiT's heun2)
LEGACY_HEUN_LAST_STEP = "euler"  # what every Heun solve did before the choice existed (manifests without it)
CLEAN_TIME = -1.0  # time label of the ODE's clean end point (abar = 1 / t = 0 reached)


def randn_from_seeds(seeds: list[int] | torch.Tensor, shape: tuple[int, ...], device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape); sample i depends only on seeds[i] (EDM style)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


@dataclass
class ODEResult:
    """Final sample, plus states and x0-predictions at the recorded grid positions."""

    sample: torch.Tensor  # (B, C, H, W)
    positions: list[int]  # recorded grid positions
    times: list[float]  # grid time at each recorded position (CLEAN_TIME for the end point)
    states: torch.Tensor | None = None  # (B, K, C, H, W)
    x0_preds: torch.Tensor | None = None  # (B, K, C, H, W); at the end point, the sample itself
    nfe: int = 0  # model evaluations per sample (a guided evaluation counts once)


def grid_times(process: Process, steps: int) -> list[float]:
    """steps + 1 grid times: the process's sampling grid and CLEAN_TIME at the end."""
    return [float(t) for t in process.timesteps(steps)] + [CLEAN_TIME]


def default_heun_last_step(process: Process) -> str:
    """What the teacher family's own Heun sampler does on the last interval.

    "heun" (correct on every interval) for a flow process in SiT's network convention
    (``FLOW_CONVENTIONS["sit"]``): willisma/SiT's ``sample.py --sampling-method heun2`` runs torchdiffeq's
    fixed-grid Heun2, whose step has no special last interval. "euler" for every other process: REPA's
    ``samplers.euler_sampler(heun=True)`` and EDM's ``edm_sampler`` skip the correction there; DiT samples
    with DDIM (no corrector at all), and on the VP process the last interval ends at abar = 1, where DiT's
    eps network has no timestep; our own flow teachers keep the Euler last step the project always used.
    """
    sit = FLOW_CONVENTIONS["sit"]
    if isinstance(process, FlowProcess) and all(getattr(process, k) == v for k, v in sit.items()):
        return "heun"
    return "euler"


def resolve_heun_last_step(solver: str, process: Process, heun_last_step: str | None = None) -> str | None:
    """The last-interval scheme a solve uses: None unless ``solver`` is "heun"; for Heun the given choice,
    or ``default_heun_last_step(process)`` when it is None. Raises ValueError for an unknown choice, a
    choice given with another solver, and "heun" on the VP process."""
    if heun_last_step is not None:
        if heun_last_step not in HEUN_LAST_STEPS:
            raise ValueError(f"unknown heun_last_step {heun_last_step!r}; choose from {HEUN_LAST_STEPS}")
        if solver != "heun":
            raise ValueError(f"heun_last_step is a choice of solver 'heun', not of {solver!r}")
    if solver != "heun":
        return None
    choice = heun_last_step if heun_last_step is not None else default_heun_last_step(process)
    if choice == "heun" and isinstance(process, VPProcess):
        raise ValueError("heun_last_step 'heun' is for flow processes: the VP ODE's last interval ends at abar = 1, "
                         "where an eps network has no timestep; use 'euler' (EDM's Heun)")
    return choice


def recorded_heun_last_step(sampler: dict) -> str | None:
    """The scheme of a recording's manifest ``sampler`` section: None unless its solver is Heun; a Heun
    recording written before the choice was recorded used the Euler last step (LEGACY_HEUN_LAST_STEP)."""
    if sampler.get("solver") != "heun":
        return None
    return sampler.get("heun_last_step", LEGACY_HEUN_LAST_STEP)


@torch.no_grad()
def solve(model_fn: ModelFn, process: Process, noise: torch.Tensor, y: torch.Tensor, steps: int,
          solver: str = "ddim", record_at: list[int] | None = None, heun_last_step: str | None = None) -> ODEResult:
    """Integrate the probability-flow ODE from ``noise`` over ``steps`` grid intervals.

    Args:
        model_fn: (x, t_model, y) -> eps (VP) or velocity (flow), guidance included (see guidance.py);
            t_model is ``process.model_time(t)``.
        process: VPProcess or FlowProcess.
        noise: initial state (B, C, H, W), e.g. from ``randn_from_seeds``.
        y: labels (B,).
        steps: number of grid intervals (teacher steps).
        solver: "ddim" (VP only), "euler" or "heun".
        record_at: grid positions (0..steps) whose states and x0-predictions are returned.
        heun_last_step: Heun only: "euler" (no correction on the last interval, EDM / REPA) or "heun"
            (correct there too, SiT's heun2: one more model evaluation); None = the process's family
            default (``default_heun_last_step``).
    """
    _check_solver(solver, process)
    correct_last = resolve_heun_last_step(solver, process, heun_last_step) == "heun"
    record_at = sorted(set(record_at or []))
    if record_at and not (0 <= record_at[0] and record_at[-1] <= steps):
        raise ValueError(f"record_at positions must lie in [0, {steps}], got {record_at}")
    times = grid_times(process, steps)
    states, x0s = {}, {}
    x = noise
    nfe = 0
    evaluate = _evaluator(model_fn, process, times, y)
    for i in range(steps):
        out, x0 = evaluate(x, i)
        nfe += 1
        if i in record_at:
            states[i], x0s[i] = x, x0
        x_next, extra = _step(process, solver, x, out, x0, times, i, evaluate, correct_last)
        nfe += extra
        x = x_next
    if steps in record_at:
        states[steps], x0s[steps] = x, x
    result = ODEResult(sample=x, positions=record_at, times=[times[i] for i in record_at], nfe=nfe)
    if record_at:
        result.states = torch.stack([states[i] for i in record_at], dim=1)
        result.x0_preds = torch.stack([x0s[i] for i in record_at], dim=1)
    return result


@torch.no_grad()
def solve_segment(model_fn: ModelFn, process: Process, x: torch.Tensor, y, steps: int, solver: str,
                  start: int, end: int, heun_last_step: str | None = None) -> torch.Tensor:
    """The state at grid position ``end`` reached from the state ``x`` at position ``start``.

    The same grid (``steps`` intervals), solver and model evaluations as ``solve``, so a segment of a
    trajectory that ``solve`` recorded is reproduced bit for bit from its state at ``start``. Used to
    relabel on-policy targets: the teacher's ODE from the student's own state to the next student time.
    ``heun_last_step`` as in ``solve`` (it matters when the segment ends at ``steps``).
    """
    _check_solver(solver, process)
    correct_last = resolve_heun_last_step(solver, process, heun_last_step) == "heun"
    if not 0 <= start <= end <= steps:
        raise ValueError(f"solve_segment: need 0 <= start <= end <= steps, got start {start}, end {end}, steps {steps}")
    times = grid_times(process, steps)
    evaluate = _evaluator(model_fn, process, times, y)
    for i in range(start, end):
        out, x0 = evaluate(x, i)
        x, _ = _step(process, solver, x, out, x0, times, i, evaluate, correct_last)
    return x


def _check_solver(solver: str, process: Process) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if solver == "ddim" and not isinstance(process, VPProcess):
        raise ValueError("solver 'ddim' is for the VP process; use 'euler' or 'heun' for flow")


def _evaluator(model_fn: ModelFn, process: Process, times: list[float], y):
    """(x, grid position i) -> (model output, x0-prediction) at the grid time of position i.

    The end point (CLEAN_TIME) is evaluated only by a flow Heun step that corrects its last interval: t = 0.
    """
    times = [0.0 if t == CLEAN_TIME else t for t in times]

    def evaluate(x_cur: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x_cur.shape[0],), times[i], device=x_cur.device, dtype=torch.float64)
        out = model_fn(x_cur, process.model_time(t), y)
        return out, process.x0_from_output(x_cur, t, out).to(x_cur.dtype)
    return evaluate


def _step(process, solver, x, out, x0, times, i, evaluate, correct_last=False):
    """One solver step from grid position i to i + 1; returns (x_next, extra model evaluations).

    ``correct_last``: Heun corrects the last interval too (flow only; resolve_heun_last_step checks it)."""
    if isinstance(process, VPProcess):
        t_cur = torch.tensor([times[i]])
        a_cur = process.abar(t_cur).item()
        a_next = 1.0 if times[i + 1] == CLEAN_TIME else process.abar(torch.tensor([times[i + 1]])).item()
        eps = out
        if solver == "ddim":
            # DDIM, eta = 0: x_{i+1} = sqrt(abar') x0 + sqrt(1 - abar') eps
            return (a_next ** 0.5) * x0 + ((1 - a_next) ** 0.5) * eps, 0
        s_cur, s_next = ((1 - a_cur) / a_cur) ** 0.5, ((1 - a_next) / a_next) ** 0.5
        xh = x / a_cur ** 0.5
        xh_next = xh + (s_next - s_cur) * eps  # Euler in (xh, sigma)
        if solver == "heun" and s_next > 0:
            x_pred = xh_next * a_next ** 0.5
            eps2, _ = evaluate(x_pred, i + 1)
            xh_next = xh + (s_next - s_cur) * 0.5 * (eps + eps2)
            return xh_next * a_next ** 0.5, 1
        return xh_next * a_next ** 0.5, 0
    # flow: dx/dt = v = eps - x0 in the process's time (the network's sign convention undone)
    t_cur, t_next = times[i], (0.0 if times[i + 1] == CLEAN_TIME else times[i + 1])
    v = process.velocity_from_output(out)
    x_next = x + (t_next - t_cur) * v
    if solver == "heun" and (t_next > 0 or correct_last):  # last step: heun_last_step (EDM / REPA: Euler)
        out2, _ = evaluate(x_next, i + 1)
        return x + (t_next - t_cur) * 0.5 * (v + process.velocity_from_output(out2)), 1
    return x_next, 0
