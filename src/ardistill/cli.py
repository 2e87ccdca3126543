"""Command line: a thin argparse shell; every subcommand calls one importable function.

Each subcommand is registered by an ``_add_<name>`` function below (kebab-case flags). Keep the
work in the library modules: a handler only parses, calls, and prints.
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_version(sub):
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda args: print(__import__("ardistill").__version__))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _threads_flag(p):
    """The one ``--threads`` flag of every command that computes (read back by ``_threads``)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 is often fastest)")


def _threads(n):
    """torch.set_num_threads when given: on a shared CPU, 1 thread can be several times faster than 2."""
    if n is not None:
        import torch
        torch.set_num_threads(n)


def _verify_shards_flag(p):
    """Opt-out of the per-shard sha256 check of the training data readers."""
    p.add_argument("--no-verify-shards", dest="verify_shards", action="store_false",
                   help="skip the sha256 check of each recording (and latent store) shard before its first use; "
                        "sizes and headers are still checked, flipped bytes are not")


def _add_record(sub):
    p = sub.add_parser("record", help="record teacher ODE trajectories into a sharded store (torchrun for several processes)",
                       description="Record teacher trajectories on the student grid; rerun the same command to resume.")
    p.add_argument("--teacher", help="teacher checkpoint: DiT .pt, ardistill .safetensors or diffusers folder (required)")
    p.add_argument("--out", help="output folder, resumed if it holds an unfinished recording (required)")
    p.add_argument("--preset", help="named recipe (ardistill/configs/NAME.json) or a .json path; flags override its values")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
    p.add_argument("--count", type=int, default=None, help="number of trajectories (required without --preset)")
    p.add_argument("--num-steps", type=int, default=4, help="student steps S")
    p.add_argument("--teacher-steps", type=int, default=25, help="teacher ODE steps T")
    p.add_argument("--grid", choices=("ard", "uniform"), default="ard", help="student grid on the teacher grid")
    p.add_argument("--positions", type=_int_list, default=None, help="explicit grid positions, e.g. 0,9,14,19,25")
    p.add_argument("--solver", choices=("ddim", "euler", "heun"), default="ddim")
    p.add_argument("--heun-last-step", choices=("euler", "heun"), default=None,
                   help="--solver heun: the last interval as an Euler step (EDM's, REPA's Heun) or corrected (SiT's "
                        "heun2, one more evaluation); default the teacher family's own: heun for SiT, else euler")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (3 = DiT's legacy forward_with_cfg); default all")
    p.add_argument("--seed", type=int, default=0, help="base seed: trajectory i uses seed + i")
    p.add_argument("--classes", type=_int_list, default=None, help="labels cycle through these (default: all classes)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--shard-size", type=int, default=1024, help="trajectories per shard file")
    p.add_argument("--batch-size", type=int, default=64, help="trajectories per teacher batch (per process)")
    p.add_argument("--no-x0-preds", action="store_true", help="store ODE states only (target 'x0' then unavailable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 when done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_flag(p)
    t2i = p.add_argument_group("text-to-image teachers", "PixArt folders or .pth files, or ours; docs/t2i.md")
    t2i.add_argument("--prompt-store", default=None,
                     help="prompt store (ardistill embed-prompts): record a text teacher on its prompts; guidance "
                          "uses its empty prompt (PixArt: --cfg-scale 4.5)")
    t2i.add_argument("--image-size", type=int, default=None, help="original PixArt .pth only: pixels (256/512/1024)")
    t2i.add_argument("--variant", choices=("alpha", "sigma"), default="sigma",
                     help="original PixArt .pth only: position-embedding scale of PixArt-alpha or -Sigma")
    t2i.add_argument("--num-heads", type=int, default=None, help="original PixArt .pth only: heads (default width / 72)")

    def fields(a):
        return dict(count=a.count, num_steps=a.num_steps, teacher_steps=a.teacher_steps, grid=a.grid,
                    positions=a.positions, solver=a.solver, heun_last_step=a.heun_last_step, cfg_scale=a.cfg_scale,
                    guidance_channels=a.guidance_channels, base_seed=a.seed, classes=a.classes,
                    dtype=a.dtype, shard_size=a.shard_size, batch_size=a.batch_size, x0_preds=not a.no_x0_preds)

    def run(args):
        import json

        from ardistill.presets import record_from_cli
        from ardistill.data.record import RecordConfig, record_command
        if args.preset is None and args.count is None:
            raise ValueError("--count is required (or --preset NAME)")
        defaults = fields(argparse.Namespace(**{k: p.get_default(k) for k in vars(args)}))
        record_fields, resolved = record_from_cli(args.preset, fields(args), defaults)
        if args.dry_run:
            print(json.dumps({**resolved, "paths": {"teacher": args.teacher, "out": args.out}}, indent=2, default=list))
            return
        if not (args.teacher and args.out):
            raise ValueError("--teacher and --out are required")
        if args.prompt_store is not None:
            from ardistill.data.record import TextRecordConfig, record_text_command
            if record_fields.get("classes") is not None or record_fields.get("guidance_channels") is not None:
                raise ValueError("--classes and --guidance-channels are for class-conditional teachers")
            text_fields = {k: v for k, v in record_fields.items() if k not in ("classes", "guidance_channels")}
            summary = record_text_command(args.teacher, args.prompt_store, args.out, TextRecordConfig(**text_fields),
                                          device=args.device, verify_after=args.verify, progress=not args.no_progress,
                                          image_size=args.image_size, variant=args.variant, num_heads=args.num_heads)
            if summary is not None:
                print(summary)
            return
        cfg = RecordConfig(**record_fields)
        _threads(args.threads)
        summary = record_command(args.teacher, args.out, cfg, device=args.device, verify_after=args.verify,
                                 progress=not args.no_progress)
        if summary is not None:  # rank 0 only
            print(summary)
    p.set_defaults(func=run)


def _add_embed_prompts(sub):
    p = sub.add_parser("embed-prompts", help="encode a prompt file once into a prompt store (T5 from a local folder; torchrun)",
                       description="Each prompt (and the empty prompt, row 0) is encoded once; recordings reference "
                                   "rows. Rerun the same command to resume. Needs transformers: pip install 'ardistill[t5]'.")
    p.add_argument("--prompts", required=True, help="prompt file: one per line, or JSONL with id and prompt")
    p.add_argument("--text-encoder", required=True,
                   help="local T5 folder (weights + tokenizer), or a PixArt pipeline folder (text_encoder/, tokenizer/)")
    p.add_argument("--out", required=True, help="prompt-store folder")
    p.add_argument("--max-length", type=int, default=120, help="tokens per prompt: PixArt-alpha 120, PixArt-Sigma 300")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="encoder dtype (default bfloat16 on CUDA, float32 on CPU; T5 v1.1 overflows in float16)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call (per process)")
    p.add_argument("--shard-size", type=int, default=4096, help="prompts per shard file")
    p.add_argument("--preprocess", choices=("lower", "none"), default="lower",
                   help="lower: lower-case and strip each prompt, as diffusers' PixArt pipelines (default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args):
        from ardistill.data.t5 import embed_prompts_command
        summary = embed_prompts_command(args.prompts, args.text_encoder, args.out, max_length=args.max_length,
                                        dtype=args.dtype, compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                                        shard_size=args.shard_size, device=args.device, preprocess=args.preprocess)
        if summary is not None:
            print(summary)
    p.set_defaults(func=run)


def _add_verify_trajectories(sub):
    p = sub.add_parser("verify-trajectories", help="check a trajectory recording's shards against its manifest "
                                                   "(sha256, seeds, labels, finite values)")
    p.add_argument("root", help="recording folder (holds manifest.json)")
    p.add_argument("--quick", action="store_true", help="sizes and headers only, no checksums")

    def run(args):
        from ardistill.data.trajectories import describe, verify
        print(describe(verify(args.root, checksums=not args.quick)))
        print("ok" if not args.quick else "ok (sizes and headers; checksums not checked)")
    p.set_defaults(func=run)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _optimisation_group(p, default_steps: int, who: str = ""):
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
    g.add_argument("--loss-weights", type=_float_list, help="per-step regression weights, e.g. 1,1,1,2 (default equal)")
    return g


def _run_group(p, seed_help: str):
    """Device, precision, checkpoint and logging flags of a training command."""
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=seed_help)
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
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


def _add_distill(sub):
    # Every option defaults to "not given" so that --resume can tell which settings were passed;
    # the defaults shown are DistillConfig's.
    p = sub.add_parser("distill", argument_default=argparse.SUPPRESS,
                       help="train an ARD (or step-distillation) student on a trajectory recording (torchrun for DDP)",
                       description="Distil a few-step student from a recording; see docs/training.md. "
                                   "Resume with --resume --run-dir DIR (settings come from the run).")
    p.add_argument("--recording", help="trajectory recording folder (ardistill record)")
    p.add_argument("--teacher", help="the teacher the recording was made with (initialises the student)")
    p.add_argument("--run-dir", help="output folder: checkpoints, logs, final weights")
    p.add_argument("--resume", action="store_true", default=False, help="continue the run in --run-dir exactly")
    p.add_argument("--preset", default=None, help="named recipe (ardistill/configs/NAME.json) or a .json path; flags override it")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the resolved configuration as JSON and exit (batch split for $WORLD_SIZE or the preset's)")
    g = p.add_argument_group("student")
    g.add_argument("--target", choices=("state", "x0"), help="ODE states (default) or teacher x0-predictions")
    g.add_argument("--history-layers", type=int, help="N_h; 0 = step distillation (default: depth * 6 / 28)")
    g.add_argument("--mask", choices=("M1", "M2", "M3", "M4"), help="history mask (default M4)")
    g.add_argument("--time-labels", choices=("true", "uniform"), help="block times (default true)")
    g.add_argument("--heads", choices=("shared", "per_step"), help="output heads (default shared)")
    g.add_argument("--output", choices=("direct", "ode_step"), help="head output parameterisation (default direct)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (equal to eager within float32 rounding; about 1 min "
                        "of compilation at start; see docs/benchmarks.md)")
    g = _optimisation_group(p, default_steps=1000)
    g.add_argument("--adam-eps", type=float, help="AdamW epsilon (default 1e-8)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--on-policy-prob", type=float, help="probability of on-policy history per batch (default 0)")
    g.add_argument("--on-policy-start", type=int, help="teacher-forced steps before on-policy batches (default 0)")
    g.add_argument("--on-policy-model", choices=("student", "ema"), help="weights of the rollout (default student)")
    g.add_argument("--on-policy-targets", choices=("recorded", "teacher"),
                   help="targets of on-policy batches: the recorded teacher states (default) or the teacher's ODE "
                        "run again from the student's own states (DAgger-style relabelling; costs teacher passes)")
    _run_group(p, seed_help="data order and on-policy coin flips (default 0)")
    _verify_shards_flag(p)
    _threads_flag(p)

    def run(args):
        from ardistill.training.distill import distill_command
        from ardistill.training.nan_guard import NonFiniteLossError
        _threads(args.threads)
        options = {k: v for k, v in vars(args).items()
                   if k not in ("command", "func", "resume", "preset", "dry_run", "threads")}
        if args.preset or args.dry_run:
            import json

            from ardistill.presets import distill_from_cli
            options, resolved = distill_from_cli(args.preset, options)
            if args.dry_run:
                print(json.dumps(resolved, indent=2, default=list))
                return
        try:
            distill_command(options, resume=args.resume)
        except NonFiniteLossError as e:
            print(f"ardistill distill: stopped: {e}", file=sys.stderr)
            return 3
    p.set_defaults(func=run)


def _add_presets(sub):
    p = sub.add_parser("presets", help="list the named recipes, or print one resolved and validated as JSON",
                       description="Presets live in src/ardistill/configs/ (and $ARDISTILL_CONFIGS); see docs/scale.md.")
    p.add_argument("name", nargs="?", help="preset name or .json path; omit to list them")
    p.add_argument("--world-size", type=int, default=None, help="processes to split the global batch over "
                   "(default: $WORLD_SIZE, else the preset's nnodes x nproc_per_node)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set distill.lr=2e-4 (repeatable; JSON values)")

    def run(args):
        from ardistill.presets import list_presets, load_preset, parse_assignment
        if args.name is None:
            print("\n".join(list_presets()))
            return
        overrides = dict(parse_assignment(a) for a in args.assignments)
        print(load_preset(args.name, world_size=args.world_size, overrides=overrides).to_json())
    p.set_defaults(func=run)


def _add_encode_latents(sub):
    p = sub.add_parser("encode-latents", help="encode an image folder (ImageNet layout) once into a sharded latent store",
                       description="ADM centre crop -> SD VAE -> scaled latents (and their mirror images') in a "
                                   "resumable, checksummed store; torchrun splits the shards over processes.")
    p.add_argument("--images", required=True, help="image folder: one sub-folder per class (ImageNet train layout)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema), or 'identity'")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--image-size", type=int, default=256, help="ADM centre-crop size in pixels")
    p.add_argument("--posterior", choices=("mean", "sample"), default="mean",
                   help="VAE posterior mean, or a sample seeded per image (DiT's training used samples)")
    p.add_argument("--no-flip", action="store_true", help="do not also store the latents of mirrored images")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call (per process)")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file")
    p.add_argument("--seed", type=int, default=0, help="posterior noise: image i uses seed + i")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding worker processes per process")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args):
        from ardistill.io import distributed as dist
        from ardistill.data.image_folder import ImageFolder, encode_latents
        from ardistill.data.vae import load_codec
        device = dist.init(args.device)
        try:
            codec = load_codec(args.vae, device=device, posterior=args.posterior, channels=3)
            summary = encode_latents(ImageFolder(args.images, image_size=args.image_size), codec, args.out,
                                     batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                                     flipped=not args.no_flip, base_seed=args.seed, num_workers=args.num_workers,
                                     device=device, progress=not args.no_progress)
            if dist.is_main():
                print(summary)
        finally:
            dist.cleanup()
    p.set_defaults(func=run)




def _add_train_teacher(sub):
    # Options default to "not given" so the values come from TeacherTrainConfig (shown in brackets).
    p = sub.add_parser("train-teacher", argument_default=argparse.SUPPRESS,
                       help="train a class-conditional DiT teacher (embedded digits or photos, an image folder, "
                            "a latent store)",
                       description="eps-prediction on DiT's VP process (or velocity on rectified flow), label dropout, "
                                   "AdamW, EMA; rerun to resume exactly. The defaults are the shipped digits "
                                   "teacher's recipe (docs/digits.md); docs/photos.md has the photos teacher's.")
    p.add_argument("--out", required=True, help="run folder: teacher.safetensors (EMA), train_state.pt, config.json")
    p.add_argument("--data", help="'digits', 'photos', an image folder (root/<class>/<images>) or a latent store "
                                  "from encode-latents [digits]")
    p.add_argument("--image-size", type=int, help="ADM centre-crop size of an image folder [32]")
    p.add_argument("--hflip", action="store_true", help="mirror half of an image folder's draws [off]")
    p.add_argument("--prediction", choices=("eps", "velocity"),
                   help="eps on DiT's VP process, or velocity on rectified flow [eps]")
    p.add_argument("--model", help="DiT size from the registry; the data set input size, channels, classes "
                                   "[DiT-digits-S]")
    p.add_argument("--steps", type=int, help="optimizer steps [14000]")
    p.add_argument("--batch-size", type=int, help="[32]")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate [1e-3]")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), help="after the warm-up [cosine]")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up [200]")
    p.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr [0.05]")
    p.add_argument("--weight-decay", type=float, help="[0]")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off [1.0]")
    p.add_argument("--ema-decay", type=float, help="EMA decay, with warm-up min(d, (1+n)/(10+n)) [0.999]")
    p.add_argument("--class-dropout-prob", type=float, help="label dropout for classifier-free guidance [0.1]")
    p.add_argument("--augment-shift", type=int, help="random translations by up to N pixels, 0 = off [0]")
    p.add_argument("--seed", type=int, help="initialisation and every training draw [0]")
    p.add_argument("--data-seed", type=int, help="seed of the train / held-out split [0]")
    p.add_argument("--log-every", type=int, help="[100]")
    p.add_argument("--checkpoint-every", type=int, help="[500]")
    p.add_argument("--device", help="cpu or cuda (one GPU per process under torchrun) [cpu]")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="several processes (torchrun): ddp = replicated weights, fsdp = FSDP2 sharded per DiT "
                        "block, with sharded checkpoints in OUT/checkpoints; may change on resume [ddp]")
    p.add_argument("--no-resume", action="store_true", default=False,
                   help="start over even if --out holds a training state")
    _threads_flag(p)
    p.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")
    t2i = p.add_argument_group("--task t2i", "the text-conditioned teacher on the two-digit benchmark (docs/t2i.md)")
    t2i.add_argument("--task", choices=("c2i", "t2i"), default="c2i",
                     help="c2i: class-conditional DiT on the digits; t2i: text-conditioned TextDiT (PixArt form) "
                          "on two digits side by side with captions; its own defaults are --model TextDiT-digits, "
                          "--steps 6000 (training/text_teacher.py) [c2i]")
    t2i.add_argument("--caption-dropout-prob", type=float, help="null-text probability for guidance [0.1]")
    t2i.add_argument("--train-pairs", type=int, help="training examples drawn once, seen pairs only [30000]")
    t2i.add_argument("--encoder-width", type=int, help="width of the fixed word encoder's tokens [32]")
    t2i.add_argument("--encoder-seed", type=int, help="seed of the fixed word encoder's table [0]")
    t2i.add_argument("--split-seed", type=int, help="seed of the digits' train / held-out split [0]")

    def run(args):
        if args.task == "t2i":
            return _train_text_teacher(args)
        from ardistill.training.teacher import TeacherTrainConfig, train_teacher
        _threads(args.threads)
        cfg = TeacherTrainConfig(**{k: v for k, v in vars(args).items()
                                    if k in TeacherTrainConfig.__dataclass_fields__})
        path = train_teacher(cfg, args.out, resume=not args.no_resume, progress=not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line
            print(path)
    p.set_defaults(func=run)


def _train_text_teacher(args):
    """``train-teacher --task t2i``: the TextTeacherTrainConfig fields given on the command line."""
    from ardistill.training.text_teacher import TextTeacherTrainConfig, train_text_teacher
    _threads(args.threads)
    fields = TextTeacherTrainConfig.__dataclass_fields__
    given = {k: v for k, v in vars(args).items()
             if k not in ("out", "threads", "no_resume", "no_progress", "task", "func", "command")}
    wrong = sorted(k for k in given if k not in fields)
    if wrong:
        raise SystemExit(f"train-teacher --task t2i: {', '.join('--' + k.replace('_', '-') for k in wrong)} "
                         "apply to the class-conditional teacher only")
    cfg = TextTeacherTrainConfig(**given)
    print(train_text_teacher(cfg, args.out, resume=not args.no_resume, progress=not args.no_progress))


def _add_train_classifier(sub):
    # Options default to "not given" so the values come from ClassifierTrainConfig (shown in brackets).
    p = sub.add_parser("train-classifier", argument_default=argparse.SUPPRESS,
                       help="train the feature network of the digits, photos or your own data's metrics (a small CNN)")
    p.add_argument("--out", required=True, help="output .safetensors file (a .json summary is written beside)")
    p.add_argument("--data", help="'digits', 'photos' or an image folder (root/<class>/<images>) of your own [digits]")
    p.add_argument("--image-size", type=int, help="image folders: centre-crop size, that of the teacher's samples [32]")
    p.add_argument("--heldout-data", help="image folders: a held-out folder with the same classes "
                                          "[none: --heldout-fraction of each class is held out]")
    p.add_argument("--heldout-fraction", type=float, help="digits, or an image folder without --heldout-data [0.2]")
    p.add_argument("--epochs", type=int, help="[40]")
    p.add_argument("--batch-size", type=int, help="[64]")
    p.add_argument("--lr", type=float, help="AdamW learning rate, cosine decay to 0 [2e-3]")
    p.add_argument("--weight-decay", type=float, help="[1e-4]")
    p.add_argument("--augment-shift", type=int, help="random translations by up to N pixels [1 digits, 0 otherwise]")
    p.add_argument("--noise-std", type=float, help="Gaussian input noise in the model range [-1, 1] [0.1]")
    p.add_argument("--width", type=int, help="channels of the first conv [32]")
    p.add_argument("--feature-dim", type=int, help="penultimate (feature) layer size [64]")
    p.add_argument("--seed", type=int, help="[0]")
    p.add_argument("--data-seed", type=int, help="seed of the train / held-out split [0]")
    _threads_flag(p)
    p.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")

    def run(args):
        from ardistill.evaluation.classifier import ClassifierTrainConfig, train_classifier
        _threads(args.threads)
        cfg = ClassifierTrainConfig(**{k: v for k, v in vars(args).items()
                                       if k in ClassifierTrainConfig.__dataclass_fields__})
        r = train_classifier(cfg, args.out, progress=not args.no_progress)
        print(f"{r.path}: held-out accuracy {r.heldout_accuracy:.4f}, train accuracy {r.train_accuracy:.4f}, "
              f"{r.wall_s:.0f} s")
    p.set_defaults(func=run)


def _add_sample(sub):
    p = sub.add_parser("sample", help="sample a teacher with its ODE solver into a PNG grid")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped digits teacher, "
                                                   "or with --prompt the shipped text-to-image teacher)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image: a caption, e.g. \"a 4 and a 1\" (repeat for more; one grid row each)")
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--solver", choices=("ddim", "euler", "heun"), default="ddim")
    p.add_argument("--heun-last-step", choices=("euler", "heun"), default=None,
                   help="--solver heun: the last interval as an Euler step (EDM's, REPA's Heun) or corrected (SiT's "
                        "heun2, one more evaluation); default the teacher family's own: heun for SiT, else euler")
    p.add_argument("--steps", type=int, default=25, help="solver steps")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = none) [1.5; with --prompt 3.0]")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (3 = DiT's legacy forward_with_cfg); default all")
    p.add_argument("--seeds", default=None,
                   help="noise seeds, e.g. 0-63 or 0,5,7-9 (one image each) [0-99; with --prompt 0-7 per prompt]")
    p.add_argument("--labels", default=None, help="classes, cycled over the seeds, e.g. 3 or 0-4 (default: balanced)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: one per class when balanced)")
    p.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of every pixel")
    p.add_argument("--device", default="cpu")

    def run(args):
        if args.prompt:
            from ardistill.sample import sample_prompt_grid
            if args.labels is not None or args.guidance_channels is not None:
                raise ValueError("--labels and --guidance-channels are for class-conditional teachers, not --prompt")
            print(sample_prompt_grid(args.teacher, args.out, args.prompt, seeds=args.seeds or "0-7", steps=args.steps,
                                     solver=args.solver, heun_last_step=args.heun_last_step,
                                     cfg_scale=3.0 if args.cfg_scale is None else args.cfg_scale,
                                     nrow=args.nrow, scale=args.scale, device=args.device))
            return
        from ardistill.sample import sample_grid
        print(sample_grid(args.teacher, args.out, seeds=args.seeds or "0-99", labels=args.labels, steps=args.steps,
                          solver=args.solver, heun_last_step=args.heun_last_step,
                          cfg_scale=1.5 if args.cfg_scale is None else args.cfg_scale,
                          guidance_channels=args.guidance_channels, nrow=args.nrow, scale=args.scale,
                          device=args.device))
    p.set_defaults(func=run)



