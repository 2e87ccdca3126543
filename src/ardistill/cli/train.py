"""Training commands: distill, finetune-gan, train-teacher, train-classifier, and the presets they read."""

from __future__ import annotations

import argparse
import os

from ardistill.cli.common import (int_list, no_progress_flag, optimisation_group, run_group, set_threads, stopped,
                                  threads_flag, verify_shards_flag)

# Options of the commands below (all but presets) default to "not given" (argparse.SUPPRESS): distill and
# finetune-gan so that --resume can tell which settings were passed, train-teacher and train-classifier so
# that the values come from their config dataclass (shown in brackets).


def _inputs_flags(p, recording: str, teacher: str):
    """--recording, --teacher (each command's own help) and --run-dir of distill and finetune-gan."""
    p.add_argument("--recording", help=recording)
    p.add_argument("--teacher", help=teacher)
    p.add_argument("--run-dir", help="output folder: checkpoints, logs, final weights")


def _resume_flag(p):
    p.add_argument("--resume", action="store_true", default=False, help="continue the run in --run-dir exactly")


def _training_run_flags(p, seed_help: str):
    """The run group, --no-verify-shards and --threads of distill and finetune-gan."""
    run_group(p, seed_help=seed_help)
    verify_shards_flag(p)
    threads_flag(p)


