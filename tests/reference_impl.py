"""Straightforward re-implementations of the public codes the loaders must match, written from their papers
and repositories (no download): a functional SiT / DiT forward over an original-layout state dict
(willisma/SiT models.py, sihyun-yu/REPA models/sit.py), SiT's and REPA's ODE samplers (with the step rules of
torchdiffeq's fixed-grid Euler / Heun2, which SiT calls, and of REPA's euler_sampler), and the public
ARD student (alsdudrla10/ARD models_ARD.py: forward and KV-cached ``infer``), generalised from 256 to N
tokens and kept at its four hard-coded steps. Nothing here imports ardistill's models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _linear(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Ref:
    """A SiT/DiT over an original-layout state dict; conditioning ``c`` is (B, L, D), one vector per token."""

    def __init__(self, sd: dict, num_heads: int, patch: int, out_channels: int):
        self.sd, self.H, self.p, self.out = sd, num_heads, patch, out_channels
        self.depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))

    def embed(self, x):  # PatchEmbed: conv with stride p, then (B, N, D)
        h = F.conv2d(x, self.sd["x_embedder.proj.weight"], self.sd["x_embedder.proj.bias"], stride=self.p)
        return h.flatten(2).transpose(1, 2) + self.sd["pos_embed"]

    def t_emb(self, t):
        return _linear(self.sd, "t_embedder.mlp.2", F.silu(_linear(self.sd, "t_embedder.mlp.0", timestep_embedding(t))))

    def y_emb(self, y):
        return self.sd["y_embedder.embedding_table.weight"][y]

    def attn(self, i, x, bias=None, cache=None):
        B, N, D = x.shape
        qkv = _linear(self.sd, f"blocks.{i}.attn.qkv", x).reshape(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:  # models_ARD.py's caching: append this block's keys/values, attend to all
            if cache.get(i) is not None:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
            cache[i] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return _linear(self.sd, f"blocks.{i}.attn.proj", out.transpose(1, 2).reshape(B, N, D))

    def block(self, i, x, c, bias=None, cache=None):
        mod = _linear(self.sd, f"blocks.{i}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=-1)
        x = x + mod[2] * self.attn(i, _modulate(_ln(x), mod[0], mod[1]), bias, cache)
        h = _modulate(_ln(x), mod[3], mod[4])
        h = _linear(self.sd, f"blocks.{i}.mlp.fc2", F.gelu(_linear(self.sd, f"blocks.{i}.mlp.fc1", h), approximate="tanh"))
        return x + mod[5] * h

    def final(self, name, x, c):
        shift, scale = _linear(self.sd, f"{name}.adaLN_modulation.1", F.silu(c)).chunk(2, dim=-1)
        return _linear(self.sd, f"{name}.linear", _modulate(_ln(x), shift, scale))

    def unpatchify(self, x):
        B, N, _ = x.shape
        h = int(N ** 0.5)
        x = x.reshape(B, h, h, self.p, self.p, self.out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.out, h * self.p, h * self.p)

    def forward(self, x, t, y):
        """SiT.forward (before its learn_sigma chunk): (B, out, H, W)."""
        h = self.embed(x)
        c = (self.t_emb(t) + self.y_emb(y)).unsqueeze(1)
        for i in range(self.depth):
            h = self.block(i, h, c)
        return self.unpatchify(self.final("final_layer", h, c))


# ------------------------------------------------------------------------------------------------
# SiT (willisma/SiT): time from noise (0) to data (1), velocity data - noise, CFG on 3 channels


def sit_forward_with_cfg(ref: Ref, C: int, x, t, y, cfg_scale):
    """models.py forward_with_cfg on a doubled batch [x, x], labels [y, null]."""
    half = x[: len(x) // 2]
    out = ref.forward(torch.cat([half, half]), t, y)[:, :C]  # SiT.forward drops the learned sigma
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def sit_drift(ref: Ref, C: int, yy, cfg_scale):
    """SiT's ODE drift on the doubled batch: integrators.ode.sample's ``_fn(t, x)`` (t a 0-dim tensor broadcast
    to the batch) around transport.get_drift's ``velocity_ode`` (the network's output is the drift)."""
    return lambda t, x: sit_forward_with_cfg(ref, C, x, torch.ones(x.size(0)) * t, yy, cfg_scale)


def sit_ode(ref: Ref, C: int, noise, y, null: int, cfg_scale: float, steps: int, method: str, odeint=None):
    """sample.py's ODE path: transport.Sampler.sample_ode(sampling_method=method, num_steps=steps + 1), then
    ``[-1]`` and the conditional half (``samples.chunk(2)``).

    SiT's integrators.ode builds ``t = linspace(t0, t1, num_steps)`` (num_steps *time points*, so steps + 1
    for ``steps`` intervals; check_interval gives t0, t1 = 0, 1 for the Linear path with a velocity model)
    and calls ``torchdiffeq.odeint(_fn, x, t, method=method)``. ``method``: "euler" or "heun2", torchdiffeq's
    fixed-grid solvers, transcribed below (``torchdiffeq_fixed_grid``); pass the package's ``odeint`` to run
    the package itself instead.
    """
    z = torch.cat([noise, noise])
    yy = torch.cat([y, torch.full_like(y, null)])
    t = torch.linspace(0, 1, steps + 1)
    func = sit_drift(ref, C, yy, cfg_scale)
    if odeint is not None:
        samples = odeint(func, z, t, method=method, atol=[1e-6], rtol=[1e-3])  # SiT's default atol, rtol (unused)
    else:
        samples = torchdiffeq_fixed_grid(func, z, t, method)
    return samples[-1][: len(noise)]


# ------------------------------------------------------------------------------------------------
# ODE step rules, transcribed from the public solvers (the lines of the step rule and the grid loop)


def torchdiffeq_fixed_grid(func, y0, t, method: str):
    """torchdiffeq.odeint(func, y0, t, method=method) for the fixed-grid "euler" and "heun2", torchdiffeq 0.2.5
    (rtqichen/torchdiffeq, commit 657943a):

    * _impl/solvers.py FixedGridODESolver.integrate: with no step_size the grid is ``t`` itself; for each
      interval ``dt = t1 - t0``, ``dy, f0 = self._step_func(func, t0, dt, t1, y0)``, ``y1 = y0 + dy``; the
      output at a grid point is y1 itself (``_linear_interp`` returns y1 when t == t1).
    * _impl/fixed_grid.py Euler._step_func: ``dt * f0``.
    * _impl/fixed_grid.py Heun2._step_func -> _impl/rk_common.py rk2_step_func with the tableau
      [[0, 0, 0], [1, 1, 0], [0, 1/2, 1/2]]: ``k2 = func(t0 + dt * 1.0, y0 + dt * k1 * 1.0)``,
      ``dy = dt * (k1 * 1/2 + k2 * 1/2)`` -- the correction on *every* interval, the last one included.
    * _impl/misc.py _PerturbFunc casts t to y's dtype (perturb is off by default: no nextafter).
    Returns the states at every grid point, (len(t), *y0.shape), as odeint does.
    """
    if method not in ("euler", "heun2"):
        raise ValueError(f"transcribed fixed-grid methods are 'euler' and 'heun2', got {method!r}")
    f = lambda tt, yy: func(tt.to(yy.abs().dtype), yy)  # noqa: E731  (_PerturbFunc)
    out = [y0]
    y0_ = y0
    for t0, t1 in zip(t[:-1], t[1:]):
        dt = t1 - t0
        f0 = f(t0, y0_)
        if method == "euler":
            dy = dt * f0
        else:
            k1 = f0
            k2 = f(t0 + dt * 1.0, y0_ + dt * k1 * 1.0)
            dy = dt * (k1 * (1 / 2) + k2 * (1 / 2))
        y1 = y0_ + dy
        out.append(y1)
        y0_ = y1
    return torch.stack(out)


def repa_euler_sampler_loop(d, x, t_steps, heun: bool):
    """The step loop of REPA's samplers.euler_sampler (sihyun-yu/REPA, commit 67f7145), guidance and dtype
    casts left to ``d(x, t_cur) -> d_cur``:

        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and (i < num_steps - 1):
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)   # d_prime = d(x_next, t_next)

    i.e. no correction on the last interval (as in EDM's edm_sampler, ``if i < num_steps - 1``).
    """
    num_steps = len(t_steps) - 1
    x_next = x
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = d(x_cur, t_cur)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and (i < num_steps - 1):
            d_prime = d(x_next, t_next)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def sit_heun_euler_last(ref: Ref, C: int, noise, y, null: int, cfg_scale: float, steps: int):
    """REPA's / EDM's Heun (no correction on the last interval) on SiT's network, written in REPA's time
    s = 1 - t (s = 1 noise): REPA's loop with d(x, s) = -(SiT's drift at t = 1 - s)."""
    z = torch.cat([noise, noise])
    yy = torch.cat([y, torch.full_like(y, null)])
    drift = sit_drift(ref, C, yy, cfg_scale)
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    d = lambda xc, s: -drift((1 - s).float(), xc)  # noqa: E731
    return repa_euler_sampler_loop(d, z, t_steps, heun=True)[: len(noise)]


def repa_euler(ref: Ref, noise, y, null: int, cfg_scale: float, steps: int, heun: bool = False):
    """REPA samplers.euler_sampler: t = linspace(1, 0), float64 state, CFG on all channels."""
    yy = torch.cat([y, torch.full_like(y, null)])
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)

    def d(xc, tc):
        out = ref.forward(torch.cat([xc, xc]).float(), (torch.ones(2 * len(xc), dtype=torch.float64) * tc).float(), yy)
        cond, uncond = out.to(torch.float64).chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return repa_euler_sampler_loop(d, noise.to(torch.float64), t_steps, heun).float()


# ------------------------------------------------------------------------------------------------
# The public ARD student (models_ARD.py), 4 steps, N tokens per block


def ard_forward(ref: Ref, C: int, z5, z10, z15, zT, t, n, y):
    """models_ARD.DiT.forward: one sequence of 4 blocks, per-token times t * (4 - k) / 4, mask below n."""
    N = ref.embed(zT).shape[1]
    x = torch.cat([ref.embed(z) for z in (zT, z15, z10, z5)], dim=1)
    tt = torch.cat([ref.t_emb(t * f).unsqueeze(1).repeat(1, N, 1) for f in (1, 3 / 4, 2 / 4, 1 / 4)], dim=1)
    c = tt + ref.y_emb(y).unsqueeze(1)
    d = torch.cat([torch.full((N,), i) for i in range(4)]).view(1, 4 * N, 1)
    causal = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, 4 * N, 4 * N)
    top = torch.where(d == d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, 4 * N, 4 * N)
    for i in range(ref.depth):
        x = ref.block(i, x, c, causal if i < n else top)
    names = ("final_layer", "final_layer2", "final_layer3", "final_layer4")
    outs = [ref.unpatchify(ref.final(nm, x[:, k * N:(k + 1) * N], c[:, k * N:(k + 1) * N])) for k, nm in enumerate(names)]
    return [o[:, :C] for o in outs]  # AR_4steps_losses_oneshot: th.split(pred, C)[0]


def ard_infer(ref: Ref, C: int, zT, t, n, y):
    """models_ARD.DiT.infer: 4 autoregressive steps; the lower n blocks cache keys/values of earlier steps."""
    cache = {}
    ts = ref.t_emb(torch.cat([t, t * 3 / 4, t * 2 / 4, t * 1 / 4]))
    B = zT.shape[0]
    z, outs = zT, []
    for s, name in enumerate(("final_layer", "final_layer2", "final_layer3", "final_layer4")):
        c = (ts[s * B:(s + 1) * B] + ref.y_emb(y)).unsqueeze(1)
        e = ref.embed(z)
        for i in range(ref.depth):
            e = ref.block(i, e, c, cache=cache if i < n else None)
        z = ref.unpatchify(ref.final(name, e, c))[:, :C]
        outs.append(z)
    return outs