def _add_finetune_gan(sub):
    # Options default to "not given" (as in distill) so that --resume can tell which were passed.
    p = sub.add_parser("finetune-gan", argument_default=argparse.SUPPRESS,
                       help="ARD (R+G): fine-tune a distilled student with regression + GAN (torchrun for DDP)",
                       description="Second stage: regression + hinge GAN with a frozen-teacher discriminator; see "
                                   "docs/gan.md. Resume with --resume --run-dir DIR (settings come from the run).")
    p.add_argument("--student", help="distilled student: run folder, checkpoint folder or weight file")
    p.add_argument("--recording", help="the recording the student was distilled on")
    p.add_argument("--teacher", help="the recording's teacher (frozen feature network of the discriminator)")
    p.add_argument("--run-dir", help="output folder: checkpoints, logs, final weights")
    p.add_argument("--real", help="real images: 'digits' (default) or 'photos' (the train split) or a latent store folder")
    p.add_argument("--resume", action="store_true", default=False, help="continue the run in --run-dir exactly")
    p.add_argument("--start-weights", choices=("ema", "student"), help="weights of a run folder to start from (default ema)")
    g = p.add_argument_group("discriminator and GAN")
    g.add_argument("--disc-blocks", type=_int_list, help="teacher blocks with a head, e.g. 1,3,5 (default: all)")
    g.add_argument("--head-channels", type=int, help="head width (default 64)")
    g.add_argument("--head-kernel", type=int, help="token-mixing conv kernel, odd (default 3)")
    g.add_argument("--head-cmap", type=int, help="class projection size (default 64)")
    g.add_argument("--fakes", choices=("forced", "free"), help="teacher-forced or own-history student outputs (default forced)")
    g.add_argument("--gan-steps", choices=("last", "all"), help="discriminate the final output or any step (default last)")
    g.add_argument("--feature-noise", type=float, nargs=2, metavar=("LO", "HI"),
                   help="noise level range of the feature network's inputs, fractions of the time range (default 0 0.25)")
    g.add_argument("--gan-factor", type=float, help="adaptive weight factor; 0 = regression only (default 10)")
    g.add_argument("--gan-weight-max", type=float, help="clamp of the gradient-norm ratio (default 1e4)")
    g.add_argument("--gan-warmup", type=int, help="steps with GAN weight 0 while D trains (default 3000)")
    g.add_argument("--collapse-d-loss", type=float, help="collapse guard: D loss threshold (default 0.05)")
    g.add_argument("--collapse-patience", type=int, help="collapse guard: logs in a row (default 5)")
    g.add_argument("--stop-on-collapse", action="store_true", help="stop (after a checkpoint) when the guard trips")
    g = _optimisation_group(p, default_steps=10000, who="student ")
    g.add_argument("--d-lr", type=float, help="discriminator Adam learning rate (default 1e-3)")
    g.add_argument("--d-betas", type=float, nargs=2, metavar=("B1", "B2"), help="discriminator Adam betas (default 0 0.99)")
    g.add_argument("--d-grad-clip", type=float, help="discriminator max gradient norm, 0 = off (default)")
    _run_group(p, seed_help="data order, head init, step choice (default 0)")
    _verify_shards_flag(p)
    _threads_flag(p)

    def run(args):
        from ardistill.training.finetune_gan import DiscriminatorCollapseError, finetune_gan_command
        from ardistill.training.nan_guard import NonFiniteLossError
        _threads(args.threads)
        options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "resume", "threads")}
        try:
            finetune_gan_command(options, resume=args.resume)
        except NonFiniteLossError as e:
            print(f"ardistill finetune-gan: stopped: {e}", file=sys.stderr)
            return 3
        except DiscriminatorCollapseError as e:
            print(f"ardistill finetune-gan: stopped: {e}", file=sys.stderr)
            return 4
    p.set_defaults(func=run)


