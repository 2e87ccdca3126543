"""Prompts and the sharded prompt-embedding store: the text encoder runs once per prompt.

A prompt file holds one prompt per line (blank lines skipped; ids "0", "1", ... in order), or JSONL
(``.jsonl``, or a first line that starts with ``{``) with an ``"id"`` and a ``"prompt"`` per line.

A prompt store is a sharded store laid out like a trajectory recording (data/shard_files.py):

    manifest.json          encoder identity, width C, max length L, dtype, the ids and prompts; written last
    shard-000000.npy ...   shard k holds rows [k * shard_size, (k + 1) * shard_size)

Each shard is a ``.npy`` 1-D structured array, one fixed-size record per prompt:

    row      int64      the prompt's row in the store (its position in the manifest's ``ids``)
    length   int64      number of valid (unmasked) tokens
    tokens   (L, C)     the encoder's output tokens (float16, float32, or bfloat16 stored as its raw uint16 bits)
    mask     (L,)       bool, True = a real token, False = padding

Every prompt is stored once, however many trajectories use it; trajectory records reference rows.
Row 0 is the empty prompt (id ``NULL_ID``), the null text of classifier-free guidance. Shards are
written atomically and listed in ``progress/`` after their rename, so a killed run resumes where it
stopped; ``verify`` hashes every shard and names the bad one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ardistill.data.shard_files import CorruptRecordingError, read_manifest, shard_problems
from ardistill.data.shard_runs import ShardRun
from ardistill.data.sharded_records import ShardedRecords
from ardistill.data.trajectory_dataset import StudentDataSpec, TrajectoryDataset
from ardistill.io.fileio import sha256_file

FORMAT = "ardistill-prompt-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16", "float32")
NULL_ID = "<null>"  # id of row 0, the empty prompt (guidance's null text)

# An encoder: list of prompts -> tokens (B, L, C) float, mask (B, L) bool (True = real token).
EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class CorruptPromptStoreError(CorruptRecordingError):
    """A prompt store on disk does not match its manifest (missing, truncated or corrupted shard)."""


# ------------------------------------------------------------------------------------------------
# Prompt files


@dataclass(frozen=True)
class Prompt:
    """One prompt and its id."""

    id: str
    prompt: str


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a text file (one per line) or JSONL (``id`` and ``prompt`` per line); errors name file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    jsonl = path.suffix == ".jsonl" or first.lstrip().startswith("{")
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            for key in ("id", "prompt"):
                if not isinstance(obj, dict) or key not in obj:
                    raise ValueError(f"{path}:{n}: a JSONL prompt needs the field {key!r}")
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{path}:{n}: field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
            item = Prompt(id=str(obj["id"]), prompt=obj["prompt"])
        else:
            item = Prompt(id=str(len(out)), prompt=line.strip())
        if item.id == NULL_ID:
            raise ValueError(f"{path}:{n}: id {NULL_ID!r} is reserved for the empty prompt")
        if item.id in seen:
            raise ValueError(f"{path}:{n}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = n
        out.append(item)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


# ------------------------------------------------------------------------------------------------
# Record layout


@dataclass(frozen=True)
class PromptLayout:
    """What one prompt record holds: max length L, width C, storage dtype."""

    max_length: int
    width: int
    dtype: str = "float16"

    def __post_init__(self):
        if self.max_length < 1 or self.width < 1:
            raise ValueError(f"PromptLayout: max_length and width must be >= 1, got {self.max_length}, {self.width}")
        if self.dtype not in DTYPES:
            raise ValueError(f"PromptLayout: dtype must be one of {DTYPES}, got {self.dtype!r}")

    def record_dtype(self) -> np.dtype:
        """numpy structured dtype of one record (bfloat16 as its raw 16 bits: numpy has no bfloat16)."""
        f = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}[self.dtype]
        return np.dtype([("row", "<i8"), ("length", "<i8"), ("tokens", f, (self.max_length, self.width)),
                         ("mask", "?", (self.max_length,))])

    @property
    def record_bytes(self) -> int:
        return self.record_dtype().itemsize

    def to_dict(self) -> dict:
        return {"max_length": self.max_length, "width": self.width, "dtype": self.dtype,
                "record_bytes": self.record_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptLayout":
        return cls(max_length=d["max_length"], width=d["width"], dtype=d["dtype"])

    def to_storage(self, tokens: torch.Tensor) -> np.ndarray:
        """Float tokens -> the stored numpy array."""
        t = tokens.detach().cpu()
        if self.dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.to(torch.float16 if self.dtype == "float16" else torch.float32).numpy()

    def from_storage(self, arr: np.ndarray) -> torch.Tensor:
        """Stored numpy array -> float32 tokens."""
        arr = arr.copy()  # a field of structured records: fresh strides (torch refuses the record stride)
        if self.dtype == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(arr).float()


def pack_prompt_records(layout: PromptLayout, rows: np.ndarray, tokens: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Structured records (B,) of a shard from encoder outputs tokens (B, L, C), mask (B, L)."""
    B, L, C = tokens.shape
    if (L, C) != (layout.max_length, layout.width) or tuple(mask.shape) != (B, L):
        raise ValueError(f"encoder returned tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)}; the store "
                         f"expects (B, {layout.max_length}, {layout.width}) and (B, {layout.max_length})")
    if not torch.isfinite(tokens).all():
        raise ValueError(f"non-finite text embeddings for rows {int(rows[0])}..{int(rows[-1])}")
    rec = np.empty(B, dtype=layout.record_dtype())
    rec["row"] = rows
    m = mask.detach().cpu().bool()
    rec["length"] = m.sum(1).numpy()
    # padding carries no information: store zeros there, so the bytes do not depend on the encoder's padding values
    rec["tokens"] = layout.to_storage(tokens.detach().cpu().float() * m.unsqueeze(-1))
    rec["mask"] = m.numpy()
    return rec


