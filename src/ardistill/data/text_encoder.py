"""Text encoders: prompts -> (tokens (B, T, C) float, mask (B, T) bool), the interface a text DiT reads.

The embedded benchmark ships ``WordEncoder``, a fixed, deterministic encoder over a closed word
vocabulary (data/digit_pairs.py's grammar): a word-level tokenizer, a frozen embedding table drawn
from a seeded ``numpy.random.RandomState`` (whose stream NumPy guarantees stable across versions)
and a sinusoidal position code, followed by an end-of-text token. Why fixed and not trained:
- nothing to train or ship but a few numbers (its spec travels in the teacher's checkpoint
  metadata), so it is reproducible bit for bit on any machine;
- it carries everything a caption has (which word, at which position); understanding (which digit
  is on which side, across wordings) is left to the teacher's caption projection and
  cross-attention, the layers that also have to learn it on top of a frozen T5 in PixArt;
- distinct words get nearly orthogonal random vectors, so there is no shortcut through similar
  embeddings of "3" and "three": the teacher has to learn that they mean the same digit.
The empty prompt encodes to the end-of-text token alone (one real token, as T5's empty prompt
does), which is the null text of classifier-free guidance.

A batch is padded to its longest prompt (or to ``pad_to``); padding is zeros with mask False.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

EOS = "<eos>"
ENCODER_KINDS = ("words",)


class WordEncoder:
    """Fixed word-level text encoder: seeded embedding per word + sinusoidal position, then <eos>."""

    def __init__(self, vocabulary: tuple[str, ...] | list[str], width: int = 32, seed: int = 0, max_length: int = 16):
        vocab = tuple(vocabulary)
        if len(set(vocab)) != len(vocab) or EOS in vocab or not vocab:
            raise ValueError("WordEncoder: vocabulary must be non-empty, without duplicates or the <eos> token")
        if any(not w or " " in w for w in vocab):
            raise ValueError("WordEncoder: vocabulary entries must be single non-empty words")
        if width < 2 or width % 2:
            raise ValueError(f"WordEncoder: width must be an even number >= 2, got {width}")
        if max_length < 1:
            raise ValueError(f"WordEncoder: max_length must be >= 1, got {max_length}")
        self.vocabulary, self.width, self.seed, self.max_length = vocab, int(width), int(seed), int(max_length)
        self.index = {w: i for i, w in enumerate(vocab + (EOS,))}
        rs = np.random.RandomState(seed)
        self.table = torch.from_numpy(rs.standard_normal((len(vocab) + 1, width)).astype(np.float32))  # (V+1, C)
        self.positions = _sinusoid(max_length, width)  # (max_length, C)

    # ---- spec (what a checkpoint stores to rebuild the encoder) ----------------------------------
    def spec(self) -> dict:
        """Everything that rebuilds this encoder (stored in the text teacher's metadata)."""
        return {"kind": "words", "vocabulary": list(self.vocabulary), "width": self.width, "seed": self.seed,
                "max_length": self.max_length, "sha256": self.fingerprint()}

    def fingerprint(self) -> str:
        """sha256 of the embedding table and position code: equal fingerprints encode identically."""
        h = hashlib.sha256()
        h.update(self.table.numpy().tobytes())
        h.update(self.positions.numpy().tobytes())
        return h.hexdigest()

    # ---- encoding ------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        """Lower-cased words ("," is a word of its own) -> ids, ending with <eos>; unknown words raise."""
        words = prompt.lower().replace(",", " , ").split()
        unknown = [w for w in words if w not in self.index or w == EOS]
        if unknown:
            raise ValueError(f"prompt {prompt!r}: words {unknown} are not in the encoder's vocabulary "
                             f"({' '.join(self.vocabulary)})")
        ids = [self.index[w] for w in words] + [self.index[EOS]]
        if len(ids) > self.max_length:
            raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens with <eos>; the encoder takes at most "
                             f"{self.max_length}")
        return ids

    def encode(self, prompts: list[str] | tuple[str, ...], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (tokens (B, T, C) float32, mask (B, T) bool); T = the longest prompt, or ``pad_to``."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        ids = [self.tokenize(p) for p in prompts]
        T = max((len(i) for i in ids), default=1)
        if pad_to is not None:
            if pad_to < T:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({T} tokens)")
            T = pad_to
        tokens = torch.zeros(len(ids), T, self.width)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for b, seq in enumerate(ids):
            n = len(seq)
            tokens[b, :n] = self.table[torch.tensor(seq)] + self.positions[:n]
            mask[b, :n] = True
        return tokens, mask

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, (1, 1, C) and (1, 1): the null text for guidance and caption dropout."""
        return self.encode([""])


def _sinusoid(length: int, width: int) -> torch.Tensor:
    """Transformer position code (length, width): sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float64) / width)
    out = torch.zeros(length, width, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return out.float()


def digits_text_encoder(width: int = 32, seed: int = 0) -> WordEncoder:
    """The embedded benchmark's encoder: WordEncoder over data/digit_pairs.py's vocabulary."""
    from ardistill.data.digit_pairs import VOCABULARY
    return WordEncoder(VOCABULARY, width=width, seed=seed)


def encoder_from_spec(spec: dict | str, source: str = "text encoder spec") -> WordEncoder:
    """Rebuild an encoder from ``WordEncoder.spec()`` (a dict or its JSON); the fingerprint must match."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    if not isinstance(spec, dict) or spec.get("kind") not in ENCODER_KINDS:
        raise ValueError(f"{source}: expected a text encoder spec with kind in {ENCODER_KINDS}, got {spec!r:.200}")
    missing = {"vocabulary", "width", "seed", "max_length"} - set(spec)
    if missing:
        raise ValueError(f"{source}: text encoder spec lacks {sorted(missing)}")
    enc = WordEncoder(spec["vocabulary"], width=spec["width"], seed=spec["seed"], max_length=spec["max_length"])
    if "sha256" in spec and spec["sha256"] != enc.fingerprint():
        raise ValueError(f"{source}: the rebuilt text encoder's fingerprint {enc.fingerprint()[:12]} differs from "
                         f"the stored {str(spec['sha256'])[:12]} (a different NumPy stream?)")
    return enc


def load_text_teacher_and_encoder(path) -> tuple:
    """(TextDiT, its WordEncoder) from a text teacher file; the encoder spec comes from the file's metadata."""
    from ardistill.io.checkpoints import CheckpointError, load_state_and_config, load_text_teacher

    teacher = load_text_teacher(path)
    _, _, metadata = load_state_and_config(path)
    if "text_encoder" not in metadata:
        raise CheckpointError(f"{path}: no 'text_encoder' spec in the metadata; pass the encoder explicitly")
    try:
        encoder = encoder_from_spec(metadata["text_encoder"], f"{path}: text_encoder")
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(str(e)) from e
    if encoder.width != teacher.cfg.caption_channels:
        raise CheckpointError(f"{path}: text encoder width {encoder.width} differs from the teacher's "
                              f"caption_channels {teacher.cfg.caption_channels}")
    return teacher, encoder