def _compare_args(p, default_out: str):
    """Flags shared by demo and sweep: CompareConfig fields."""
    p.add_argument("--out", default=None, help=f"output folder (default {default_out}); rerun to resume")
    p.add_argument("--benchmark", choices=("digits", "photos", "folder"), default=None,
                   help="embedded benchmark: its shipped teacher, feature network and held-out images (default "
                        "digits); 'folder' = your own data (--real-train, --real-heldout, --classifier, --teacher)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the benchmark's shipped teacher)")
    own = p.add_argument_group("your own data (benchmark 'folder'; docs/photos.md)")
    own.add_argument("--real-train", default=None, help="image folder the teacher was trained on (root/<class>/<images>)")
    own.add_argument("--real-heldout", default=None, help="held-out image folder with the same classes: FD's reference")
    own.add_argument("--classifier", default=None,
                     help="feature network: ardistill train-classifier --data REAL_TRAIN --heldout-data REAL_HELDOUT")
    p.add_argument("--train-count", type=int, help="recorded training trajectories")
    p.add_argument("--eval-count", type=int, help="held-out evaluation trajectories (disjoint seeds)")
    p.add_argument("--num-steps", type=int, help="student steps S")
    p.add_argument("--steps", type=int, help="optimizer steps per student (the same for every variant)")
    p.add_argument("--batch-size", type=int, help="training batch")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--seeds", type=_int_list, help="training seeds, e.g. 0,1,2 (mean and spread are reported)")
    p.add_argument("--target", choices=("state", "x0"), help="student parameterisation for every variant")
    p.add_argument("--output", choices=("direct", "ode_step"), help="student head output for every variant")
    p.add_argument("--on-policy-prob", type=float, help="on-policy history probability for every variant")
    p.add_argument("--on-policy-start", type=int, help="teacher-forced optimizer steps before on-policy batches begin")
    p.add_argument("--on-policy-targets", choices=("recorded", "teacher"),
                   help="on-policy targets for every variant: recorded (default) or relabelled by the teacher")
    p.add_argument("--device", default=None)
    _verify_shards_flag(p)
    _threads_flag(p)
    p.add_argument("--no-progress", action="store_true")