# ------------------------------------------------------------------------------------------------
# Writer


@dataclass
class PromptStoreSummary:
    """What a prompt-store run did."""

    out: str
    count: int
    encoded: int
    total_bytes: int
    seconds: float
    status: str

    def __str__(self) -> str:
        return (f"{self.out}: {self.count} prompts ({self.count - 1} + the empty prompt), "
                f"{self.total_bytes / 2**20:.2f} MiB; this run encoded {self.encoded} in {self.seconds:.1f} s")


def write_prompt_store(out: str | os.PathLike, prompts: list[Prompt], encode: EncodeFn, encoder: dict,
                       dtype: str = "float16", shard_size: int = 4096, batch_size: int = 64) -> PromptStoreSummary:
    """Encode every prompt once (row 0: the empty prompt) into a sharded, checksummed store at ``out``.

    Args:
        prompts: from ``read_prompts``; ids must be unique.
        encode: list of prompts -> tokens (B, L, C), mask (B, L).
        encoder: its identity, stored in the manifest: ``name``, ``sha256`` (of its weights), ``width``
            C, ``max_length`` L, and anything else that determines the output.
        dtype: storage dtype of the tokens ("float16", "bfloat16" or "float32").
    Rerunning with the same settings resumes an interrupted run; other settings are refused. Under
    torchrun (``distributed.init`` first) rank r encodes the shards k with k % world_size == r.
    """
    t0 = time.perf_counter()
    for key in ("name", "sha256", "width", "max_length"):
        if key not in encoder:
            raise ValueError(f"write_prompt_store: encoder identity needs {key!r}, got {sorted(encoder)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"write_prompt_store: shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids) or NULL_ID in ids:
        raise ValueError(f"write_prompt_store: prompt ids must be unique and not {NULL_ID!r}")
    items = [Prompt(NULL_ID, "")] + list(prompts)
    layout = PromptLayout(max_length=int(encoder["max_length"]), width=int(encoder["width"]), dtype=dtype)
    plan = json.loads(json.dumps({
        "format": FORMAT, "version": VERSION, "count": len(items), "shard_size": shard_size,
        "layout": layout.to_dict(), "encoder": encoder, "null_id": NULL_ID,
        "ids": [p.id for p in items], "prompts": [p.prompt for p in items],
        "numerics": {"batch_size": batch_size, "torch": torch.__version__},
    }))
    # a resume checks the listed shards' sizes (not their checksums); each shard is written before the next is encoded
    run = ShardRun(out, plan, layout, hash_listed=False, background=False)
    encoded = 0
    with run:
        for k in run.todo:
            rows = run.indices(k)
            recs = []
            for i in range(0, len(rows), batch_size):
                r = rows[i:i + batch_size]
                tokens, mask = encode([items[j].prompt for j in r])
                recs.append(pack_prompt_records(layout, r, tokens, mask))
            run.submit(k, np.concatenate(recs))
            encoded += len(rows)
    run.finish()
    m = verify_prompt_store(out, checksums=False)
    return PromptStoreSummary(out=str(out), count=len(items), encoded=encoded, total_bytes=m["total_bytes"],
                              seconds=time.perf_counter() - t0, status=run.status)


# ------------------------------------------------------------------------------------------------
# Manifest, verification, reader


def load_prompt_manifest(root: str | os.PathLike) -> dict:
    """Read and check a prompt store's manifest.json (format, version, shard list, ids)."""
    m = read_manifest(root, fmt=FORMAT, version=VERSION, what="prompt-store manifest", unit="rows",
                      absent="not a finished prompt store (rerun the same command to finish an interrupted one)",
                      error=CorruptPromptStoreError)
    if len(m["ids"]) != m["count"] or m["ids"][0] != NULL_ID:
        raise CorruptPromptStoreError(f"{Path(root) / MANIFEST}: ids list {len(m['ids'])}, count {m['count']} "
                                      f"(row 0 must be {NULL_ID!r})")
    return m


def verify_prompt_store(root: str | os.PathLike, checksums: bool = True) -> dict:
    """Check every shard (presence, size, header; with ``checksums`` sha256 and rows); raises naming each bad shard."""
    root = Path(root)
    m = load_prompt_manifest(root)
    problems = shard_problems(root, m, PromptLayout.from_dict(m["layout"]), checksums, deep=_check_rows)
    if problems:
        raise CorruptPromptStoreError(f"prompt store {root}: {len(problems)} bad shard(s): " + "; ".join(problems))
    return m


