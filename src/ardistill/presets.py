"""Named recipes: one JSON file per preset in ``src/ardistill/configs/`` (package data), resolved and validated as a whole.

A preset describes a complete experiment: the teacher (registry size and checkpoint file name), the
codec (SD VAE latents or pixels), the data, what to record, the student, the distillation run, the
evaluation, and the launch shape it was written for (nodes x processes). Paths that depend on the
user's machine (checkpoint, VAE folder, ImageNet, run folders) are *not* in a preset: they come from
the command line. A preset may ``extends`` another and override only what differs.

Resolution checks every section against the real configs (DiTConfig, RecordConfig, StudentConfig,
DistillConfig) and the contradictions between sections (global batch vs processes x micro-batch x
accumulation, history_layers vs depth, grid vs teacher steps and S, guidance channels vs latent
channels, codec vs teacher input, evaluation seeds vs training seeds); a contradiction is a
``PresetError`` naming the preset file and the key.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_ENV = "ARDISTILL_CONFIGS"  # extra folder searched for presets, before the packaged presets (ardistill/configs/)
SECTIONS = ("name", "description", "extends", "notes", "teacher", "codec", "data", "record", "student", "distill",
            "eval", "launch")
CODECS = ("sd-vae", "identity")
DATA_KINDS = ("image-folder", "digits")
STUDENT_KEYS = ("num_steps", "history_layers", "mask", "target", "time_labels", "heads", "output", "grad_checkpointing")
# DistillConfig fields that name this run's files or this machine: from the command line, never a preset
PATH_KEYS = ("recording", "teacher", "run_dir", "device")


class PresetError(ValueError):
    """A preset that cannot be resolved: unknown key, bad value, or sections that contradict each other."""


def config_dirs() -> list[Path]:
    """Folders searched for ``<name>.json``: $ARDISTILL_CONFIGS, then ardistill/configs/ (package data,
    so an installed wheel has them too)."""
    dirs = [Path(os.environ[CONFIG_ENV])] if os.environ.get(CONFIG_ENV) else []
    return dirs + [Path(__file__).resolve().parent / "configs"]


def list_presets() -> list[str]:
    return sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.json")})


def find_preset(name: str) -> Path:
    """A preset name (``imagenet256-ard``) or a path to a .json file -> the file."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    for d in config_dirs():
        if (d / f"{name}.json").is_file():
            return d / f"{name}.json"
    raise PresetError(f"unknown preset {name!r}; choose from {list_presets()} or give a path to a .json file "
                      f"(searched {[str(d) for d in config_dirs()]})")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_preset(name: str, _seen: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """The raw preset dict with ``extends`` chains merged (later files override earlier ones)."""
    path = find_preset(name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PresetError(f"preset {path} is not valid JSON: {e}") from e
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise PresetError(f"preset {path}: unknown sections {sorted(unknown)}; allowed: {SECTIONS}")
    parent = raw.pop("extends", None)
    if parent:
        if parent in _seen:
            raise PresetError(f"preset {path}: 'extends' cycle through {parent!r}")
        base, _ = read_preset(parent, _seen + (raw.get("name", path.stem),))
        base.pop("notes", None)  # notes describe one file, not its children
        raw = _deep_merge(base, raw)
    return raw, path


def set_dotted(d: dict, key: str, value: Any) -> dict:
    """``set_dotted(d, "distill.lr", 2e-4)``; the section must exist, the field may be new (validated later)."""
    section, _, field = key.partition(".")
    if not field or section not in d or not isinstance(d[section], dict):
        raise PresetError(f"override {key!r}: expected <section>.<field> with a section of {list(d)}")
    d[section][field] = value
    return d


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"distill.lr=2e-4"`` -> ("distill.lr", 0.0002); the value is JSON if it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise PresetError(f"override {text!r}: expected key=value, e.g. distill.lr=2e-4")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


# ------------------------------------------------------------------------------------------------
# The resolved preset


@dataclass(frozen=True)
class Preset:
    """A validated recipe; build the run configs with ``record_config`` / ``distill_config``."""

    name: str
    source: str
    raw: dict  # merged sections as written (overrides applied)
    world_size: int  # processes the batch split is resolved for
    derived: dict  # values computed from the sections (grid, batch split, sizes, FLOPs)

    # ---- run configs ----------------------------------------------------------------------------
    def teacher_config(self):
        from ardistill.models.dit import dit_config
        t = self.raw["teacher"]
        return dit_config(t["arch"], **t.get("config", {}))

    def record_config(self):
        from ardistill.data.record import RecordConfig
        return RecordConfig(**self.raw["record"])

    def distill_fields(self) -> dict:
        """DistillConfig fields of the preset (paths excluded), with grad_accum resolved for world_size."""
        s = {k: v for k, v in self.raw["student"].items() if k != "num_steps"}
        d = {k: v for k, v in self.raw["distill"].items() if k != "micro_batch"}
        d["grad_accum"] = self.derived["batch"]["grad_accum"]
        return {**s, **d}

    def distill_config(self, recording: str, teacher: str, run_dir: str, **overrides):
        from ardistill.training.distill import DistillConfig
        return DistillConfig(recording=recording, teacher=teacher, run_dir=run_dir,
                             **{**self.distill_fields(), **overrides})

    def student_config(self):
        """The StudentConfig this preset trains (block times from the recorded grid)."""
        from ardistill.sampling.diffusion import process_for
        from ardistill.sampling.ode import grid_times
        from ardistill.models.student import StudentConfig, block_times_for
        tcfg = self.teacher_config()
        rec = self.record_config()
        process = process_for(tcfg)
        times = grid_times(process, rec.teacher_steps)
        grid = [times[p] for p in rec.grid_positions()]
        s = {k: v for k, v in self.raw["student"].items() if k != "num_steps"}
        s.setdefault("history_layers", _default_history_layers(tcfg.depth))
        return StudentConfig(teacher=tcfg, num_steps=rec.num_steps,
                             block_times=block_times_for(grid, rec.num_steps, s.get("time_labels", "true"),
                                                         process.model_time), **s)

    def to_dict(self) -> dict:
        """Everything resolved: the sections (with defaults filled in) and the derived values (for --dry-run)."""
        out = {"name": self.name, "source": self.source, "description": self.raw.get("description", ""),
               "world_size": self.world_size}
        out["teacher"] = {**self.raw["teacher"], "config": self.teacher_config().to_dict()}
        out["codec"], out["data"] = self.raw["codec"], self.raw["data"]
        rec = self.record_config()
        out["record"] = {f.name: getattr(rec, f.name) for f in fields(rec)}
        out["student"] = {k: v for k, v in self.student_config().to_dict().items() if k != "teacher"}
        out["distill"] = {k: v for k, v in self.distill_fields().items() if k not in STUDENT_KEYS}
        out["distill"]["micro_batch"] = self.derived["batch"]["micro_batch"]
        out["eval"], out["launch"] = self.raw["eval"], self.raw["launch"]
        out["derived"] = self.derived
        if self.raw.get("notes"):
            out["notes"] = self.raw["notes"]
        return json.loads(json.dumps(out, default=list))  # tuples -> lists, plain JSON types

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _default_history_layers(depth: int) -> int:
    from ardistill.training.distill import default_history_layers
    return default_history_layers(depth)


def load_preset(name: str, world_size: int | None = None, overrides: dict[str, Any] | None = None) -> Preset:
    """Read, merge, override and validate a preset.

    Args:
        name: preset name (``imagenet256-ard``) or path to a .json file.
        world_size: processes to split the global batch over; default: $WORLD_SIZE under torchrun,
            else the preset's launch shape (nnodes x nproc_per_node).
        overrides: dotted keys, e.g. ``{"distill.lr": 2e-4, "record.count": 1000}``.
    """
    raw, path = read_preset(name)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return resolve(raw, str(path), world_size)


def resolve(raw: dict, source: str = "<dict>", world_size: int | None = None) -> Preset:
    """Validate a merged preset dict; raise PresetError naming ``source`` and the key at fault."""
    where = f"preset {source}"
    try:
        return _resolve(copy.deepcopy(raw), where, world_size)
    except PresetError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # a config class rejected a value: say which preset
        raise PresetError(f"{where}: {e}") from e


def _need(raw: dict, section: str, where: str) -> dict:
    if not isinstance(raw.get(section), dict):
        raise PresetError(f"{where}: section {section!r} is missing")
    return raw[section]


def _check_keys(section: dict, allowed, name: str, where: str) -> None:
    unknown = set(section) - set(allowed)
    if unknown:
        raise PresetError(f"{where}: unknown keys in {name!r}: {sorted(unknown)}; allowed: {sorted(allowed)}")


def _resolve(raw: dict, where: str, world_size: int | None) -> Preset:
    from ardistill.sampling.diffusion import process_for
    from ardistill.models.dit import DiT_models
    from ardistill.evaluation.flops import sampling_flops
    from ardistill.sampling.ode import grid_times
    from ardistill.data.record import RecordConfig
    from ardistill.training.distill import DistillConfig
    from ardistill.data.trajectory_format import Layout

    name = raw.get("name") or Path(where.removeprefix("preset ")).stem
    teacher, codec, data, rec = (_need(raw, s, where) for s in ("teacher", "codec", "data", "record"))
    student, distill, ev, launch = (_need(raw, s, where) for s in ("student", "distill", "eval", "launch"))

    # teacher
    _check_keys(teacher, ("arch", "config", "checkpoint"), "teacher", where)
    if teacher.get("arch") not in DiT_models:
        raise PresetError(f"{where}: teacher.arch {teacher.get('arch')!r} is not a registered DiT size")
    teacher.setdefault("config", {})
    teacher.setdefault("checkpoint", None)
    preset = Preset(name=name, source=where.removeprefix("preset "), raw=raw, world_size=1, derived={})
    tcfg = preset.teacher_config()
    C, H = tcfg.in_channels, tcfg.input_size

    # codec and data: the teacher's input is the codec's latent
    _check_keys(codec, ("kind", "vae", "scale", "image_size", "downsample", "latent_channels", "image_channels"),
                "codec", where)
    if codec.get("kind") not in CODECS:
        raise PresetError(f"{where}: codec.kind must be one of {CODECS}, got {codec.get('kind')!r}")
    if codec["kind"] == "identity":
        codec.setdefault("scale", 1.0)
        codec.setdefault("downsample", 1)
        codec.setdefault("latent_channels", C)
        codec.setdefault("image_channels", C)
    else:
        from ardistill.data.vae import SD_VAE_SCALE
        codec.setdefault("scale", SD_VAE_SCALE)
        codec.setdefault("downsample", 8)
        codec.setdefault("latent_channels", 4)
        codec.setdefault("image_channels", 3)
        codec.setdefault("vae", None)
    codec.setdefault("image_size", H * codec["downsample"])
    if codec["latent_channels"] != C:
        raise PresetError(f"{where}: codec.latent_channels = {codec['latent_channels']} but the teacher has "
                          f"in_channels = {C}")
    if codec["image_size"] != H * codec["downsample"]:
        raise PresetError(f"{where}: codec.image_size = {codec['image_size']} but the teacher's input_size {H} x "
                          f"codec.downsample {codec['downsample']} = {H * codec['downsample']}")
    _check_keys(data, ("kind", "image_size", "hflip", "latent_dtype"), "data", where)
    if data.get("kind") not in DATA_KINDS:
        raise PresetError(f"{where}: data.kind must be one of {DATA_KINDS}, got {data.get('kind')!r}")
    data.setdefault("image_size", codec["image_size"])
    if data["image_size"] != codec["image_size"]:
        raise PresetError(f"{where}: data.image_size = {data['image_size']} but codec.image_size = {codec['image_size']}")

    # record
    _check_keys(rec, [f.name for f in fields(RecordConfig)], "record", where)
    rcfg = RecordConfig(**rec)
    if rcfg.guidance_channels is not None and not 1 <= rcfg.guidance_channels <= C:
        raise PresetError(f"{where}: record.guidance_channels = {rcfg.guidance_channels} but the teacher has "
                          f"{C} channels (the legacy option guides the first 3 of 4 latent channels)")
    if rcfg.cfg_scale != 1.0 and not tcfg.class_dropout_prob > 0:
        raise PresetError(f"{where}: record.cfg_scale = {rcfg.cfg_scale} needs a teacher trained with label dropout")
    if rcfg.classes is not None and not all(0 <= c < tcfg.num_classes for c in rcfg.classes):
        raise PresetError(f"{where}: record.classes must lie in [0, {tcfg.num_classes})")
    if rcfg.heun_last_step is not None:  # "heun" needs a flow teacher (the VP ODE ends where eps is undefined)
        from ardistill.sampling.diffusion import process_for
        from ardistill.sampling.ode import resolve_heun_last_step
        try:
            resolve_heun_last_step(rcfg.solver, process_for(tcfg), rcfg.heun_last_step)
        except ValueError as e:
            raise PresetError(f"{where}: record.heun_last_step: {e}") from None
    positions = rcfg.grid_positions()
    if rcfg.positions is not None and rec.get("grid") is not None:
        from ardistill.sampling.diffusion import student_grid
        implied = student_grid(rcfg.teacher_steps, rcfg.num_steps, rcfg.grid)
        if implied != positions:
            raise PresetError(f"{where}: record.positions {positions} contradict record.grid {rcfg.grid!r}, "
                              f"which gives {implied} for {rcfg.num_steps} of {rcfg.teacher_steps} steps")

    # student: a named recipe (models.student.STUDENT_RECIPES) fills the fields the section leaves out
    _check_keys(student, STUDENT_KEYS + ("recipe",), "student", where)
    recipe = student.pop("recipe", None)
    if recipe is not None:
        from ardistill.models.student import STUDENT_RECIPES
        if recipe not in STUDENT_RECIPES:
            raise PresetError(f"{where}: student.recipe {recipe!r} is not a named recipe; choose from "
                              f"{sorted(STUDENT_RECIPES)}")
        for key, value in STUDENT_RECIPES[recipe].items():
            student.setdefault(key, value)
    if student.get("num_steps", rcfg.num_steps) != rcfg.num_steps:
        raise PresetError(f"{where}: student.num_steps = {student['num_steps']} but the recording has "
                          f"record.num_steps = {rcfg.num_steps} ({len(positions)} grid positions)")
    nh = student.get("history_layers")
    if nh is not None and not 0 <= nh <= tcfg.depth:
        raise PresetError(f"{where}: student.history_layers = {nh} is outside [0, depth = {tcfg.depth}] of "
                          f"{teacher['arch']}")
    if student.get("target") == "x0" and not rcfg.x0_preds:
        raise PresetError(f"{where}: student.target 'x0' needs record.x0_preds = true")
    scfg = preset.student_config()  # StudentConfig validates the rest

    # distill: the global batch split over processes
    _check_keys(distill, [f.name for f in fields(DistillConfig) if f.name not in PATH_KEYS + STUDENT_KEYS]
                + ["micro_batch"], "distill", where)
    _check_keys(launch, ("nnodes", "nproc_per_node"), "launch", where)
    launch.setdefault("nnodes", 1)
    launch.setdefault("nproc_per_node", 1)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", launch["nnodes"] * launch["nproc_per_node"]))
    if world_size < 1:
        raise PresetError(f"{where}: world size must be >= 1, got {world_size}")
    batch = _split_batch(distill, world_size, where)
    if batch["global"] > rcfg.count:
        raise PresetError(f"{where}: distill.batch_size = {batch['global']} exceeds record.count = {rcfg.count}")
    d = dict(preset.__dict__, world_size=world_size)
    preset = Preset(**{**d, "derived": {"batch": batch}})
    DistillConfig(recording="-", teacher="-", run_dir="-", **preset.distill_fields())  # validates the values

    # eval
    _check_keys(ev, ("num_samples", "batch_size", "base_seed", "reference", "features", "teacher_steps"),
                "eval", where)
    for key in ("num_samples", "batch_size"):
        if not isinstance(ev.get(key), int) or ev[key] < 1:
            raise PresetError(f"{where}: eval.{key} must be an integer >= 1, got {ev.get(key)!r}")
    ev.setdefault("base_seed", rcfg.base_seed + rcfg.count)
    ev.setdefault("teacher_steps", rcfg.teacher_steps)
    a0, a1 = rcfg.base_seed, rcfg.base_seed + rcfg.count
    b0, b1 = ev["base_seed"], ev["base_seed"] + ev["num_samples"]
    if a0 < b1 and b0 < a1:
        raise PresetError(f"{where}: eval seeds [{b0}, {b1}) overlap the recorded trajectories' seeds [{a0}, {a1}); "
                          f"evaluate on noise the student never trained on (eval.base_seed >= {a1})")

    # derived numbers, for --dry-run and the docs
    process = process_for(tcfg)
    times = grid_times(process, rcfg.teacher_steps)
    layout = Layout(num_steps=rcfg.num_steps, shape=(C, H, H), dtype=rcfg.dtype, x0_preds=rcfg.x0_preds)
    steps = distill.get("steps", DistillConfig.__dataclass_fields__["steps"].default)
    fl = sampling_flops(tcfg, rcfg.teacher_steps, rcfg.num_steps, scfg.history_layers, scfg.mask, rcfg.cfg_scale)
    derived = {
        "student_recipe": recipe,
        "batch": batch,
        "grid": {"positions": positions, "times": [times[p] for p in positions],
                 "block_times": list(scfg.block_times)},
        "tokens": {"per_block": tcfg.num_patches, "sequence": rcfg.num_steps * tcfg.num_patches},
        "history_layers": scfg.history_layers,
        "recording_bytes": layout.record_bytes * rcfg.count,
        "samples_seen": steps * batch["global"],
        "epochs_over_recording": round(steps * batch["global"] / rcfg.count, 3),
        "gflops_per_sample": {"teacher": fl.teacher / 1e9, "step_distillation": fl.step_distillation / 1e9,
                              "ard": fl.ard / 1e9, "ard_overhead": fl.ard_overhead},
    }
    return Preset(**{**preset.__dict__, "derived": derived})


def _split_batch(distill: dict, world: int, where: str) -> dict:
    """global = world x micro_batch x grad_accum; whichever of micro_batch / grad_accum is missing is derived."""
    from ardistill.training.distill import DistillConfig
    g = distill.get("batch_size", DistillConfig.__dataclass_fields__["batch_size"].default)
    micro, accum = distill.get("micro_batch"), distill.get("grad_accum")  # None = derive it
    if micro is not None:
        if micro < 1 or g % (world * micro):
            raise PresetError(f"{where}: distill.batch_size = {g} is not divisible by {world} processes x "
                              f"micro_batch {micro}; choose a micro_batch that divides {g // world if g % world == 0 else g}"
                              f" or another number of processes")
        derived_accum = g // (world * micro)
        if accum is not None and accum != derived_accum:
            raise PresetError(f"{where}: distill.batch_size {g} != {world} processes x micro_batch {micro} x "
                              f"grad_accum {accum} = {world * micro * accum}")
        accum = derived_accum
    else:
        accum = 1 if accum is None else accum
        if accum < 1 or g % (world * accum):
            raise PresetError(f"{where}: distill.batch_size = {g} is not divisible by {world} processes x "
                              f"grad_accum {accum}")
        micro = g // (world * accum)
    return {"global": g, "world_size": world, "micro_batch": micro, "grad_accum": accum}
