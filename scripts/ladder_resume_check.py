"""Does a newer commit continue a ladder run exactly as the commit that started it? (before moving a ladder)

Copies one ladder run twice, resumes each copy for a few steps from its latest checkpoint, one with the
code under ``--old-src`` and one with ``--new-src`` (each in its own process, the ladder's settings from
its ladder.json), and compares the resulting EMA weights tensor by tensor:

  python scripts/ladder_resume_check.py --ladder-out /work/ladder/runs/DiT-photos-T \\
      --run step-distillation-seed0 --student "step distillation" --steps 20 \\
      --old-src /work/ladder/wt/src --new-src src

Prints the largest absolute difference and whether every tensor is bit-identical; exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from ardistill.ladder import LadderConfig, LadderRun, distill_config
from ardistill.training.distill import distill
saved, run_dir, student, steps = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import ardistill
if not Path(ardistill.__file__).resolve().is_relative_to(Path(sys.argv[5]).resolve()):
    sys.exit(f"imported ardistill from {ardistill.__file__}, not from {sys.argv[5]}")
known = set(LadderConfig.__dataclass_fields__)
cfg = LadderConfig(**{k: v for k, v in saved.items() if k in known})
start = int(json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"].rpartition("_")[2])
seed = int(json.loads((run_dir / "config.json").read_text())["distill"]["seed"])  # the run's own training seed
distill(replace(distill_config(cfg, LadderRun(student, seed, run_dir), start + steps), ckpt_every=10 ** 9), resume=True)
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ladder-out", required=True, help="the ladder's folder (ladder.json, recordings/, runs/)")
    p.add_argument("--run", required=True, help="the run's folder name under runs/")
    p.add_argument("--student", required=True, help="its student name (a key of LADDER_STUDENTS)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--old-src", required=True)
    p.add_argument("--new-src", required=True)
    args = p.parse_args(argv)
    from safetensors.torch import load_file
    import torch

    saved = json.loads((Path(args.ladder_out) / "ladder.json").read_text())
    src_run = Path(args.ladder_out) / "runs" / args.run
    tmp = Path(tempfile.mkdtemp(prefix="ladder_resume_check_"))
    weights = {}
    try:
        for name, src in (("old", args.old_src), ("new", args.new_src)):
            if not (Path(src) / "ardistill" / "__init__.py").is_file():
                print(f"the {name} code: {src} has no ardistill package (pass a checkout's src folder)")
                return 1
            d = tmp / name
            shutil.copytree(src_run, d, ignore=shutil.ignore_patterns("rungs"))
            env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS="1")
            res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(saved), str(d), args.student,
                                  str(args.steps), str(Path(src).resolve())], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"the {name} code ({src}) failed:\n{res.stderr[-3000:]}")
                return 1
            weights[name] = load_file(str(d / "ema.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = weights["old"], weights["new"]
    if set(a) != set(b):
        print(f"different tensors: {sorted(set(a) ^ set(b))}")
        return 1
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"{args.run}: {args.steps} resumed steps, {len(a)} EMA tensors, max |old - new| = {diff:.3g}, "
          f"bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
