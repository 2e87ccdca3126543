"""Export a training checkpoint's weights as the single files users load (``ardistill export-checkpoint``).

A sharded (``parallel = "fsdp"``) checkpoint holds its weights as DCP shards, one file per process that
wrote it; this reads them in one process (DCP reshards to whole tensors) and writes the files that
``load_student`` / ``load_teacher`` read, with the same metadata the run writes for its final weights:

- distill: ``student.safetensors``, ``ema.safetensors``;
- finetune-gan: the same plus ``disc_heads.safetensors``;
- train-teacher: ``teacher.safetensors`` (the EMA weights).

A single-file (ddp) checkpoint already holds them: they are copied when ``out`` is another folder.
The finished run's own files (``run_dir/student.safetensors`` ...) are gathered and written at the
end of every run, whatever ``parallel``; this is for the checkpoints in between.
"""

from __future__ import annotations

from pathlib import Path

from ardistill.io.fileio import atomic_write_bytes
from ardistill.training.checkpointer import Checkpointer
from ardistill.training.parallel import DCP_DIR, DCP_FORMAT, load_sharded


def checkpoint_folder(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint folder of ``step`` (default: the latest) in a run folder."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    if step is None:
        folder = ckpt.latest()
        if folder is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint ({ckpt.root / 'latest.json'} not found)")
        return folder
    folder = ckpt.folder(step)
    if not folder.is_dir():
        have = ", ".join(str(int(f.name[5:])) for f in ckpt.folders()) or "none"
        raise FileNotFoundError(f"{folder} not found; the checkpoints of {run_dir} are at steps {have}")
    return folder


def export_checkpoint(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> list[Path]:
    """Write the single-file weights of checkpoint ``step`` (default: the latest) of a run into ``out``
    (default: the checkpoint folder itself, so that ``load_student(checkpoint folder)`` works); returns the paths.

    Runs in one process whatever the number of processes that wrote the checkpoint.
    """
    folder = checkpoint_folder(run_dir, step)
    state = Checkpointer.load_state(folder)
    out = folder if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if state.get("checkpoint_format") != DCP_FORMAT:  # single files already (ddp)
        names = [n for n in ("student.safetensors", "ema.safetensors", "disc_heads.safetensors") if (folder / n).is_file()]
        if out.resolve() != folder.resolve():
            for n in names:
                atomic_write_bytes(out / n, (folder / n).read_bytes())
        return [out / n for n in names]
    meta = {"step": int(state["step"])}
    if "student_config" in state:
        return _export_student(folder, state, out, meta)
    if "model_config" in state:
        return _export_teacher(folder, state, out, meta)
    raise ValueError(f"{folder}: not a checkpoint of distill, finetune-gan or train-teacher (no model config in "
                     f"{folder / 'state.pt'})")


def _export_student(folder: Path, state: dict, out: Path, meta: dict) -> list[Path]:
    from ardistill.io.checkpoints import save_model
    from ardistill.io.student_io import save_student
    from ardistill.models.student import ARDStudent, StudentConfig
    from ardistill.models.student import TextARDStudent, TextStudentConfig

    sc = state["student_config"]
    text = sc.get("teacher", {}).get("caption_channels") is not None  # a TextDiTConfig
    cfg = TextStudentConfig.from_dict(sc) if text else StudentConfig.from_dict(sc)
    make = TextARDStudent if text else ARDStudent
    models = {"student": make(cfg), "ema": make(cfg)}
    if "disc_config" in state:  # finetune-gan
        from ardistill.models.discriminator import DiscriminatorConfig, DiscriminatorHeads
        dcfg = DiscriminatorConfig.from_dict(state["disc_config"])
        models["disc_heads"] = DiscriminatorHeads(dcfg)
    load_sharded(folder / DCP_DIR, models)  # the weights only, whole (resharded to one process)
    meta = {**meta, **state.get("file_meta", {})}
    paths = [save_student(out / "student.safetensors", models["student"], meta),
             save_student(out / "ema.safetensors", models["ema"], meta)]
    if "disc_heads" in models:
        from ardistill.models.discriminator import DISC_HEADS_KIND
        paths.append(save_model(models["disc_heads"], dcfg.to_dict(), out / "disc_heads.safetensors",
                                kind=DISC_HEADS_KIND, extra_metadata=meta))
    return paths


def _export_teacher(folder: Path, state: dict, out: Path, meta: dict) -> list[Path]:
    from ardistill.io.checkpoints import save_model
    from ardistill.models.dit import DiT, DiTConfig
    from ardistill.training.teacher import TEACHER_FILE

    cfg = DiTConfig.from_dict(state["model_config"])
    models = {"model": DiT(cfg), "ema": DiT(cfg)}
    load_sharded(folder / DCP_DIR, models)
    extra = {"train_config": state["train_config"], **meta, "weights": "ema"}
    return [save_model(models["ema"], cfg.to_dict(), out / TEACHER_FILE, kind="teacher", extra_metadata=extra)]