def _benchmark(args) -> str:
    """--benchmark, or 'folder' when the own-data flags are given (the digits otherwise)."""
    own = any(getattr(args, k, None) is not None for k in ("real_train", "real_heldout", "classifier"))
    if own and args.benchmark not in (None, "folder"):
        raise ValueError(f"--real-train / --real-heldout / --classifier are your own data: drop --benchmark "
                         f"{args.benchmark} (or give --benchmark folder)")
    return args.benchmark or ("folder" if own else "digits")


def _compare_config(args, preset: dict, default_out: str):
    from ardistill.compare import CompareConfig
    kw = dict(preset)
    for k in ("teacher", "train_count", "eval_count", "num_steps", "steps", "batch_size", "lr", "seeds",
              "device", "real_train", "real_heldout", "classifier"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    if getattr(args, "gan_factor", None) is not None:
        kw["gan"] = {**kw.get("gan", {}), "gan_factor": args.gan_factor}
    kw["benchmark"] = _benchmark(args)
    kw["out"] = args.out or kw.get("out", default_out)
    kw["progress"] = not args.no_progress
    student = dict(kw.get("student", {}))
    for k in ("target", "output", "on_policy_prob", "on_policy_start", "on_policy_targets"):
        if getattr(args, k, None) is not None:
            student[k] = getattr(args, k)
    if not getattr(args, "verify_shards", True):  # --no-verify-shards: every stage that reads shards
        student["verify_shards"] = False
        kw["gan"] = {**kw.get("gan", {}), "verify_shards": False}
    kw["student"] = student
    return CompareConfig(**kw)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: record, distil step distillation and ARD, evaluate, report",
                       description="Teacher vs step distillation vs ARD on an embedded benchmark (the digits by "
                                   "default, or --benchmark photos), end to end. --preset quick fits ~10 minutes on "
                                   "a 2-core CPU; --preset full is the documented comparison (docs/results.md).")
    p.add_argument("--preset", choices=("quick", "full"), default="quick")
    p.add_argument("--history-layers", type=int, default=None, help="ARD's N_h (default: 6/28 of the depth)")
    p.add_argument("--gan", action="store_true", help="add the GAN fine-tuning stage: an ARD (R+G) row")
    p.add_argument("--gan-factor", type=float, default=None,
                   help="the GAN stage's adaptive-weight factor (default 0.3, the digits' setting; the paper's is 10)")
    p.add_argument("--task", choices=("digits", "t2i"), default="digits",
                   help="digits: class-conditional digits; t2i: the text-to-image two-digit benchmark (docs/t2i.md; "
                        "default out runs/t2i, teacher = the shipped text teacher)")
    _compare_args(p, "runs/demo")

    def run(args):
        if args.task == "t2i":
            from ardistill.compare_t2i import compare_t2i, t2i_config
            if args.gan:
                raise SystemExit("demo --task t2i: --gan is for the class-conditional digits task")
            if args.benchmark not in (None, "digits"):
                raise SystemExit("demo --task t2i has its own benchmark (two digits with captions); drop --benchmark")
            _threads(args.threads)
            opts = {k: getattr(args, k) for k in ("out", "teacher", "train_count", "eval_count", "num_steps", "steps",
                                                  "batch_size", "lr", "seeds", "device", "history_layers")}
            student = {k: getattr(args, k) for k in ("target", "output", "on_policy_prob", "on_policy_start", "on_policy_targets")}
            if not args.verify_shards:
                student["verify_shards"] = False
            print(compare_t2i(t2i_config(args.preset, opts, student, progress=not args.no_progress)))
            return
        from ardistill.compare import BENCHMARK_PRESETS, compare, demo_variants, get_benchmark
        from ardistill.io.checkpoints import load_any_teacher
        _threads(args.threads)
        cfg = _compare_config(args, BENCHMARK_PRESETS[_benchmark(args)][args.preset], "runs/demo")
        depth = load_any_teacher(cfg.teacher or get_benchmark(cfg).teacher_path()).cfg.depth
        variants = demo_variants(depth, args.history_layers)
        print(compare(cfg, variants, gan=args.gan))
    p.set_defaults(func=run)


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="the paper's ablations on the embedded default, one table",
                       description="history_layers, masks M1-M4, steps 2-5, target parameterisation, shared vs "
                                   "per-step heads, teacher forcing vs on-policy history; writes OUT/sweep.md.")
    p.add_argument("--axes", default=",".join(("history_layers", "mask", "target", "heads", "on_policy", "num_steps")),
                   help="comma-separated axes to run")
    _compare_args(p, "runs/sweep")

    def run(args):
        from ardistill.compare import sweep
        _threads(args.threads)
        cfg = _compare_config(args, {}, "runs/sweep")
        print(sweep(cfg, tuple(a for a in args.axes.split(",") if a)))
    p.set_defaults(func=run)


