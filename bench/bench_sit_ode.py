"""How close our fixed-grid Euler / Heun come to SiT's default adaptive ODE solver, on a tiny SiT.

SiT samples with torchdiffeq's dopri5 (atol 1e-6, rtol 1e-3) by default; the recorder needs states on a
fixed grid, so it runs Euler or Heun. This script measures the gap on a tiny SiT-convention teacher:
  1. trains one on the embedded 8x8 digits with SiT's objective (``--train-steps``, 0 = random weights),
     written in SiT's original key layout as a bare ``.pt`` and read back with ``load_sit_pt``;
  2. samples the same noise and labels (guidance ``--cfg-scale`` on all channels, the digits have one)
     with a tight reference (scipy's DOP853, rtol = atol = 1e-8, the model in float64), with SiT's default (scipy's RK45 =
     Dormand-Prince 5(4), the dopri5 of torchdiffeq, at atol 1e-6 / rtol 1e-3, the batch as one state
     with an RMS error norm as torchdiffeq does) and with our Euler / Heun at several step counts (Heun
     both ways: an Euler step on the last interval as EDM and REPA do, and corrected there too as SiT's
     ``--sampling-method heun2`` does, ``heun_last_step``);
  3. prints a table: RMS error to the reference (over all pixels, in the model's [-1, 1] range),
     its ratio to the RMS of the sample, and model evaluations (a guided evaluation counts once).

    PYTHONPATH=src .venv/bin/python bench/bench_sit_ode.py [--train-steps 3000] [--count 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp

from ardistill.data.digits import load_digits_split, random_shift
from ardistill.io.checkpoints import load_sit_pt
from ardistill.models.dit import DiT, dit_config
from ardistill.sampling.diffusion import process_for
from ardistill.sampling.guidance import make_model_fn
from ardistill.sampling.ode import randn_from_seeds, solve
from ardistill.training.ema import EMA


def train_sit(steps: int, seed: int = 0, batch_size: int = 128, lr: float = 1e-3) -> DiT:
    """A DiT-digits-S in SiT's convention, trained with SiT's loss through our process API."""
    cfg = dit_config("DiT-digits-S", prediction="velocity", process="sit", learn_sigma=True)
    torch.manual_seed(seed)
    model = DiT(cfg)
    if steps == 0:  # random weights (adaLN-Zero would make the velocity zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "pos_embed":
                    p.normal_(0, 0.1)
        return model.eval()
    process = process_for(cfg)
    data = load_digits_split("train")
    ema = EMA(model, 0.999, warmup=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = random_shift(data.images[idx], 1, gen)
        t = process.sample_train_t(batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        out = model(process.q_sample(x0, t, eps).float(), process.model_time(t), data.labels[idx])[:, :1]
        loss = F.mse_loss(out, process.training_target(x0, eps, t).float())  # SiT: x_data - noise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        if (step + 1) % 500 == 0:
            print(f"train step {step + 1}: loss {loss.item():.4f}", flush=True)
    return ema.module.eval()


def adaptive(model_fn, process, noise, y, method: str, rtol: float, atol: float, dtype=torch.float32):
    """scipy's solve_ivp on the flow ODE from t = 1 (noise) to 0 (data); the batch is one state vector.

    ``dtype`` is the precision the model runs in (float64 for the reference: float32 rounding is not
    smooth, and an 8th-order solver at a tight tolerance would chase it with ever smaller steps).
    """
    shape, nfe = noise.shape, [0]

    def f(t, x):
        nfe[0] += 1
        xt = torch.from_numpy(x).to(dtype).view(shape)
        tt = torch.full((shape[0],), t, dtype=torch.float64)
        with torch.no_grad():
            v = process.velocity_from_output(model_fn(xt, process.model_time(tt), y))
        return v.double().reshape(-1).numpy()

    sol = solve_ivp(f, (1.0, 0.0), noise.double().reshape(-1).numpy(), method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp {method}: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).float().view(shape), nfe[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--steps", default="5,10,25,50,100,250")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    trained = train_sit(args.train_steps)
    train_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:  # through SiT's file layout and our loader
        torch.save(trained.state_dict(), Path(tmp) / "SiT-digits.pt")
        teacher = load_sit_pt(Path(tmp) / "SiT-digits.pt", num_heads=trained.cfg.num_heads)
    process = process_for(teacher.cfg)
    model_fn = make_model_fn(teacher, args.cfg_scale)
    noise = randn_from_seeds(list(range(args.count)), (1, 8, 8))
    y = torch.arange(args.count) % 10

    model_fn64 = make_model_fn(copy.deepcopy(teacher).double(), args.cfg_scale)
    ref, ref_nfe = adaptive(model_fn64, process, noise, y, "DOP853", 1e-8, 1e-8, torch.float64)
    scale = ref.pow(2).mean().sqrt().item()
    rows = []

    def row(name, x, nfe):
        err = (x - ref).pow(2).mean().sqrt().item()
        rows.append({"solver": name, "nfe": nfe, "rms_error": err, "relative": err / scale})

    row("DOP853 rtol=atol=1e-8, float64 (reference)", ref, ref_nfe)
    x, nfe = adaptive(model_fn64, process, noise, y, "DOP853", 1e-6, 1e-6, torch.float64)
    row("DOP853 rtol=atol=1e-6, float64 (the reference's own accuracy)", x, nfe)
    x, nfe = adaptive(model_fn, process, noise, y, "RK45", 1e-3, 1e-6)
    row("dopri5 atol 1e-6 rtol 1e-3 (SiT's default)", x, nfe)
    for name, solver, last in (("euler", "euler", None), ("heun, Euler last step (EDM / REPA)", "heun", "euler"),
                               ("heun2, every interval corrected (SiT's)", "heun", "heun")):
        for n in (int(s) for s in args.steps.split(",")):
            res = solve(model_fn, process, noise, y, n, solver, heun_last_step=last)
            row(f"{name} {n}", res.sample, res.nfe)
    print(f"tiny SiT (DiT-digits-S, {'trained %d steps' % args.train_steps if args.train_steps else 'random'}; "
          f"train {train_s:.0f} s), {args.count} samples, cfg {args.cfg_scale}; RMS of the reference sample {scale:.3f}")
    print("| solver | model evaluations | RMS error to reference | relative |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['nfe']} | {r['rms_error']:.2e} | {r['relative']:.2e} |")
    print(f"wall {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "train_seconds": train_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
