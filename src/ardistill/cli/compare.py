"""The comparison commands: demo (teacher vs step distillation vs ARD, end to end) and sweep (the ablations)."""

from __future__ import annotations

from ardistill.cli.common import int_list, set_threads, threads_flag, verify_shards_flag

# The flags of demo and sweep that set a CompareConfig field of the same name (in --help order: field ->
# add_argument keywords), and those that set the student settings of every variant.
_RUN_FLAGS = {
    "train_count": dict(type=int, help="recorded training trajectories"),
    "eval_count": dict(type=int, help="held-out evaluation trajectories (disjoint seeds)"),
    "num_steps": dict(type=int, help="student steps S"),
    "steps": dict(type=int, help="optimizer steps per student (the same for every variant)"),
    "batch_size": dict(type=int, help="training batch"),
    "lr": dict(type=float, help="AdamW learning rate"),
    "seeds": dict(type=int_list, help="training seeds, e.g. 0,1,2 (mean and spread are reported)"),
}
_STUDENT_FLAGS = {
    "target": dict(choices=("state", "x0"), help="student parameterisation for every variant"),
    "output": dict(choices=("direct", "ode_step"), help="student head output for every variant"),
    "on_policy_prob": dict(type=float, help="on-policy history probability for every variant"),
    "on_policy_start": dict(type=int, help="teacher-forced optimizer steps before on-policy batches begin"),
    "on_policy_targets": dict(choices=("recorded", "teacher"),
                              help="on-policy targets for every variant: recorded (default) or relabelled by the teacher"),
}
# The own-data flags: a benchmark 'folder'.
_OWN_DATA = ("real_train", "real_heldout", "classifier")


def _add_fields(p, flags: dict):
    """One ``--field-name`` flag per entry of ``flags`` (dest: the field)."""
    for field, kw in flags.items():
        p.add_argument("--" + field.replace("_", "-"), **kw)


def compare_args(p, default_out: str):
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
    _add_fields(p, _RUN_FLAGS)
    _add_fields(p, _STUDENT_FLAGS)
    p.add_argument("--device", default=None)
    verify_shards_flag(p)
    threads_flag(p)
    p.add_argument("--no-progress", action="store_true")


def benchmark(args) -> str:
    """--benchmark, or 'folder' when the own-data flags are given (the digits otherwise)."""
    own = any(getattr(args, k, None) is not None for k in _OWN_DATA)
    if own and args.benchmark not in (None, "folder"):
        raise ValueError(f"--real-train / --real-heldout / --classifier are your own data: drop --benchmark "
                         f"{args.benchmark} (or give --benchmark folder)")
    return args.benchmark or ("folder" if own else "digits")


def compare_config(args, preset: dict, default_out: str):
    """The CompareConfig of ``preset`` with the flags given over it."""
    from ardistill.comparison import CompareConfig
    kw = dict(preset)
    for k in ("teacher", *_RUN_FLAGS, "device", *_OWN_DATA):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    if getattr(args, "gan_factor", None) is not None:
        kw["gan"] = {**kw.get("gan", {}), "gan_factor": args.gan_factor}
    kw["benchmark"] = benchmark(args)
    kw["out"] = args.out or kw.get("out", default_out)
    kw["progress"] = not args.no_progress
    student = dict(kw.get("student", {}))
    for k in _STUDENT_FLAGS:
        if getattr(args, k, None) is not None:
            student[k] = getattr(args, k)
    if not getattr(args, "verify_shards", True):  # --no-verify-shards: every stage that reads shards
        student["verify_shards"] = False
        kw["gan"] = {**kw.get("gan", {}), "verify_shards": False}
    kw["student"] = student
    return CompareConfig(**kw)


def _t2i_config(args):
    """``demo --task t2i``: its configuration from the preset and the flags (the digits-only flags exit)."""
    from ardistill.comparison import t2i_config
    if args.gan:
        raise SystemExit("demo --task t2i: --gan is for the class-conditional digits task")
    if args.benchmark not in (None, "digits"):
        raise SystemExit("demo --task t2i has its own benchmark (two digits with captions); drop --benchmark")
    set_threads(args.threads)
    opts = {k: getattr(args, k) for k in ("out", "teacher", *_RUN_FLAGS, "device", "history_layers")}
    student = {k: getattr(args, k) for k in _STUDENT_FLAGS}
    if not args.verify_shards:
        student["verify_shards"] = False
    return t2i_config(args.preset, opts, student, progress=not args.no_progress)


def add_demo(sub):
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
    compare_args(p, "runs/demo")

    def run(args):
        if args.task == "t2i":
            from ardistill.comparison import compare_t2i
            print(compare_t2i(_t2i_config(args)))
            return
        from ardistill.comparison import BENCHMARK_PRESETS, compare, demo_variants
        from ardistill.io.checkpoints import load_any_teacher
        set_threads(args.threads)
        cfg = compare_config(args, BENCHMARK_PRESETS[benchmark(args)][args.preset], "runs/demo")
        teacher = load_any_teacher(cfg.teacher_path)  # loaded once: its depth sizes ARD, then the demo runs it
        print(compare(cfg, demo_variants(teacher.cfg.depth, args.history_layers), gan=args.gan, teacher=teacher))
    p.set_defaults(func=run)


def add_sweep(sub):
    p = sub.add_parser("sweep", help="the paper's ablations on the embedded default, one table",
                       description="history_layers, masks M1-M4, steps 2-5, target parameterisation, shared vs "
                                   "per-step heads, teacher forcing vs on-policy history; writes OUT/sweep.md.")
    p.add_argument("--axes", default=",".join(("history_layers", "mask", "target", "heads", "on_policy", "num_steps")),
                   help="comma-separated axes to run")
    compare_args(p, "runs/sweep")

    def run(args):
        from ardistill.comparison import sweep
        set_threads(args.threads)
        cfg = compare_config(args, {}, "runs/sweep")
        print(sweep(cfg, tuple(a for a in args.axes.split(",") if a)))
    p.set_defaults(func=run)
