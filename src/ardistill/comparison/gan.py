"""The GAN stage of the class-conditional comparison: ARD (R+G) and its regression-only control.

A distilled ARD student is fine-tuned with regression + hinge GAN against a frozen-teacher discriminator
(training/finetune_gan.py, docs/gan.md) with the digits' recommended settings; the control runs the same
steps with GAN weight 0, so the difference between the two rows is the GAN's alone.
"""

from __future__ import annotations

import time
from pathlib import Path

GAN_ROW = "ARD (R+G)"
GAN_CONTROL_ROW = "ARD (R, control)"


def gan_settings(cfg) -> dict:
    """The GAN stage's settings of a comparison: the digits' recommended ones with ``cfg.gan`` on top."""
    from ardistill.training.finetune_gan import DIGITS_GAN_SETTINGS
    return dict(DIGITS_GAN_SETTINGS, **cfg.gan)


def finetune_variant(cfg, student_run: Path, seed: int, recording: Path, teacher_path: Path,
                     control: bool = False) -> Path:
    """ARD (R+G): GAN fine-tuning of a distilled student with ``gan_settings(cfg)`` (resumes).

    ``control=True`` runs the same fine-tuning with GAN weight 0 (regression only, same steps, same
    data order): it separates the GAN's effect from simply training longer.
    """
    from ardistill.training.finetune_gan import GANConfig, finetune_gan

    settings = dict(gan_settings(cfg), **({"gan_factor": 0.0} if control else {}))
    run_dir = Path(cfg.out) / "students" / f"{student_run.name}-{'control' if control else 'gan'}"
    t0 = time.perf_counter()
    res = finetune_gan(GANConfig(student=str(student_run), recording=str(recording), teacher=str(teacher_path),
                                 run_dir=str(run_dir), real=cfg.bench.gan_real, seed=seed, device=cfg.device,
                                 progress=cfg.progress, tensorboard=False, **settings), resume=True)
    print(f"[finetune-gan {run_dir.name}] {res.step} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def gan_rows(cfg, runs: dict, ard_name: str, recording: Path, teacher_path: Path) -> dict:
    """The GAN stage on ``ard_name``'s students: (row, seed) -> run folder for the control and the R+G row."""
    return {(row, seed): finetune_variant(cfg, runs[(ard_name, seed)], seed, recording, teacher_path,
                                          control=row == GAN_CONTROL_ROW)
            for seed in cfg.seeds for row in (GAN_CONTROL_ROW, GAN_ROW)}


def gan_note(cfg) -> str:
    """The report's note on the two GAN rows."""
    G = gan_settings(cfg)
    return (f"{GAN_ROW}: the ARD (R) student fine-tuned {G['steps']} more steps with regression + hinge GAN "
            f"(factor {G['gan_factor']}, GAN weight 0 for the first {G['gan_warmup']} steps, frozen-teacher "
            f"discriminator; docs/gan.md). {GAN_CONTROL_ROW}: the same {G['steps']} steps with GAN weight "
            "0, so the difference between the two rows is the GAN's alone.")
