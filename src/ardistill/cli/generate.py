"""Image commands: sample (a teacher's ODE solver), generate (a student's few steps), evaluate (their metrics)."""

from __future__ import annotations

from ardistill.cli.common import guidance_channels_flag, solver_flags, text_encoder_flag


def add_sample(sub):
    p = sub.add_parser("sample", help="sample a teacher with its ODE solver into a PNG grid")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped digits teacher, "
                                                   "or with --prompt the shipped text-to-image teacher)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image: a caption, e.g. \"a 4 and a 1\" (repeat for more; one grid row each)")
    p.add_argument("--out", default="grid.png", help="output PNG")
    solver_flags(p)
    p.add_argument("--steps", type=int, default=25, help="solver steps")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = none) [1.5; with --prompt 3.0]")
    guidance_channels_flag(p)
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


def add_generate(sub):
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
    text_encoder_flag(t2i, default=None)
    t2i.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt (seeds base-seed + i)")
    t2i.add_argument("--max-length", type=int, default=None,
                     help="prompt tokens (default: the student's prompt store, found through its run folder)")
    t2i.add_argument("--no-png", action="store_true", help="no PNG per image (samples.npz only)")

    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image students: a caption (repeat for more); writes a PNG grid, one column per "
                        "caption and one row per seed (--num-samples seeds from --base-seed)")

    def run(args):
        if args.prompts is not None:
            from ardistill.pipeline import generate_from_prompts
            print(generate_from_prompts(_prompts_pipeline(args), args.prompts, args.out, args.num_images_per_prompt,
                                        args.base_seed, args.batch_size, png=not args.no_png))
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


def _prompts_pipeline(args):
    """``generate --prompts``: the ARDPipeline of --pipeline, or of --student, --text-encoder and --vae."""
    from ardistill.pipeline import ARDPipeline
    if args.pipeline:
        return ARDPipeline.from_pretrained(args.pipeline, device=args.device)
    if args.student and args.text_encoder:
        return ARDPipeline.from_parts(args.student, args.text_encoder, args.vae, max_length=args.max_length,
                                      device=args.device)
    raise ValueError("--prompts needs --pipeline FOLDER, or --student and --text-encoder (and --vae)")


def add_evaluate(sub):
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
            from ardistill.evaluation.prompt_samples import evaluate_prompt_samples
            if args.clip is None:
                raise ValueError("--prompts needs --clip FOLDER (a local transformers CLIP folder)")
            features = args.features or "clip"
            res = evaluate_prompt_samples(args.prompts, args.clip, args.reference, features, args.batch_size,
                                          device=args.device, **_inception_kwargs(args, features))
        else:
            if args.samples is None or args.reference is None:
                raise ValueError("--samples and --reference are required (or --prompts)")
            args.features = args.features or "inception"
            kw = _inception_kwargs(args, args.features)
            if args.features == "clip":
                kw = {"folder": args.clip}
            net = get_feature_network(args.features, device=args.device, **kw)
            res = evaluate_npz(args.samples, args.reference, net, args.batch_size, args.reference_stats,
                               device=args.device)
        if args.out:
            atomic_write_json(args.out, res)
        print(json.dumps(res, indent=2))
    p.set_defaults(func=run)


def _inception_kwargs(args, features: str) -> dict:
    """The Inception network's weights file, for the 'inception' features."""
    return {"weights_path": args.inception_weights} if features == "inception" else {}