def _check_rows(path: Path, s: dict) -> str | None:
    rows = np.load(path, mmap_mode="r")["row"]
    if not np.array_equal(rows, np.arange(s["start"], s["start"] + s["count"])):
        return f"{s['file']}: rows do not match {s['start']}..{s['start'] + s['count'] - 1}"
    return None


def store_id(root: str | os.PathLike) -> str:
    """sha256 of the store's manifest (which lists every shard's checksum): what a recording pins."""
    return sha256_file(Path(root) / MANIFEST)


class PromptStore(ShardedRecords):
    """Read a prompt store by row or id: tokens (B, L, C) float32 and mask (B, L) bool."""

    kind = "prompt"
    what = "prompt store"
    error = CorruptPromptStoreError

    def __init__(self, root: str | os.PathLike, verify_checksums: bool = False, verify_shards: bool = True):
        """``verify_checksums``: hash every shard now (and not again); else, with ``verify_shards``, each
        shard is hashed when a read first reaches it."""
        self.root = Path(root)
        self.verify_shards = verify_shards
        manifest = (verify_prompt_store if verify_checksums else load_prompt_manifest)(self.root)
        # verify_prompt_store just hashed every shard
        self._attach(manifest, PromptLayout.from_dict(manifest["layout"]), verified=verify_checksums)
        self.ids: list[str] = list(self.manifest["ids"])
        self.prompts: list[str] = list(self.manifest["prompts"])
        self._row_of = {i: r for r, i in enumerate(self.ids)}

    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    def row_of(self, prompt_id: str) -> int:
        if prompt_id not in self._row_of:
            raise KeyError(f"prompt id {prompt_id!r} is not in the prompt store {self.root}")
        return self._row_of[prompt_id]

    def get(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, L, C) float32 and mask (B, L) bool of the given rows."""
        rec = self.records(rows)
        return self.layout.from_storage(rec["tokens"]), torch.from_numpy(rec["mask"].copy())

    def get_ids(self, prompt_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask by prompt id."""
        return self.get([self.row_of(i) for i in prompt_ids])

    def null(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's tokens (batch, L, C) and mask (batch, L): guidance's null text."""
        tokens, mask = self.get([0])
        return tokens.expand(batch, -1, -1), mask.expand(batch, -1)

    def prompt_rows(self) -> list[int]:
        """Rows of the real prompts (every row but the null one)."""
        return list(range(1, len(self)))

    def verify(self) -> None:
        """Hash every shard against the manifest (reads all data)."""
        verify_prompt_store(self.root, checksums=True)


def trim_text(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no caption of the batch uses (masked tokens change nothing, they cost time)."""
    used = mask.any(dim=0).nonzero()
    T = int(used.max()) + 1 if used.numel() else 1
    return text[:, :T], mask[:, :T]


class TextTrajectoryDataset(TrajectoryDataset):
    """A text recording with its prompt store: ``batch`` adds the captions ``text`` (B, T, C) and ``text_mask`` (B, T).

    The store is the one the manifest names (``prompt_store`` overrides the path, e.g. after moving
    it); its manifest must have the sha256 the recording pinned.
    """

    def __init__(self, root: str | os.PathLike, expect: StudentDataSpec | None = None,
                 prompt_store: str | os.PathLike | None = None, verify_checksums: bool = False,
                 verify_shards: bool = True, split_verify: bool = False):
        """``split_verify``: leave the prompt store's check to ``trajectories.verify_split`` (torchrun,
        where the ranks share the hashing) instead of hashing it whole at open."""
        super().__init__(root, expect, verify_checksums, verify_shards=verify_shards)
        ref = self.manifest.get("prompts")
        if ref is None or self.layout.condition != "prompt":
            raise ValueError(f"recording {self.root} is class-conditional, not a text recording (no 'prompts')")
        path = Path(prompt_store) if prompt_store is not None else Path(ref["store"])
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"prompt store of recording {self.root} not found at {path}; pass its new path")
        if store_id(path) != ref["store_sha256"]:
            raise ValueError(f"prompt store {path} is not the one recording {self.root} was made with "
                             f"(manifest sha256 differs)")
        # training draws captions from every shard of the store within its first batches, so its shards
        # are hashed here, at open (a damaged one is named before any step), not when a batch reaches them
        at_open = verify_checksums or (verify_shards and not split_verify)
        self.store = PromptStore(path, verify_checksums=at_open, verify_shards=verify_shards)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Student batch plus ``text`` (B, T, C) float32 and ``text_mask`` (B, T) bool, trimmed to the batch's longest caption."""
        b = super().batch(indices)
        b["text"], b["text_mask"] = trim_text(*self.store.get(b["prompt"].numpy()))
        return b

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The store's empty prompt (1, T, C), (1, T), trimmed."""
        return trim_text(*self.store.null())
