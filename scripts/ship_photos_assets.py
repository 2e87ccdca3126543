"""Copy a trained photos teacher and classifier into src/ardistill/assets/ with their JSON sidecars.

Usage (after `ardistill train-teacher --data photos ...` and `ardistill train-classifier --data photos ...`):
  python scripts/ship_photos_assets.py --teacher-run runs/photos-teacher --classifier runs/photos-classifier/photos_classifier.safetensors \
      --teacher-command "..." --classifier-command "..." --machine "..." --teacher-wall-s 1234 [--samples 1000]
Without --classifier the shipped classifier (and its sidecar) stay as they are and only the teacher is replaced.
The sidecars record the training config, losses, command, wall time, machine, metrics and sha256.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ardistill.assets import (PHOTOS_CLASSIFIER, PHOTOS_CLASSIFIER_CONFIG, PHOTOS_TEACHER,
                              PHOTOS_TEACHER_CONFIG)
from ardistill.comparison import BENCHMARKS
from ardistill.evaluation.evaluate import image_metrics
from ardistill.evaluation.features import get_feature_network
from ardistill.io.checkpoints import load_teacher
from ardistill.io.fileio import atomic_write_json, read_json, sha256_file
from ardistill.sample import teacher_metrics


def metrics_dict(m) -> dict:
    return {k: round(float(getattr(m, k)), 4) for k in ("fd", "inception_score", "precision", "recall")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher-run", required=True)
    p.add_argument("--classifier", default=None, help="default: keep the shipped classifier")
    p.add_argument("--teacher-command", required=True)
    p.add_argument("--classifier-command", default=None)
    p.add_argument("--machine", required=True)
    p.add_argument("--teacher-wall-s", type=float, required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--cfg-scales", default="1.0,1.5")
    args = p.parse_args()
    torch.set_num_threads(1)

    if args.classifier is not None:
        if args.classifier_command is None:
            p.error("--classifier needs --classifier-command (recorded in its sidecar)")
        clf_src = Path(args.classifier)
        shutil.copyfile(clf_src, PHOTOS_CLASSIFIER)
        clf = read_json(clf_src.with_suffix(".json"), "classifier summary")
    bench = BENCHMARKS["photos"]
    net = get_feature_network("photos")
    real = net.features(bench.real_images("heldout"))
    floor = image_metrics(bench.real_images("train"), real, net)
    if args.classifier is not None:
        clf.update({"command": args.classifier_command, "machine": args.machine,
                    "floor_train_vs_heldout": metrics_dict(floor), "sha256": sha256_file(PHOTOS_CLASSIFIER)})
        atomic_write_json(PHOTOS_CLASSIFIER_CONFIG, clf)

    run = Path(args.teacher_run)
    shutil.copyfile(run / "teacher.safetensors", PHOTOS_TEACHER)
    config = read_json(run / "config.json", "teacher run config")
    losses = read_json(run / "losses.json", "teacher losses")
    teacher = load_teacher(PHOTOS_TEACHER)
    metrics = {"features": "photos classifier (assets/photos_classifier.safetensors), penultimate 64-d",
               "reference": "held-out photo crops, 2000 images", "samples": args.samples,
               "seeds": f"0-{args.samples - 1}", "labels": "balanced", "solver": "ddim", "steps": 25,
               "clamped": True, "floor_train_vs_heldout": metrics_dict(floor)}
    t0 = time.time()
    for s in (float(x) for x in args.cfg_scales.split(",")):
        metrics[f"cfg_{s}"] = metrics_dict(teacher_metrics(teacher, "photos", num_samples=args.samples, cfg_scale=s))
    metrics["eval_wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(PHOTOS_TEACHER_CONFIG, {
        "command": args.teacher_command, **config, "losses": losses["losses"],
        "run": {"machine": args.machine, "steps": losses["step"], "train_loop_s": losses["elapsed_s"],
                "wall_s": args.teacher_wall_s, "torch_threads": 1},
        "metrics": metrics, "sha256": sha256_file(PHOTOS_TEACHER)})
    clf = read_json(PHOTOS_CLASSIFIER_CONFIG, "classifier sidecar")
    print(json.dumps({"classifier": clf["heldout_accuracy"], "floor": metrics_dict(floor),
                      **{k: v for k, v in metrics.items() if k.startswith("cfg_")}}, indent=1))


if __name__ == "__main__":
    main()
