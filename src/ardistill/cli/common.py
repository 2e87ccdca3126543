"""The flags, argument types and run helpers that several commands share.

A flag defined here has one spelling, one help text and one default wherever it appears; the handlers
read it back under the same ``dest``.
"""

from __future__ import annotations

import argparse
import sys


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def threads_flag(p):
    """The one ``--threads`` flag of every command that computes (read back by ``set_threads``)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 is often fastest)")


def set_threads(n):
    """torch.set_num_threads when given: on a shared CPU, 1 thread can be several times faster than 2."""
    if n is not None:
        import torch
        torch.set_num_threads(n)


def verify_shards_flag(p):
    """Opt-out of the per-shard sha256 check of the training data readers."""
    p.add_argument("--no-verify-shards", dest="verify_shards", action="store_false",
                   help="skip the sha256 check of each recording (and latent store) shard before its first use; "
                        "sizes and headers are still checked, flipped bytes are not")


def device_flag(p, **kw):
    """``--device`` of a command that picks its device itself (``kw``: the default)."""
    p.add_argument("--device", **kw, help="cpu or cuda (default: cuda when available)")


def no_progress_flag(p):
    """``--no-progress`` (dest ``no_progress``) of the commands that draw a progress bar themselves."""
    p.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")


def text_encoder_flag(p, **kw):
    """``--text-encoder`` of a text-to-image student (``kw``: required, or its default)."""
    p.add_argument("--text-encoder", **kw, help="the T5 folder the prompt store was embedded with")


def solver_flags(p):
    """``--solver`` and ``--heun-last-step`` of the commands that run a teacher's ODE solver (record, sample)."""
    p.add_argument("--solver", choices=("ddim", "euler", "heun"), default="ddim")
    p.add_argument("--heun-last-step", choices=("euler", "heun"), default=None,
                   help="--solver heun: the last interval as an Euler step (EDM's, REPA's Heun) or corrected (SiT's "
                        "heun2, one more evaluation); default the teacher family's own: heun for SiT, else euler")


def guidance_channels_flag(p):
    """``--guidance-channels`` of the commands that guide a class-conditional teacher (record, sample)."""
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (3 = DiT's legacy forward_with_cfg); default all")


def optimisation_group(p, default_steps: int, who: str = ""):
    """The optimisation flags distill and finetune-gan share (their config fields have the same names)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps in total (default {default_steps})")
    g.add_argument("--batch-size", type=int, help="global batch (default 64)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=float, help=f"{who}AdamW learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, help=f"{who}AdamW weight decay (default 0)")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help=f"{who}AdamW betas (default 0.9 0.999)")
    g.add_argument("--grad-clip", type=float, help=f"{who}max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    g.add_argument("--ema-warmup", action="store_true", help="EMA decay min(decay, (1+n)/(10+n))")
    g.add_argument("--loss-weights", type=float_list, help="per-step regression weights, e.g. 1,1,1,2 (default equal)")
    return g


def run_group(p, seed_help: str):
    """Device, precision, checkpoint and logging flags of a training command."""
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=seed_help)
    device_flag(g)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="several processes (torchrun): ddp = replicated weights, fsdp = FSDP2, weights, gradients, "
                        "optimizer and EMA sharded per transformer block, sharded checkpoints (export-checkpoint "
                        "writes single files); may change on --resume (default ddp)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default 500)")
    g.add_argument("--keep-every", type=int, help="keep checkpoints at multiples of N (default: latest only)")
    g.add_argument("--log-every", type=int, help="log every N steps (default 10)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return g


def print_summary(summary) -> None:
    """Print a command's summary line; ``None`` (a torchrun rank other than 0) prints nothing."""
    if summary is not None:
        print(summary)


def stopped(command: str, error: BaseException, code: int) -> int:
    """A run the library stopped on purpose (a non-finite loss, a collapsed discriminator): one line, ``code``."""
    print(f"ardistill {command}: stopped: {error}", file=sys.stderr)
    return code