def _add_generate(sub):
    p = sub.add_parser("generate", help="few-step samples from a student: ADM .npz (torchrun: rank-local shards) or a PNG grid; "
                                        "--prompts: text-to-image samples into a folder")
    p.add_argument("--student", default=None, help="student weights, checkpoint folder or run folder (required "
                                                   "unless --pipeline)")
    p.add_argument("--out", required=True, help="output .npz (ADM arr_0 uint8 NHWC) or .png (grid); with --prompts a "
                                                "folder (samples.npz, samples.jsonl, images/)")
    p.add_argument("--num-samples", type=int, default=100, help="sample i has seed base+i and label i %% classes")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder for latent students")
    p.add_argument("--scale", type=int, default=None, help="PNG: nearest-neighbour upscaling (default x8 below 64 px)")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the KV-cached sampler (same samples within float32 rounding; pays off for many "
                        "batches: compilation takes about a minute on a CPU)")
    t2i = p.add_argument_group("text-to-image (docs/t2i.md)")
    t2i.add_argument("--prompts", default=None, help="prompt file (text or JSONL): images of a text-to-image student")
    t2i.add_argument("--pipeline", default=None, help="an ARD pipeline folder (ardistill export-pipeline) instead "
                                                      "of --student / --text-encoder / --vae")
    t2i.add_argument("--text-encoder", default=None, help="the T5 folder the prompt store was embedded with")
    t2i.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt (seeds base-seed + i)")
    t2i.add_argument("--max-length", type=int, default=None,
                     help="prompt tokens (default: the student's prompt store, found through its run folder)")
    t2i.add_argument("--no-png", action="store_true", help="no PNG per image (samples.npz only)")

    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image students: a caption (repeat for more); writes a PNG grid, one column per "
                        "caption and one row per seed (--num-samples seeds from --base-seed)")

    def run(args):
        if args.prompts is not None:
            from ardistill.pipeline import ARDPipeline, generate_from_prompts
            if args.pipeline:
                pipe = ARDPipeline.from_pretrained(args.pipeline, device=args.device)
            elif args.student and args.text_encoder:
                pipe = ARDPipeline.from_parts(args.student, args.text_encoder, args.vae, max_length=args.max_length,
                                              device=args.device)
            else:
                raise ValueError("--prompts needs --pipeline FOLDER, or --student and --text-encoder (and --vae)")
            print(generate_from_prompts(pipe, args.prompts, args.out, args.num_images_per_prompt, args.base_seed,
                                        args.batch_size, png=not args.no_png))
            return
        if args.student is None:
            raise ValueError("--student is required")
        if args.prompt:
            from ardistill.generate import student_prompt_grid
            seeds = list(range(args.base_seed, args.base_seed + min(args.num_samples, 8)))
            print(student_prompt_grid(args.student, args.out, args.prompt, seeds, device=args.device or "cpu"))
            return
        if str(args.out).endswith(".png"):
            from ardistill.generate import student_grid_png
            seeds = list(range(args.base_seed, args.base_seed + args.num_samples))
            print(student_grid_png(args.student, args.out, seeds, scale=args.scale, vae=args.vae,
                                   device=args.device or "cpu"))
            return
        from ardistill.generate import generate
        path = generate(args.student, args.out, args.num_samples, args.base_seed, args.batch_size, args.vae, args.device,
                        compile=args.compile)
        if path is not None:
            print(path)
    p.set_defaults(func=run)


