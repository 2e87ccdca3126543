"""Data commands: record, embed-prompts, verify-trajectories, encode-latents."""

from __future__ import annotations

import argparse

from ardistill.cli.common import (device_flag, guidance_channels_flag, int_list, no_progress_flag, print_summary,
                                  set_threads, solver_flags, threads_flag)


def _storage_dtype_flag(p):
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")


def add_record(sub):
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
    p.add_argument("--positions", type=int_list, default=None, help="explicit grid positions, e.g. 0,9,14,19,25")
    solver_flags(p)
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    guidance_channels_flag(p)
    p.add_argument("--seed", type=int, default=0, help="base seed: trajectory i uses seed + i")
    p.add_argument("--classes", type=int_list, default=None, help="labels cycle through these (default: all classes)")
    _storage_dtype_flag(p)
    p.add_argument("--shard-size", type=int, default=1024, help="trajectories per shard file")
    p.add_argument("--batch-size", type=int, default=64, help="trajectories per teacher batch (per process)")
    p.add_argument("--no-x0-preds", action="store_true", help="store ODE states only (target 'x0' then unavailable)")
    device_flag(p, default=None)
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 when done")
    no_progress_flag(p)
    threads_flag(p)
    t2i = p.add_argument_group("text-to-image teachers", "PixArt folders or .pth files, or ours; docs/t2i.md")
    t2i.add_argument("--prompt-store", default=None,
                     help="prompt store (ardistill embed-prompts): record a text teacher on its prompts; guidance "
                          "uses its empty prompt (PixArt: --cfg-scale 4.5)")
    t2i.add_argument("--image-size", type=int, default=None, help="original PixArt .pth only: pixels (256/512/1024)")
    t2i.add_argument("--variant", choices=("alpha", "sigma"), default="sigma",
                     help="original PixArt .pth only: position-embedding scale of PixArt-alpha or -Sigma")
    t2i.add_argument("--num-heads", type=int, default=None, help="original PixArt .pth only: heads (default width / 72)")

    def run(args):
        import json

        from ardistill.data.record import RecordConfig, record_command
        record_fields, resolved = _record_fields(p, args)
        if args.dry_run:
            print(json.dumps({**resolved, "paths": {"teacher": args.teacher, "out": args.out}}, indent=2, default=list))
            return
        if not (args.teacher and args.out):
            raise ValueError("--teacher and --out are required")
        if args.prompt_store is not None:
            from ardistill.data.record import TextRecordConfig, record_text_command
            print_summary(record_text_command(args.teacher, args.prompt_store, args.out,
                                              TextRecordConfig(**_text_record_fields(record_fields)),
                                              device=args.device, verify_after=args.verify,
                                              progress=not args.no_progress, image_size=args.image_size,
                                              variant=args.variant, num_heads=args.num_heads))
            return
        cfg = RecordConfig(**record_fields)
        set_threads(args.threads)
        print_summary(record_command(args.teacher, args.out, cfg, device=args.device, verify_after=args.verify,
                                     progress=not args.no_progress))  # rank 0 only
    p.set_defaults(func=run)


def _record_config_fields(a) -> dict:
    """The RecordConfig fields that record's flags set."""
    return dict(count=a.count, num_steps=a.num_steps, teacher_steps=a.teacher_steps, grid=a.grid,
                positions=a.positions, solver=a.solver, heun_last_step=a.heun_last_step, cfg_scale=a.cfg_scale,
                guidance_channels=a.guidance_channels, base_seed=a.seed, classes=a.classes,
                dtype=a.dtype, shard_size=a.shard_size, batch_size=a.batch_size, x0_preds=not a.no_x0_preds)


def _record_fields(p, args) -> tuple[dict, dict]:
    """The flags over the preset (if any): the RecordConfig fields and the resolved configuration to show."""
    from ardistill.cli.preset_options import record_from_cli
    if args.preset is None and args.count is None:
        raise ValueError("--count is required (or --preset NAME)")
    defaults = _record_config_fields(argparse.Namespace(**{k: p.get_default(k) for k in vars(args)}))
    return record_from_cli(args.preset, _record_config_fields(args), defaults)


def _text_record_fields(record_fields: dict) -> dict:
    """TextRecordConfig's fields: a text teacher has no classes and guides every channel."""
    if record_fields.get("classes") is not None or record_fields.get("guidance_channels") is not None:
        raise ValueError("--classes and --guidance-channels are for class-conditional teachers")
    return {k: v for k, v in record_fields.items() if k not in ("classes", "guidance_channels")}


def add_embed_prompts(sub):
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
    device_flag(p, default=None)

    def run(args):
        from ardistill.data.t5 import embed_prompts_command
        print_summary(embed_prompts_command(args.prompts, args.text_encoder, args.out, max_length=args.max_length,
                                            dtype=args.dtype, compute_dtype=args.compute_dtype,
                                            batch_size=args.batch_size, shard_size=args.shard_size,
                                            device=args.device, preprocess=args.preprocess))
    p.set_defaults(func=run)


def add_verify_trajectories(sub):
    p = sub.add_parser("verify-trajectories", help="check a trajectory recording's shards against its manifest "
                                                   "(sha256, seeds, labels, finite values)")
    p.add_argument("root", help="recording folder (holds manifest.json)")
    p.add_argument("--quick", action="store_true", help="sizes and headers only, no checksums")

    def run(args):
        from ardistill.data.trajectory_format import describe, verify
        print(describe(verify(args.root, checksums=not args.quick)))
        print("ok" if not args.quick else "ok (sizes and headers; checksums not checked)")
    p.set_defaults(func=run)


def add_encode_latents(sub):
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
    _storage_dtype_flag(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call (per process)")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file")
    p.add_argument("--seed", type=int, default=0, help="posterior noise: image i uses seed + i")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding worker processes per process")
    device_flag(p, default=None)
    no_progress_flag(p)

    def run(args):
        from ardistill.data.image_folder import ImageFolder, encode_latents
        from ardistill.data.vae import load_codec
        from ardistill.io import distributed as dist
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
