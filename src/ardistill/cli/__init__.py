"""Command line: a thin argparse shell; every subcommand calls one importable function.

Each subcommand is registered by an ``add_<name>`` function of its command group's module (kebab-case
flags): ``data`` (record, embed-prompts, verify-trajectories, encode-latents), ``train`` (distill,
finetune-gan, train-teacher, train-classifier, presets), ``compare`` (demo, sweep), ``generate`` (sample,
generate, evaluate) and ``convert`` (export-pipeline, export-checkpoint, import-teacher, import-student);
``common`` holds the flags several share. Keep the work in the library modules: a handler only parses,
calls, and prints.
"""

from __future__ import annotations

import argparse
import sys

from ardistill.cli import compare, convert, data, generate, train
# The comparison helpers under their earlier names (tests build demo's parser and config with them).
from ardistill.cli.compare import add_demo as _add_demo  # noqa: F401
from ardistill.cli.compare import compare_args as _compare_args  # noqa: F401
from ardistill.cli.compare import compare_config as _compare_config  # noqa: F401

__all__ = ["build_parser", "main", "entry"]


def _add_version(sub):
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda args: print(__import__("ardistill").__version__))


# Subcommand registrations, in the order they appear in --help.
_REGISTRATIONS = [_add_version, data.add_embed_prompts, data.add_record, data.add_verify_trajectories,
                  train.add_distill, train.add_presets, data.add_encode_latents, train.add_train_teacher,
                  train.add_train_classifier, generate.add_sample, train.add_finetune_gan, compare.add_demo,
                  compare.add_sweep, generate.add_generate, convert.add_export_pipeline, convert.add_export_checkpoint,
                  generate.add_evaluate, convert.add_import_teacher, convert.add_import_student]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ardistill", description="Autoregressive distillation of diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _REGISTRATIONS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"ardistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk: one line (DiskFullError from the writers; a bare ENOSPC as a fallback)
        import errno

        from ardistill.io.fileio import DiskFullError, full_disk_error
        full = e if isinstance(e, DiskFullError) else None
        if full is None and e.errno in (errno.ENOSPC, errno.EDQUOT) and isinstance(e.filename, str):
            full = full_disk_error(e.filename)
        if full is None:
            raise
        print(f"ardistill {args.command}: error: {full}", file=sys.stderr)
        return 2
    return int(out) if isinstance(out, int) else 0


def entry() -> None:
    """The ``ardistill`` command: ``main`` as a process exit code.

    Under torchrun a worker whose work is done leaves with ``os._exit`` once its output is flushed: the
    process group is already destroyed, but gloo's (and FSDP's) C++ threads can still be torn down during
    interpreter shutdown, which aborts the process ("terminate called without an active exception") now and
    then and turns a finished run into a failed torchrun job. In one process the exit is the ordinary one.
    """
    import os
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
