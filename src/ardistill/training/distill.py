"""`ardistill distill`: train an ARD (or step-distillation) student on a trajectory recording.

One loop for 1..N processes (torchrun; DDP over gloo on CPU, NCCL on GPU, or FSDP2 with ``parallel =
"fsdp"``, training/parallel.py). Each optimizer step:
a global batch of trajectories (seeded epoch order, split over ranks and ``grad_accum``
micro-batches) -> teacher-forced student pass over all S blocks at once -> per-step MSE against the
teacher's next states, averaged over steps with optional weights -> AdamW with gradient clipping
-> EMA update. Optionally (``on_policy_prob``) the inputs of blocks 1..S-1 are replaced by the
student's own free-running rollout from the same noise; the targets stay the teacher's recorded
states, or (``on_policy_targets = "teacher"``) are relabelled by the teacher's ODE from the
student's states (relabel.py).

Run folder::

    config.json                 resolved DistillConfig + StudentConfig + recording summary
    log.jsonl, log.csv, tb/     scalars every log_every steps (rank 0)
    checkpoints/latest.json     pointer to the newest complete checkpoint
    checkpoints/step_XXXXXXXX/  student.safetensors, ema.safetensors, state.pt
                                (fsdp: dcp/ with every rank's shards of both and of AdamW, state.pt;
                                ``ardistill export-checkpoint`` writes the single files)
    student.safetensors, ema.safetensors   final weights (load with student_io.load_student)

What is not the regression itself (the run's start and resume, EMA, DDP / FSDP2, checkpoints, RNG, the
NaN guard, logging, the step loop) is trainer.py's ``Trainer``, which GAN fine-tuning shares; see
docs/training.md.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ardistill.io import distributed as dist
from ardistill.io.checkpoints import load_any_teacher
from ardistill.sampling.diffusion import make_process
from ardistill.training.config_checks import (ConfigDict, check_at_least, check_batch_split, check_betas, check_choices,
                                              check_fraction, check_loss_weights)
from ardistill.training.relabel import RELABEL_TARGETS, TeacherRelabeler
from ardistill.io.fileio import read_json
from ardistill.models.masks import check_mask
from ardistill.models.student import HEADS, OUTPUTS, TARGETS, TIME_LABELS, ARDStudent, StudentConfig, block_times_for, ode_step_coeffs
from ardistill.models.student import TextARDStudent, TextStudentConfig
from ardistill.data.record import weights_sha256
from ardistill.training.lr_schedule import lr_at
from ardistill.training.nan_guard import check_finite
from ardistill.training.parallel import check_parallel, full, sync_gradients
from ardistill.training.precision import PRECISIONS, autocast
from ardistill.training.trainer import (Trainer, command_config, load_run_config as _load_run_config, resolve_path,
                                       run_in_process_group)
from ardistill.data.sharded_records import verify_split
from ardistill.data.trajectory_dataset import StudentDataSpec, TrajectoryDataset
from ardistill.data.trajectory_format import load_manifest

ROLLOUT_MODELS = ("student", "ema")
# Fields that may change when a run is resumed. Most decide where and how long or loudly it runs, not
# what a step computes (the LR schedule is warm-up + constant, so extending ``steps`` is exact); the
# recording is identified by content, the teacher by its sha256. ``lr`` may be lowered to recover from
# a divergence (the run then differs from an uninterrupted one, by choice).
# ``parallel`` too: a DDP checkpoint resumes under FSDP2 and the other way round (training/parallel.py); the
# gradient average is then rounded in another order, so the run is not bit-identical to an uninterrupted one.
RUNTIME_FIELDS = ("recording", "teacher", "run_dir", "steps", "lr", "ckpt_every", "keep_every", "log_every",
                  "tensorboard", "progress", "verify_shards", "compile", "parallel")
PATH_FIELDS = ("recording", "teacher", "run_dir")  # stored resolved, so a run resumes from any directory


@dataclass(frozen=True)
class DistillConfig(ConfigDict):
    """Everything that determines a distillation run; saved in config.json and in every checkpoint."""

    recording: str  # trajectory recording folder (ardistill record)
    teacher: str  # the teacher the recording was made with (initialises the student; sha256-checked)
    run_dir: str
    # student (S, the grid times and the image shape come from the recording)
    target: str = "state"  # "state": ODE states (paper figure); "x0": teacher x0-predictions (public code)
    history_layers: int | None = None  # N_h; None = round(depth * 6 / 28), the paper's 6 of DiT-XL/2's 28
    mask: str = "M4"
    time_labels: str = "true"
    heads: str = "shared"
    output: str = "direct"
    grad_checkpointing: bool = False
    # torch.compile the teacher-forced forward (inductor; backward through AOTAutograd). Equal to eager
    # within float32 rounding, so a run may be resumed with or without it; bench/bench_photos_step.py
    # measures the gain (1.1x on the photos student on one CPU thread) and the one-off compile time.
    compile: bool = False
    # optimisation (paper: AdamW lr 1e-4, wd 0, clip 1.0, EMA 0.9999, global batch 64)
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 64  # global batch = micro-batch * processes * grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    warmup_steps: int = 0  # linear learning-rate warm-up, then constant
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)): useful for short runs
    loss_weights: tuple[float, ...] = ()  # one weight per student step; () = equal (public code)
    # on-policy history (issue 5): blocks 1..S-1 from the student's own rollout, with this probability
    on_policy_prob: float = 0.0
    on_policy_start: int = 0  # optimizer steps of pure teacher forcing before on-policy batches begin
    on_policy_model: str = "student"  # weights that roll out: the current "student" or its "ema"
    # targets of on-policy batches: the "recorded" teacher states, or the "teacher"'s ODE run again from
    # the student's own states to the next student time (DAgger-style relabelling; training/relabel.py)
    on_policy_targets: str = "recorded"
    # run
    seed: int = 0
    device: str | None = None  # "cpu", "cuda" or None (cuda when available)
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU is deterministic without it)
    # "ddp": replicated weights, gradients all-reduced; "fsdp": FSDP2, weights, gradients, AdamW moments
    # and EMA sharded over the processes, sharded (DCP) checkpoints (training/parallel.py)
    parallel: str = "ddp"
    ckpt_every: int = 500
    keep_every: int = 0  # keep checkpoints whose step is a multiple of this (0: only the latest)
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    verify_shards: bool = True  # check each shard's sha256 before its first use (False skips it)

    def __post_init__(self):
        check_parallel("DistillConfig.parallel", self.parallel)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        check_choices(self, {"target": TARGETS, "time_labels": TIME_LABELS, "heads": HEADS, "output": OUTPUTS,
                             "on_policy_model": ROLLOUT_MODELS, "precision": PRECISIONS,
                             "on_policy_targets": RELABEL_TARGETS})
        check_mask(self.mask)
        check_at_least(self, 1, ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every"))
        check_at_least(self, 0, ("warmup_steps", "on_policy_start", "keep_every", "weight_decay", "grad_clip", "seed"))
        if self.history_layers is not None:
            check_at_least(self, 0, ("history_layers",))
        if not (self.lr > 0 and self.adam_eps > 0):
            raise ValueError(f"DistillConfig: lr and adam_eps must be > 0, got {self.lr}, {self.adam_eps}")
        check_betas(self, ("betas",))
        check_fraction(self, "ema_decay")
        check_fraction(self, "on_policy_prob")
        if self.on_policy_targets == "teacher" and self.target != "state":
            raise ValueError("DistillConfig.on_policy_targets = 'teacher' relabels ODE states: it needs target 'state', "
                             f"got {self.target!r}")
        if self.on_policy_targets == "teacher" and self.on_policy_prob == 0:
            raise ValueError("DistillConfig.on_policy_targets = 'teacher' relabels on-policy batches: set on_policy_prob > 0")
        check_loss_weights(self)
        check_batch_split(self)


@dataclass
class DistillResult:
    """What a finished run left behind."""

    run_dir: Path
    step: int
    loss: float  # mean training loss over the last logging window
    ema_path: Path
    student_path: Path


def default_history_layers(depth: int) -> int:
    """The paper's N_h = 6 of DiT-XL/2's 28 layers, scaled to ``depth`` (at least 1)."""
    return max(1, round(depth * 6 / 28))


def distill_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-step MSE (S,)); loss = mean_k w_k * MSE_k (plain mean of per-step MSEs for w = 1)."""
    per_step = (pred.float() - target.float()).pow(2).mean(dim=(0, 2, 3, 4))
    return (per_step * weights).mean(), per_step