def _add_export_pipeline(sub):
    p = sub.add_parser("export-pipeline", help="a text-to-image student + its T5 + VAE as an ARDPipeline folder",
                       description="ARDPipeline.from_pretrained(OUT) then loads it; the encoder and VAE are referenced "
                                   "by absolute path unless --copy-parts.")
    p.add_argument("--student", required=True, help="student weights, checkpoint folder or run folder")
    p.add_argument("--text-encoder", required=True, help="the T5 folder the prompt store was embedded with")
    p.add_argument("--vae", default=None, help="the teacher's diffusers VAE folder (omit for pixel-space students)")
    p.add_argument("--out", required=True, help="pipeline folder")
    p.add_argument("--max-length", type=int, default=None, help="prompt tokens (default: from the student's run)")
    p.add_argument("--copy-parts", action="store_true", help="copy the encoder and VAE folders into OUT")

    def run(args):
        from ardistill.pipeline import ARDPipeline
        pipe = ARDPipeline.from_parts(args.student, args.text_encoder, args.vae, max_length=args.max_length,
                                      device="cpu")
        print(pipe.save_pretrained(args.out, copy_parts=args.copy_parts))
    p.set_defaults(func=run)


def _add_export_checkpoint(sub):
    p = sub.add_parser("export-checkpoint",
                       help="write a checkpoint's weights as the single files load_student reads (for sharded/FSDP runs)",
                       description="Reads a checkpoint of a distill, finetune-gan or train-teacher run (sharded DCP "
                                   "or single files) in one process and writes student.safetensors and "
                                   "ema.safetensors (plus disc_heads.safetensors for a GAN run; teacher.safetensors, "
                                   "the EMA weights, for a teacher run) into the checkpoint folder or --out.")
    p.add_argument("--run-dir", required=True, help="the run folder (its checkpoints/ folder)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint folder itself)")

    def run(args):
        from ardistill.training.export import export_checkpoint
        for path in export_checkpoint(args.run_dir, step=args.step, out=args.out):
            print(path)
    p.set_defaults(func=run)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="FID / IS / precision-recall of an ADM sample .npz against a reference batch; "
                                        "--prompts: CLIP score (and FD) of text-to-image samples",
                       description="Both files are ADM .npz batches (uint8 NHWC arr_0). Features: 'inception' "
                                   "(FID Inception-v3 from a local weights file), 'digits' (the shipped classifier) "
                                   "or 'clip' (the --clip model's image embeddings).")
    p.add_argument("--samples", default=None, help="sample batch .npz (ardistill generate)")
    p.add_argument("--reference", default=None, help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz "
                                                     "(optional with --prompts: then FD is reported too)")
    p.add_argument("--prompts", default=None, help="a folder of ardistill generate --prompts: report CLIP score")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder (CLIP score; 'clip' features)")
    p.add_argument("--features", choices=("inception", "digits", "clip"), default=None,
                   help="FD features (default inception; with --prompts: clip)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05 .pth file (default: $ARDISTILL_INCEPTION_WEIGHTS)")
    p.add_argument("--reference-stats", choices=("recompute", "file"), default="recompute",
                   help="recompute reference features with the same network (default) or use the file's mu/sigma")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=None, help="write the metrics as JSON here too")
    p.add_argument("--device", default=None)

    def run(args):
        import json
        from ardistill.evaluation.evaluate import evaluate_npz
        from ardistill.evaluation.features import get_feature_network
        from ardistill.io.fileio import atomic_write_json
        if args.prompts is not None:
            from ardistill.evaluation.clip_score import evaluate_prompt_samples
            if args.clip is None:
                raise ValueError("--prompts needs --clip FOLDER (a local transformers CLIP folder)")
            features = args.features or "clip"
            kw = {"weights_path": args.inception_weights} if features == "inception" else {}
            res = evaluate_prompt_samples(args.prompts, args.clip, args.reference, features, args.batch_size,
                                          device=args.device, **kw)
            if args.out:
                atomic_write_json(args.out, res)
            print(json.dumps(res, indent=2))
            return
        if args.samples is None or args.reference is None:
            raise ValueError("--samples and --reference are required (or --prompts)")
        args.features = args.features or "inception"
        kw = {"weights_path": args.inception_weights} if args.features == "inception" else {}
        if args.features == "clip":
            kw = {"folder": args.clip}
        net = get_feature_network(args.features, device=args.device, **kw)
        res = evaluate_npz(args.samples, args.reference, net, args.batch_size, args.reference_stats, device=args.device)
        if args.out:
            atomic_write_json(args.out, res)
        print(json.dumps(res, indent=2))
    p.set_defaults(func=run)


