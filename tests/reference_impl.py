"""Straightforward re-implementations of the public codes the loaders must match, written from their papers
and repositories (no download): a functional SiT / DiT forward over an original-layout state dict
(willisma/SiT models.py, sihyun-yu/REPA models/sit.py), SiT's and REPA's ODE samplers, and the public
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


def sit_ode(ref: Ref, C: int, noise, y, null: int, cfg_scale: float, steps: int, method: str):
    """transport.Sampler.sample_ode on t = linspace(0, 1, steps + 1) with a fixed-grid method, written out.

    "euler": x += dt v; "heun": the trapezoid with an Euler predictor, except on the last interval
    (ardistill's and REPA's Heun; torchdiffeq's heun2 would correct there too).
    """
    z = torch.cat([noise, noise])
    yy = torch.cat([y, torch.full_like(y, null)])
    ts = torch.linspace(0, 1, steps + 1)
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v = sit_forward_with_cfg(ref, C, z, torch.ones(len(z)) * t0, yy, cfg_scale)
        z_pred = z + (t1 - t0) * v
        if method == "heun" and i < steps - 1:
            v2 = sit_forward_with_cfg(ref, C, z_pred, torch.ones(len(z)) * t1, yy, cfg_scale)
            z = z + (t1 - t0) * 0.5 * (v + v2)
        else:
            z = z_pred
    return z[: len(noise)]


def repa_euler(ref: Ref, noise, y, null: int, cfg_scale: float, steps: int, heun: bool = False):
    """REPA samplers.euler_sampler: t = linspace(1, 0), float64 state, CFG on all channels."""
    yy = torch.cat([y, torch.full_like(y, null)])
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.to(torch.float64)

    def d(xc, tc):
        out = ref.forward(torch.cat([xc, xc]).float(), (torch.ones(2 * len(xc), dtype=torch.float64) * tc).float(), yy)
        cond, uncond = out.to(torch.float64).chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = d(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d(x_next, t_next))
        x = x_next
    return x.float()


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
