"""Text encoders from a local folder through ``transformers`` (T5 for PixArt), and ``ardistill embed-prompts``.

A text-encoder folder is either a model folder that also holds its tokenizer (``config.json`` +
weights + ``tokenizer.json`` / ``spiece.model``), or a diffusers pipeline folder with ``text_encoder/``
and ``tokenizer/`` (PixArt's layout). Nothing is downloaded: ``local_files_only`` everywhere.

PixArt's prompt encoding (diffusers' PixArt pipelines): lower-case and strip the prompt (what the
pipelines do without ``bs4`` / ``ftfy``; their optional ``clean_caption`` rewriting is not reproduced),
tokenize with padding to ``max_length``
(120 tokens for PixArt-alpha, 300 for PixArt-Sigma), truncation, the tokenizer's ``</s>``; run the
encoder with the attention mask; keep the mask (cross-attention never reads padding). The empty
prompt (the store's row 0, guidance's null text) encodes to one ``</s>`` token.

``transformers`` is optional: ``pip install 'ardistill[t5]'`` (errors say so).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ardistill.io import distributed as dist

PIXART_MAX_LENGTH = {"alpha": 120, "sigma": 300}
PREPROCESS = ("lower", "none")  # "lower": prompt.lower().strip(), diffusers' PixArt text preprocessing
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_transformers():
    """Import ``transformers`` or raise an ImportError that says what to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("text encoders and CLIP need the 'transformers' package: pip install 'ardistill[t5]' "
                          f"(or pip install transformers sentencepiece) ({e})") from e
    transformers.utils.logging.disable_progress_bar()
    return transformers


def text_encoder_folders(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a text-encoder folder or a pipeline folder; errors name what is missing."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {root} (a local T5 folder, e.g. PixArt's "
                                "t5-v1_1-xxl, or a PixArt pipeline folder with text_encoder/ and tokenizer/)")
    if (root / "text_encoder").is_dir():
        model, tok = root / "text_encoder", root / "tokenizer"
        if not tok.is_dir():
            raise FileNotFoundError(f"{root} has text_encoder/ but no tokenizer/ folder")
    else:
        model = tok = root
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder {model} has no config.json")
    if not any(p.name.endswith(s) for p in model.iterdir() for s in _WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"text encoder folder {model} has no weights (*.safetensors or *.bin)")
    tok_files = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    if not any((tok / f).is_file() for f in tok_files):
        raise FileNotFoundError(f"tokenizer folder {tok} has none of {tok_files}")
    return model, tok


def folder_sha256(folder: Path, suffixes: tuple[str, ...] = _WEIGHT_SUFFIXES + (".json", ".model")) -> str:
    """sha256 over the names and contents of a folder's weight, config and tokenizer files (sorted)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.iterdir() if q.is_file() and q.name.endswith(suffixes)):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class T5PromptEncoder:
    """A T5 encoder + tokenizer from a local folder: prompts -> tokens (B, L, C) float32 and mask (B, L) bool.

    Args:
        folder: see ``text_encoder_folders``.
        max_length: tokens per prompt (PixArt-alpha 120, PixArt-Sigma 300).
        dtype: compute dtype ("bfloat16" on GPUs: T5 v1.1 overflows in float16; "float32" on CPU).
        preprocess: "lower" (lower-case and strip, as diffusers' PixArt pipelines) or "none".
    """

    def __init__(self, folder: str | os.PathLike, max_length: int = 120, device=None, dtype: str = "float32",
                 preprocess: str = "lower"):
        if preprocess not in PREPROCESS:
            raise ValueError(f"T5PromptEncoder: preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self.preprocess = preprocess
        if max_length < 1:
            raise ValueError(f"T5PromptEncoder: max_length must be >= 1, got {max_length}")
        if dtype not in _DTYPES:
            raise ValueError(f"T5PromptEncoder: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        transformers = require_transformers()
        self.folder = Path(folder)
        self.model_folder, self.tokenizer_folder = text_encoder_folders(folder)
        self.max_length = int(max_length)
        self.dtype = dtype
        self.device = torch.device(device or "cpu")
        import json
        model_type = json.loads((self.model_folder / "config.json").read_text()).get("model_type")
        if model_type not in ("t5", "mt5", "umt5"):
            raise ValueError(f"{self.model_folder}/config.json: model_type {model_type!r} is not a T5 encoder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.tokenizer_folder), local_files_only=True)
        model, info = transformers.T5EncoderModel.from_pretrained(
            str(self.model_folder), local_files_only=True, dtype=_DTYPES[dtype], output_loading_info=True)
        if info.get("missing_keys"):  # transformers would initialise them at random: refuse instead
            raise ValueError(f"{self.model_folder}: weights lack {len(info['missing_keys'])} encoder tensors, e.g. "
                             f"{sorted(info['missing_keys'])[:3]}")
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.width = int(self.model.config.d_model)
        self._identity: dict | None = None

    def identity(self) -> dict:
        """What determines the embeddings, for the prompt store's manifest (weights hashed once, on rank 0)."""
        if self._identity is None:
            sha = dist.broadcast_object(folder_sha256(self.model_folder) if dist.is_main() else None)
            tok = dist.broadcast_object(folder_sha256(self.tokenizer_folder) if dist.is_main() else None)
            self._identity = {"name": f"t5:{self.folder.name}", "sha256": sha,
                              "tokenizer_sha256": tok, "width": self.width, "max_length": self.max_length,
                              "compute_dtype": self.dtype, "preprocess": self.preprocess, "kind": "t5-encoder"}
        return self._identity

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> tokens (B, max_length, C) float32 on the CPU, mask (B, max_length) bool."""
        if self.preprocess == "lower":
            prompts = [p.lower().strip() for p in prompts]
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        tokens = self.model(input_ids=ids, attention_mask=mask)[0]
        return tokens.float().cpu(), mask.bool().cpu()

    __call__ = encode


def embed_prompts_command(prompts: str | os.PathLike, text_encoder: str | os.PathLike, out: str | os.PathLike,
                          max_length: int = 120, dtype: str = "float16", compute_dtype: str | None = None,
                          batch_size: int = 64, shard_size: int = 4096, device: str | None = None,
                          preprocess: str = "lower"):
    """`ardistill embed-prompts`: encode every prompt once into a prompt store (torchrun splits the shards).

    Returns the store's summary on rank 0 and None on the other ranks; rerun the same command to resume.
    """
    from ardistill.data.prompts import read_prompts, write_prompt_store
    items = read_prompts(prompts)
    dev = dist.init(device)
    try:
        if compute_dtype is None:
            compute_dtype = "bfloat16" if dev.type == "cuda" else "float32"
        encoder = T5PromptEncoder(text_encoder, max_length=max_length, device=dev, dtype=compute_dtype,
                                  preprocess=preprocess)
        summary = write_prompt_store(out, items, encoder.encode, encoder.identity(), dtype=dtype,
                                     shard_size=shard_size, batch_size=batch_size)
        return summary if dist.is_main() else None
    finally:
        dist.cleanup()