@torch.no_grad()
def on_policy_inputs(model: ARDStudent, inputs: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    """Inputs whose blocks 1..S-1 are ``model``'s own KV-cached rollout from the same noise (block 0).

    ``cond``: the labels (class student), or the caption tokens and mask (text student). Eval mode,
    no gradient; for target "x0" the rollout's outputs are x0-predictions, as the inputs.
    """
    was_training = model.training
    model.eval()
    try:
        outs = model.sample(inputs[:, 0], *cond, return_all=True)  # (B, S, C, H, W)
    finally:
        model.train(was_training)
    return torch.cat([inputs[:, :1], outs[:, :-1].to(inputs.dtype)], dim=1)


def is_text_recording(manifest: dict) -> bool:
    """A recording of a text teacher (its records reference a prompt store)."""
    return manifest["teacher"].get("kind") == "text"


def load_distill_teacher(path: str, manifest: dict):
    """The recording's teacher: a TextDiT for a text recording, else any DiT checkpoint."""
    if is_text_recording(manifest):
        from ardistill.io.pixart import load_any_text_teacher  # ours, a PixArt folder or an original .pth
        return load_any_text_teacher(path, **manifest_pth_options(manifest))
    return load_any_teacher(path)


def _store_dtype(store: str) -> str:
    """Storage dtype of a prompt store's tokens (float16 when its manifest is not readable)."""
    path = Path(store) / "manifest.json"
    return read_json(path, "prompt store manifest")["layout"]["dtype"] if path.is_file() else "float16"


def manifest_pth_options(manifest: dict) -> dict:
    """What an original PixArt .pth cannot tell (its image size, position scale), from the recorded teacher config."""
    c = manifest["teacher"]["config"]
    return {"image_size": 8 * int(c["input_size"][0]), "interpolation_scale": c.get("interpolation_scale"),
            "num_heads": c.get("num_heads")}


def build_distill_student(cfg: DistillConfig, teacher, manifest: dict) -> ARDStudent:
    """The student a config asks for, initialised from the teacher, with S and grid times from the recording."""
    S = int(manifest["layout"]["num_steps"])
    times = [float(t) for t in manifest["grid"]["times"]]
    proc = dict(manifest["sampler"]["process"])
    process = make_process(proc.pop("kind"), **proc)
    depth = teacher.cfg.depth
    nh = default_history_layers(depth) if cfg.history_layers is None else cfg.history_layers
    if nh > depth:
        raise ValueError(f"DistillConfig.history_layers = {nh} exceeds the teacher's depth {depth}")
    config_cls, student_cls = ((TextStudentConfig, TextARDStudent) if is_text_recording(manifest)
                               else (StudentConfig, ARDStudent))
    scfg = config_cls(teacher=teacher.cfg, num_steps=S, history_layers=nh, mask=cfg.mask, target=cfg.target,
                         time_labels=cfg.time_labels, heads=cfg.heads,
                         block_times=block_times_for(times, S, cfg.time_labels, process.model_time),
                         output=cfg.output, step_coeffs=ode_step_coeffs(process, times) if cfg.output == "ode_step" else (),
                         grad_checkpointing=cfg.grad_checkpointing)
    return student_cls.from_teacher(teacher, scfg)


def _open_data(cfg: DistillConfig, teacher, manifest: dict):
    tc = teacher.cfg
    S = int(manifest["layout"]["num_steps"])
    split = cfg.verify_shards and dist.world_size() > 1
    if is_text_recording(manifest):
        from ardistill.data.prompts import TextTrajectoryDataset
        spec = StudentDataSpec(num_steps=S, target=cfg.target, shape=(tc.in_channels, *tc.input_size),
                               teacher_sha256=weights_sha256(teacher))
        data = TextTrajectoryDataset(cfg.recording, expect=spec, verify_shards=cfg.verify_shards, split_verify=split)
        stores = [data, data.store]
    else:
        spec = StudentDataSpec(num_steps=S, target=cfg.target,
                               shape=(tc.in_channels, tc.input_size, tc.input_size), num_classes=tc.num_classes,
                               teacher_sha256=weights_sha256(teacher))
        data = TrajectoryDataset(cfg.recording, expect=spec, verify_shards=cfg.verify_shards)
        stores = [data]
    if split:  # under torchrun the ranks hash the shards once between them, up front, and agree
        verify_split(stores, dist.rank(), dist.world_size(), dist.all_gather_object)
    return data


def batch_condition(b: dict, device) -> tuple[torch.Tensor, ...]:
    """What the student reads besides its inputs: (labels,) or (caption tokens, caption mask)."""
    keys = ("text", "text_mask") if "text" in b else ("label",)
    return tuple(b[k].to(device, non_blocking=True) for k in keys)


def recording_id(manifest: dict) -> str:
    """Content identity of a recording: sha256 over its shards' checksums (survives moving the folder)."""
    return hashlib.sha256("".join(sh["sha256"] for sh in manifest["shards"]).encode()).hexdigest()


def load_run_config(run_dir: str | Path) -> DistillConfig:
    """The DistillConfig of an existing run (from its latest checkpoint, else config.json)."""
    return _load_run_config(DistillConfig, run_dir, "distill")


def distill(cfg: DistillConfig, resume: bool = False, teacher=None) -> DistillResult:
    """Train a student as ``cfg`` says; with ``resume``, continue the run in ``cfg.run_dir`` exactly.

    A text recording (``record_text``) trains a TextARDStudent on its captions; a class recording an ARDStudent.

    Args:
        cfg: the run's settings. On resume they must equal the saved ones except RUNTIME_FIELDS.
        resume: continue from the latest checkpoint of ``cfg.run_dir`` (a fresh start if it has none).
        teacher: the model at ``cfg.teacher``, already loaded (a demo loads it once for all its runs); None
            loads it. Either way its weights are checked against the recording's teacher (sha256).
    Works in one process or under torchrun (the process group is started here if needed).
    """
    cfg = replace(cfg, **{k: resolve_path(getattr(cfg, k)) for k in PATH_FIELDS})
    return run_in_process_group(_Distiller, cfg, resume, teacher)


def distill_command(options: dict, resume: bool = False) -> DistillResult:
    """`ardistill distill`: ``options`` are the DistillConfig fields given on the command line.

    With ``resume`` and no ``recording``, the settings come from the run folder (``run_dir``), and
    only the given options are applied on top (runtime fields only; others must match).
    """
    cfg = command_config(DistillConfig, options, resume, ("recording", "teacher", "run_dir"), "distill")
    result = distill(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.run_dir}: {result.step} steps, loss {result.loss:.4g}; EMA weights {result.ema_path}")
    return result


class _Distiller(Trainer):
    """State of one distillation run; ``run()`` (trainer.Trainer) is the loop."""

    RUNTIME_FIELDS = RUNTIME_FIELDS

    def _build(self, state: dict | None) -> None:
        cfg, device = self.cfg, self.device
        manifest = load_manifest(cfg.recording)
        teacher = self.given_teacher if self.given_teacher is not None else load_distill_teacher(cfg.teacher, manifest)
        self.data = _open_data(cfg, teacher, manifest)
        student = build_distill_student(cfg, teacher, manifest)
        self.relabel = None
        if cfg.on_policy_targets == "teacher":  # the teacher stays, to relabel on-policy targets
            null = self.data.null_text() if is_text_recording(manifest) else None
            self.relabel = TeacherRelabeler(teacher.to(device), manifest, null)
        del teacher
        self.given_teacher = None  # the trainer keeps no reference to the caller's teacher
        self.manifest = manifest
        self.scfg, self.recording_id = student.cfg, recording_id(manifest)
        # a text student's files carry its encoder's spec (when the prompt store recorded one), so that
        # `ardistill generate --prompt` can encode captions from the student file alone
        spec = manifest.get("prompts", {}).get("encoder", {}).get("spec")
        self.file_meta = {"text_encoder": spec} if spec else {}
        prompts = manifest.get("prompts")
        if prompts and prompts["encoder"].get("kind") == "t5-encoder":  # what ARDPipeline needs to encode alike
            self.file_meta["prompt_encoding"] = {"max_length": prompts["encoder"]["max_length"],
                                                 "preprocess": prompts["encoder"].get("preprocess", "lower"),
                                                 "embedding_dtype": _store_dtype(prompts["store"])}
        S = self.scfg.num_steps
        if cfg.loss_weights and len(cfg.loss_weights) != S:
            raise ValueError(f"DistillConfig.loss_weights has {len(cfg.loss_weights)} entries, the recording has "
                             f"S = {S} steps")
        self.weights = torch.tensor(cfg.loss_weights or [1.0] * S, device=device)

        # fsdp: the student and its EMA copy sharded per transformer block (``sample`` runs the rollouts)
        self.model = self._train_student(student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        # foreach: the same arithmetic as the per-tensor loop (bit-identical weights, measured in
        # bench/bench_photos_step.py), in fewer, larger kernels; torch picks it by default on CUDA only
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay, foreach=True)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.order = self._data_order(len(self.data), cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # on-policy coin flips; the same on every rank
        self.window = torch.zeros(self.scfg.num_steps, device=device)  # per-step losses summed over a logging window
        self._reset_window()
        self.last_loss = float("nan")  # mean training loss over the last logging window

    def _run_info(self) -> dict:
        return {"distill": self.cfg.to_dict(), "student": self.scfg.to_dict(), "world_size": dist.world_size(),
                "recording": {"count": len(self.data), "grid": self.manifest["grid"],
                              "sampler": self.manifest["sampler"]}}

    # ---- checkpoints ----------------------------------------------------------------------------
    def _optimizers(self) -> dict:
        return {"optimizer": (self.student, self.opt)}

    def _generators(self) -> dict:
        return {"on_policy": self.gen}

    def _check_resumable(self, folder: Path, state: dict) -> None:
        super()._check_resumable(folder, state)
        if type(self.scfg).from_dict(state["student_config"]) != self.scfg:
            raise ValueError(f"{folder}: the student config saved there differs from the one this run builds")

    def _state(self) -> dict:
        return {**self._common_state(), "config": self.cfg.to_dict(), "student_config": self.scfg.to_dict(),
                "recording_id": self.recording_id, "world_size": dist.world_size(),
                "file_meta": self.file_meta}  # what export-checkpoint puts in the weight files' metadata

    # ---- one optimizer step ---------------------------------------------------------------------
    def _on_policy(self) -> bool:
        cfg = self.cfg
        if cfg.on_policy_prob <= 0 or self.step < cfg.on_policy_start:
            return False
        return bool(torch.rand((), generator=self.gen) < cfg.on_policy_prob)

    def _train_step(self) -> tuple[torch.Tensor, float, int]:
        """One optimizer step; returns (global per-step MSE (S,), gradient norm, on-policy micro-batches)."""
        cfg, dev = self.cfg, self.device
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        micro = self.order.next_step()
        per_step_sum = torch.zeros(self.scfg.num_steps, device=dev)
        n_on_policy = 0

        def batch() -> str:  # for the NaN guard: which records of which shard this rank trained on
            return self.data.describe_batch(np.concatenate([np.asarray(i, dtype=np.int64) for i in micro]))

        for m, idx in enumerate(micro):
            b = self.data.batch(idx)
            x, target = (b[k].to(dev, non_blocking=True) for k in ("inputs", "targets"))
            cond = batch_condition(b, dev)
            if self._on_policy():
                roller = self.student if cfg.on_policy_model == "student" else self.ema.module
                with autocast(dev, self.precision):
                    x = on_policy_inputs(roller, x, *cond)
                if self.relabel is not None:
                    target = self.relabel(x, target, *cond)
                n_on_policy += 1
            with sync_gradients(self.model, m == len(micro) - 1):
                with autocast(dev, self.precision):
                    pred = self.forward(x, *cond)
                loss, per_step = distill_loss(pred, target, self.weights)
                (loss / len(micro)).backward()
            per_step_sum += per_step.detach()
        # global mean over ranks and micro-batches; the guard runs before any weight changes
        stats = dist.all_reduce_sum(per_step_sum / (len(micro) * dist.world_size()))
        check_finite(stats, self.step, "loss per step", self.last_ckpt, batch)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True))
        check_finite(grad_norm.reshape(1), self.step, "gradient norm", self.last_ckpt, batch)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.student)
        self.step += 1
        return stats, float(grad_norm), n_on_policy

    # ---- logging --------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        """A new logging window: its per-step losses, steps, on-policy and all micro-batches, busy seconds."""
        self.window.zero_()
        self.n, self.n_policy, self.n_micro, self.busy = 0, 0, 0, 0.0

    def _account(self, out: tuple[torch.Tensor, float, int], busy: float) -> None:
        stats, self.grad_norm, on_policy = out
        self.busy += busy
        self.window += stats
        self.n, self.n_policy, self.n_micro = self.n + 1, self.n_policy + on_policy, self.n_micro + self.cfg.grad_accum

    def _log(self, bar) -> None:
        n = self.n
        per_step = (self.window / n).tolist()
        self.last_loss = float((torch.tensor(per_step) * self.weights.cpu()).mean())
        scalars = {"loss": self.last_loss, **{f"loss/step_{k + 1}": v for k, v in enumerate(per_step)},
                   "lr": self.opt.param_groups[0]["lr"], "grad_norm": self.grad_norm,
                   "samples_per_s": n * self.order.global_batch / self.busy,
                   "on_policy_frac": self.n_policy / self.n_micro,
                   "epoch": self.order.position.epoch + self.order.position.offset / len(self.data)}
        self.logger.log(self.step, scalars)
        bar.set_postfix(loss=f"{self.last_loss:.4g}")
        self._reset_window()

    def _result(self) -> DistillResult:
        return DistillResult(run_dir=self.run_dir, step=self.step, loss=self.last_loss,
                             ema_path=self.run_dir / "ema.safetensors", student_path=self.run_dir / "student.safetensors")