def _add_import_teacher(sub):
    p = sub.add_parser("import-teacher", help="convert a DiT / SiT / REPA .pt (or diffusers folder) to ardistill's "
                                              ".safetensors with its process conventions in the config")
    p.add_argument("--pt", required=True, help="teacher checkpoint: .pt/.pth, diffusers folder or .safetensors")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--process", choices=("vp", "flow", "sit", "repa"), default=None,
                   help="what the .pt holds: vp (DiT), flow (SD3-style), sit (willisma/SiT), repa (sihyun-yu/REPA); "
                        "default: what the file says (REPA projectors, SiT/REPA training args), else DiT")
    p.add_argument("--which", choices=("ema", "model"), default=None, help="entry of a training checkpoint (default ema)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of an unregistered width")

    def run(args):
        from ardistill.io.checkpoints import import_teacher, load_teacher
        out = import_teacher(args.pt, args.out, process=args.process, which=args.which, num_heads=args.num_heads)
        print(f"{out}: {load_teacher(out).cfg}")
    p.set_defaults(func=run)


def _add_import_student(sub):
    p = sub.add_parser("import-student", help="convert a public-ARD student .pt (alsdudrla10/ARD) to ardistill's "
                                              ".safetensors")
    p.add_argument("--pt", required=True, help="train_ARD.py checkpoint (or a bare models_ARD state dict)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--history-layers", type=int, default=None, help="N_h (default: the checkpoint's args.stack)")
    p.add_argument("--which", choices=("ema", "model"), default=None, help="entry of a training checkpoint (default ema)")

    def run(args):
        from ardistill.io.student_io import import_public_ard_file, read_student_file
        out = import_public_ard_file(args.pt, args.out, args.history_layers, args.which)
        print(f"{out}: {read_student_file(out)[0]}")
    p.set_defaults(func=run)


# Subcommand registrations, in the order they appear in --help.
_REGISTRATIONS = [_add_version, _add_embed_prompts, _add_record, _add_verify_trajectories, _add_distill, _add_presets, _add_encode_latents,
                  _add_train_teacher, _add_train_classifier, _add_sample, _add_finetune_gan, _add_demo, _add_sweep,
                  _add_generate, _add_export_pipeline, _add_export_checkpoint, _add_evaluate, _add_import_teacher, _add_import_student]


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