def _options(args, *drop: str) -> dict:
    """The flags given (SUPPRESS leaves out the others) but the command's own and ``drop``."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func", "resume", "threads") + drop}


def add_distill(sub):
    # The defaults shown are DistillConfig's.
    p = sub.add_parser("distill", argument_default=argparse.SUPPRESS,
                       help="train an ARD (or step-distillation) student on a trajectory recording (torchrun for DDP)",
                       description="Distil a few-step student from a recording; see docs/training.md. "
                                   "Resume with --resume --run-dir DIR (settings come from the run).")
    _inputs_flags(p, recording="trajectory recording folder (ardistill record)",
                  teacher="the teacher the recording was made with (initialises the student)")
    _resume_flag(p)
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
    g = optimisation_group(p, default_steps=1000)
    g.add_argument("--adam-eps", type=float, help="AdamW epsilon (default 1e-8)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--on-policy-prob", type=float, help="probability of on-policy history per batch (default 0)")
    g.add_argument("--on-policy-start", type=int, help="teacher-forced steps before on-policy batches (default 0)")
    g.add_argument("--on-policy-model", choices=("student", "ema"), help="weights of the rollout (default student)")
    g.add_argument("--on-policy-targets", choices=("recorded", "teacher"),
                   help="targets of on-policy batches: the recorded teacher states (default) or the teacher's ODE "
                        "run again from the student's own states (DAgger-style relabelling; costs teacher passes)")
    _training_run_flags(p, seed_help="data order and on-policy coin flips (default 0)")

    def run(args):
        from ardistill.training.distill import distill_command
        from ardistill.training.nan_guard import NonFiniteLossError
        set_threads(args.threads)
        options = _options(args, "preset", "dry_run")
        if args.preset or args.dry_run:
            import json

            from ardistill.cli.preset_options import distill_from_cli
            options, resolved = distill_from_cli(args.preset, options)
            if args.dry_run:
                print(json.dumps(resolved, indent=2, default=list))
                return
        try:
            distill_command(options, resume=args.resume)
        except NonFiniteLossError as e:
            return stopped("distill", e, 3)
    p.set_defaults(func=run)


def add_finetune_gan(sub):
    p = sub.add_parser("finetune-gan", argument_default=argparse.SUPPRESS,
                       help="ARD (R+G): fine-tune a distilled student with regression + GAN (torchrun for DDP)",
                       description="Second stage: regression + hinge GAN with a frozen-teacher discriminator; see "
                                   "docs/gan.md. Resume with --resume --run-dir DIR (settings come from the run).")
    p.add_argument("--student", help="distilled student: run folder, checkpoint folder or weight file")
    _inputs_flags(p, recording="the recording the student was distilled on",
                  teacher="the recording's teacher (frozen feature network of the discriminator)")
    p.add_argument("--real", help="real images: 'digits' (default) or 'photos' (the train split) or a latent store folder")
    _resume_flag(p)
    p.add_argument("--start-weights", choices=("ema", "student"), help="weights of a run folder to start from (default ema)")
    g = p.add_argument_group("discriminator and GAN")
    g.add_argument("--disc-blocks", type=int_list, help="teacher blocks with a head, e.g. 1,3,5 (default: all)")
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
    g = optimisation_group(p, default_steps=10000, who="student ")
    g.add_argument("--d-lr", type=float, help="discriminator Adam learning rate (default 1e-3)")
    g.add_argument("--d-betas", type=float, nargs=2, metavar=("B1", "B2"), help="discriminator Adam betas (default 0 0.99)")
    g.add_argument("--d-grad-clip", type=float, help="discriminator max gradient norm, 0 = off (default)")
    _training_run_flags(p, seed_help="data order, head init, step choice (default 0)")

    def run(args):
        from ardistill.training.finetune_gan import DiscriminatorCollapseError, finetune_gan_command
        from ardistill.training.nan_guard import NonFiniteLossError
        set_threads(args.threads)
        try:
            finetune_gan_command(_options(args), resume=args.resume)
        except NonFiniteLossError as e:
            return stopped("finetune-gan", e, 3)
        except DiscriminatorCollapseError as e:
            return stopped("finetune-gan", e, 4)
    p.set_defaults(func=run)


def add_presets(sub):
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


def add_train_teacher(sub):
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
    _seed_flags(p, seed="initialisation and every training draw [0]")
    p.add_argument("--log-every", type=int, help="[100]")
    p.add_argument("--checkpoint-every", type=int, help="[500]")
    p.add_argument("--device", help="cpu or cuda (one GPU per process under torchrun) [cpu]")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="several processes (torchrun): ddp = replicated weights, fsdp = FSDP2 sharded per DiT "
                        "block, with sharded checkpoints in OUT/checkpoints; may change on resume [ddp]")
    p.add_argument("--no-resume", action="store_true", default=False,
                   help="start over even if --out holds a training state")
    threads_flag(p)
    no_progress_flag(p)
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
            from ardistill.training.text_teacher import train_text_teacher
            set_threads(args.threads)
            print(train_text_teacher(_text_teacher_config(args), args.out, resume=not args.no_resume,
                                     progress=not args.no_progress))
            return
        from ardistill.training.teacher import TeacherTrainConfig, train_teacher
        set_threads(args.threads)
        path = train_teacher(_dataclass_from(TeacherTrainConfig, args), args.out, resume=not args.no_resume,
                             progress=not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line
            print(path)
    p.set_defaults(func=run)


def _seed_flags(p, seed: str):
    """--seed (its help ``seed``) and --data-seed of train-teacher and train-classifier."""
    p.add_argument("--seed", type=int, help=seed)
    p.add_argument("--data-seed", type=int, help="seed of the train / held-out split [0]")


def _dataclass_from(cls, args):
    """``cls`` from the flags given that are its fields (SUPPRESS leaves the others at its defaults)."""
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__})


def _text_teacher_config(args):
    """``train-teacher --task t2i``: the TextTeacherTrainConfig of the flags given; a class-conditional one exits."""
    from ardistill.training.text_teacher import TextTeacherTrainConfig
    fields = TextTeacherTrainConfig.__dataclass_fields__
    given = {k: v for k, v in vars(args).items()
             if k not in ("out", "threads", "no_resume", "no_progress", "task", "func", "command")}
    wrong = sorted(k for k in given if k not in fields)
    if wrong:
        raise SystemExit(f"train-teacher --task t2i: {', '.join('--' + k.replace('_', '-') for k in wrong)} "
                         "apply to the class-conditional teacher only")
    return TextTeacherTrainConfig(**given)


def add_train_classifier(sub):
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
    _seed_flags(p, seed="[0]")
    threads_flag(p)
    no_progress_flag(p)

    def run(args):
        from ardistill.evaluation.classifier import ClassifierTrainConfig, train_classifier
        set_threads(args.threads)
        r = train_classifier(_dataclass_from(ClassifierTrainConfig, args), args.out, progress=not args.no_progress)
        print(f"{r.path}: held-out accuracy {r.heldout_accuracy:.4f}, train accuracy {r.train_accuracy:.4f}, "
              f"{r.wall_s:.0f} s")
    p.set_defaults(func=run)
