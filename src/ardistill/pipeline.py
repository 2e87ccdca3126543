"""A text-to-image ARD student as diffusers users call a distilled model, and ``ardistill generate --prompts``.

    pipe = ARDPipeline.from_pretrained("ard-pixart-sigma-256")       # a folder, everything local
    images = pipe(["a photo of a cat"], num_images_per_prompt=4)     # PIL images, 3 student steps each

A pipeline folder holds ``model_index.json`` (``_class_name`` "ARDPipeline"; where the student, the
text encoder and the VAE are, relative to the folder or absolute; the prompts' max length and
storage dtype) and the student's weight file. ``ARDPipeline.save_pretrained`` writes one from a
distillation run; ``copy_parts=True`` also copies the text-encoder and VAE folders in.

Every image has its own seed (``seed + i`` for the i-th image of the call), so results do not depend
on the batch size. The student was distilled from guided trajectories: sampling needs no guidance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from ardistill.data.prompts import read_prompts, trim_text
from ardistill.io.fileio import atomic_copy, atomic_write, atomic_write_bytes, atomic_write_json, read_json
from ardistill.sampling.ode import randn_from_seeds

INDEX = "model_index.json"
STUDENT_FILE = "student.safetensors"
_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def prompt_settings_of_run(student: str | os.PathLike) -> dict:
    """max_length and storage dtype of the prompts a student was distilled on, read through its run folder
    (config.json -> recording manifest -> prompt store); {} when the run or its recording is not found."""
    from ardistill.data.trajectory_format import load_manifest
    p = Path(student)
    for run in (p, *p.parents[:3]):
        if (run / "config.json").is_file():
            config = read_json(run / "config.json", "run config")
            if "distill" not in config:
                continue  # not a distillation run's config
            rec = config["distill"].get("recording")
            if not rec or not Path(rec).is_dir():
                return {}
            prompts = load_manifest(rec).get("prompts")
            if not prompts:
                return {}
            out = {"max_length": int(prompts["encoder"]["max_length"]),
                   "preprocess": prompts["encoder"].get("preprocess", "lower")}
            store = Path(prompts["store"]) / "manifest.json"
            if store.is_file():
                out["embedding_dtype"] = read_json(store, "prompt store manifest")["layout"]["dtype"]
            return out
    return {}


class ARDPipeline:
    """Prompts -> text encoder -> ARD student (S steps, KV cache) -> VAE decoder -> images."""

    def __init__(self, student, encoder, codec=None, max_length: int = 120, embedding_dtype: str = "float16",
                 device=None, parts: dict | None = None):
        if getattr(getattr(student, "arch", None), "conditioning", None) != "text":
            raise ValueError(f"ARDPipeline needs a text-to-image student (an ARDStudent of a text teacher), "
                             f"got {type(student).__name__}")
        if encoder.width != student.cfg.teacher.caption_channels:
            raise ValueError(f"text encoder width {encoder.width} != the student's caption_channels "
                             f"{student.cfg.teacher.caption_channels}: not the encoder it was distilled with")
        if embedding_dtype not in _STORAGE:
            raise ValueError(f"embedding_dtype must be one of {sorted(_STORAGE)}, got {embedding_dtype!r}")
        self.student, self.encoder, self.codec = student, encoder, codec
        self.max_length, self.embedding_dtype = int(max_length), embedding_dtype
        self.device = torch.device(device or "cpu")
        self.parts = dict(parts or {})

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, student: str | os.PathLike, text_encoder: str | os.PathLike, vae: str | os.PathLike | None = None,
                   max_length: int | None = None, embedding_dtype: str | None = None, device=None,
                   text_dtype: str | None = None, preprocess: str | None = None) -> "ARDPipeline":
        """Student (weights, checkpoint or run folder), a T5 folder and a VAE folder (None: pixel-space student).

        ``max_length`` / ``embedding_dtype`` default to the prompt store the student was distilled on (recorded
        in the student file by ``ardistill distill``, else found through its run folder).
        """
        from ardistill.data.t5 import T5PromptEncoder
        from ardistill.data.vae import load_vae_folder
        from ardistill.io.student_io import load_student, read_student_file, resolve_student_path
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = resolve_student_path(student)
        meta = read_student_file(weights)[2]
        run = json.loads(meta["prompt_encoding"]) if "prompt_encoding" in meta else prompt_settings_of_run(student)
        max_length = max_length or run.get("max_length")
        if max_length is None:
            raise ValueError(f"cannot find the prompt length the student {student} was distilled with (no run folder "
                             "with its recording); pass max_length (PixArt-alpha 120, PixArt-Sigma 300)")
        model = load_student(weights, device=device)
        text_dtype = text_dtype or ("bfloat16" if device.type == "cuda" else "float32")
        encoder = T5PromptEncoder(text_encoder, max_length=max_length, device=device, dtype=text_dtype,
                                  preprocess=preprocess or run.get("preprocess", "lower"))
        codec = load_vae_folder(vae, device=device) if vae is not None else None
        parts = {"student": str(weights), "text_encoder": str(text_encoder), "vae": None if vae is None else str(vae)}
        return cls(model, encoder, codec, max_length, embedding_dtype or run.get("embedding_dtype", "float16"),
                   device, parts)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device=None, text_dtype: str | None = None) -> "ARDPipeline":
        """Load a pipeline folder written by ``save_pretrained`` (local files only)."""
        folder = Path(folder)
        index_path = folder / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: not an ARD pipeline folder (ARDPipeline.save_pretrained "
                                    "or ardistill export-pipeline writes one)")
        index = read_json(index_path, "pipeline index")
        if index.get("_class_name") != "ARDPipeline":
            raise ValueError(f"{index_path}: _class_name is {index.get('_class_name')!r}, expected 'ARDPipeline'")
        for key in ("student", "text_encoder", "max_length"):
            if key not in index:
                raise ValueError(f"{index_path}: missing field {key!r}")

        def where(p):
            return None if p is None else (Path(p) if Path(p).is_absolute() else folder / p)
        return cls.from_parts(where(index["student"]), where(index["text_encoder"]), where(index.get("vae")),
                              max_length=int(index["max_length"]), embedding_dtype=index.get("embedding_dtype"),
                              device=device, text_dtype=text_dtype, preprocess=index.get("preprocess"))

    def save_pretrained(self, folder: str | os.PathLike, copy_parts: bool = False) -> Path:
        """Write a pipeline folder: the student's weights, model_index.json; the encoder and VAE referenced
        by absolute path, or copied in (``copy_parts``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_copy(self.parts["student"], folder / STUDENT_FILE)
        index = {"_class_name": "ARDPipeline", "student": STUDENT_FILE, "max_length": self.max_length,
                 "embedding_dtype": self.embedding_dtype, "preprocess": self.encoder.preprocess,
                 "num_steps": self.student.cfg.num_steps}
        for key in ("text_encoder", "vae"):
            src = self.parts.get(key)
            if src is None:
                index[key] = None
            elif copy_parts:
                if not (folder / key).exists():  # a copy is complete or absent (atomic_copy)
                    atomic_copy(src, folder / key)
                index[key] = key
            else:
                index[key] = str(Path(src).resolve())
        atomic_write_json(folder / INDEX, index)
        return folder

    # ---- sampling -------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> caption tokens and mask as the student saw them in training (rounded to the store's dtype)."""
        tokens, mask = self.encoder.encode(prompts)
        tokens = (tokens * mask[..., None]).to(_STORAGE[self.embedding_dtype]).float()
        return trim_text(tokens, mask)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """One image per (prompt, seed) pair: (N, C, H, W) float in [-1, 1] (decoded when the pipeline has a VAE)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        tc = self.student.cfg.teacher
        shape = (tc.in_channels, *tc.input_size)
        out = []
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate", leave=False):
            text, mask = self.encode(prompts[i:i + batch_size])
            noise = randn_from_seeds(seeds[i:i + batch_size], shape, device=self.device)
            x = self.student.sample(noise, text.to(self.device), mask.to(self.device))
            if self.codec is not None:
                x = self.codec.decode(x)
            out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def __call__(self, prompts: str | list[str], num_images_per_prompt: int = 1, seed: int = 0, batch_size: int = 16,
                 output_type: str = "pil"):
        """Images for each prompt in order (prompt 0's images first): PIL images, or a tensor with output_type="pt"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        flat = [p for p in prompts for _ in range(num_images_per_prompt)]
        images = self.generate(flat, list(range(seed, seed + len(flat))), batch_size)
        if output_type == "pt":
            return images
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        return [to_pil(x) for x in images]


def to_pil(image: torch.Tensor):
    """(C, H, W) float in [-1, 1] -> a PIL image (DiT's rounding)."""
    from PIL import Image
    x = torch.clamp(127.5 * image + 128.0, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(x[..., 0] if x.shape[2] == 1 else x)


def generate_from_prompts(pipe: ARDPipeline, prompts_file: str | os.PathLike, out: str | os.PathLike,
                          num_images_per_prompt: int = 1, seed: int = 0, batch_size: int = 16,
                          png: bool = True, progress: bool = True) -> Path:
    """`ardistill generate --prompts`: every prompt's images into ``out``: samples.npz (ADM), samples.jsonl
    (index, prompt id, prompt, seed per image), and one PNG per image under images/."""
    from ardistill.evaluation.adm import to_uint8_nhwc, write_adm_npz
    from ardistill.evaluation.prompt_samples import SAMPLES_INDEX, SAMPLES_NPZ
    items = read_prompts(prompts_file)
    rows = [{"index": i * num_images_per_prompt + j, "id": p.id, "prompt": p.prompt,
             "seed": seed + i * num_images_per_prompt + j} for i, p in enumerate(items)
            for j in range(num_images_per_prompt)]
    images = pipe.generate([r["prompt"] for r in rows], [r["seed"] for r in rows], batch_size, progress)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"decoded images have {images.shape[1]} channels; a latent student needs its VAE (--vae)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rgb = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
    write_adm_npz(out / SAMPLES_NPZ, to_uint8_nhwc(rgb))
    if png:
        (out / "images").mkdir(exist_ok=True)
        for r, x in zip(rows, images):
            atomic_write(out / "images" / f"{r['index']:06d}.png", lambda tmp, x=x: to_pil(x).save(tmp, format="PNG"),
                         fsync=False)  # complete or absent (a full disk: one line), one fsync less per image
    atomic_write_bytes(out / SAMPLES_INDEX, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return out

