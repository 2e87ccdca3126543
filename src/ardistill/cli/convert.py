"""Weight-file commands: export-pipeline, export-checkpoint, import-teacher, import-student."""

from __future__ import annotations

from ardistill.cli.common import text_encoder_flag


def add_export_pipeline(sub):
    p = sub.add_parser("export-pipeline", help="a text-to-image student + its T5 + VAE as an ARDPipeline folder",
                       description="ARDPipeline.from_pretrained(OUT) then loads it; the encoder and VAE are referenced "
                                   "by absolute path unless --copy-parts.")
    p.add_argument("--student", required=True, help="student weights, checkpoint folder or run folder")
    text_encoder_flag(p, required=True)
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


def add_export_checkpoint(sub):
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


def _import_parser(sub, name: str, help: str, pt: str):
    """An import command: a foreign checkpoint (``--pt``, its help ``pt``) in, one .safetensors file out."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--pt", required=True, help=pt)
    p.add_argument("--out", required=True, help="output .safetensors")
    return p


def _which_flag(p):
    p.add_argument("--which", choices=("ema", "model"), default=None, help="entry of a training checkpoint (default ema)")


def add_import_teacher(sub):
    p = _import_parser(sub, "import-teacher", help="convert a DiT / SiT / REPA .pt (or diffusers folder) to "
                                                   "ardistill's .safetensors with its process conventions in the config",
                       pt="teacher checkpoint: .pt/.pth, diffusers folder or .safetensors")
    p.add_argument("--process", choices=("vp", "flow", "sit", "repa"), default=None,
                   help="what the .pt holds: vp (DiT), flow (SD3-style), sit (willisma/SiT), repa (sihyun-yu/REPA); "
                        "default: what the file says (REPA projectors, SiT/REPA training args), else DiT")
    _which_flag(p)
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of an unregistered width")

    def run(args):
        from ardistill.io.checkpoints import import_teacher, load_teacher
        out = import_teacher(args.pt, args.out, process=args.process, which=args.which, num_heads=args.num_heads)
        print(f"{out}: {load_teacher(out).cfg}")
    p.set_defaults(func=run)


def add_import_student(sub):
    p = _import_parser(sub, "import-student", help="convert a public-ARD student .pt (alsdudrla10/ARD) to "
                                                   "ardistill's .safetensors",
                       pt="train_ARD.py checkpoint (or a bare models_ARD state dict)")
    p.add_argument("--history-layers", type=int, default=None, help="N_h (default: the checkpoint's args.stack)")
    _which_flag(p)

    def run(args):
        from ardistill.io.student_io import import_public_ard_file, read_student_file
        out = import_public_ard_file(args.pt, args.out, args.history_layers, args.which)
        print(f"{out}: {read_student_file(out)[0]}")
    p.set_defaults(func=run)
