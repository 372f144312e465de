"""Training data: a token stream, a train/validation split, and deterministic, resumable batches.

Sources (`load_tokens`):
- a text file, or a folder of them (`*.txt`, `*.md`, sorted, concatenated), read as bytes: a
  byte-level vocabulary of 256 (the default is the bundled tiny-shakespeare corpus);
- with `--hf`, text (also JSON lines' `text` field) tokenized by the model's tokenizer;
- a `.bin` token file (`micromoe tokenize` writes them: a header, then uint16 or uint32 ids), or a
  headerless file of little-endian uint16 tokens (the nanoGPT convention), memory-mapped.

Batches carry no hidden state: the sequences of optimizer step s come from a generator seeded by
(seed, split, s), so the data position is just the step number (which the checkpoint stores), and
the same global batch is drawn whatever the world size. Rank r's micro-batch m of a step is the
(m * world + r)-th slice of `micro_batch` sequences of the step's global batch, so one process
with `world * grad_accum` micro-batches sees exactly the sequences `world` processes see.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from micromoe.model.hf import load_tokenizer
from micromoe.train.token_file import read_token_file
from micromoe.train.tokenize import TEXT_SUFFIXES, tokenize_in_memory

FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_BYTES = 4096


def default_corpus() -> Path:
    """The bundled tiny-shakespeare text (about 1 MB)."""
    return Path(str(resources.files("micromoe") / "data" / "tinyshakespeare.txt"))


def load_tokens(
    path: str | Path | None = None, *, hf: str | Path | None = None
) -> tuple[npt.NDArray[np.integer], int]:
    """Token stream and vocabulary size of a text file, a folder of text files, a JSON-lines file
    or a token `.bin`.

    Without `hf`, text is read as bytes (vocabulary 256). With `hf` (a Hugging Face model folder),
    text (including `.jsonl`) is tokenized with the model's tokenizer (`micromoe.train.tokenize`)
    and the vocabulary is the model's. A `.bin` is read with its header (uint16 or uint32 ids and
    the vocabulary size) or as headerless uint16 (vocabulary = largest id + 1).

    Returns (tokens uint8, uint16 or uint32 [N], vocab_size).
    """
    path = Path(path) if path is not None else default_corpus()
    if not path.exists():
        raise ValueError(f"data path {str(path)!r} does not exist; pass a text file, a folder or a .bin")
    if not path.is_dir() and not path.is_file():  # a device, FIFO or socket: reading may never end
        raise ValueError(
            f"data path {str(path)!r} is {_file_kind(path)}, not a regular file or folder; pass a text "
            "file, a folder or a .bin"
        )
    if path.suffix == ".bin":
        tokens, vocab = read_token_file(path)
        if hf is not None:
            model_vocab = load_tokenizer(hf).vocab_size
            if vocab > model_vocab:
                raise ValueError(
                    f"{path}: ids up to {vocab - 1}, but the --hf model's vocabulary is {model_vocab}"
                )
            vocab = model_vocab
        return tokens, vocab
    if hf is not None:
        return tokenize_in_memory(hf, path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        tokens = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8)
        return tokens, 256
    return np.frombuffer(path.read_bytes(), dtype=np.uint8), 256


def _file_kind(path: Path) -> str:
    """'a character device', 'a FIFO', ... for a path that is not a regular file or folder."""
    mode = path.stat().st_mode
    kinds = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kinds |= {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def data_fingerprint(tokens: npt.NDArray[np.integer]) -> str:
    """A cheap, stable fingerprint of a token stream: '<dtype>:<tokens>:<hash>', the hash (BLAKE2b)
    over FINGERPRINT_BLOCKS evenly spaced blocks of FINGERPRINT_BLOCK_BYTES (the first and the last
    included; all of it when smaller). It reads at most 256 KiB whatever the size, so a memory-mapped
    .bin stays on disk; any change of length or dtype, and most edits, change it. The same tokens
    give the same fingerprint wherever the file lives (moving or renaming data changes nothing)."""
    arr = np.asarray(tokens)
    raw = arr.reshape(-1).view(np.uint8)
    h = hashlib.blake2b(digest_size=16)
    size, block = raw.size, FINGERPRINT_BLOCK_BYTES
    if size <= FINGERPRINT_BLOCKS * block:
        h.update(raw.tobytes())
    else:
        for start in np.linspace(0, size - block, FINGERPRINT_BLOCKS).astype(np.int64):
            h.update(raw[start : start + block].tobytes())
    return f"{arr.dtype.name}:{arr.size}:{h.hexdigest()}"


@dataclass(frozen=True)
class BatchSpec:
    """How a global batch is cut: `micro_batch` sequences of `seq_len` tokens per micro-batch,
    `grad_accum` micro-batches per rank and step, `world` ranks."""

    seq_len: int
    micro_batch: int
    grad_accum: int
    world: int

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch * self.grad_accum * self.world


class TokenData:
    """A token stream split into train (first 1 - val_fraction) and validation (the rest).

    Args:
        tokens: [N] token ids.
        vocab_size: V.
        val_fraction: share of the stream held out for validation.
        seed: base seed of the sampling.

    Attributes:
        fingerprint: `data_fingerprint(tokens)` (saved in checkpoints: a resume on other data is
            refused).
    """

    def __init__(
        self, tokens: npt.NDArray[np.integer], vocab_size: int, *, val_fraction: float = 0.1, seed: int = 0
    ) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(len(tokens) * val_fraction)
        self.splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
        self.vocab_size, self.seed = vocab_size, seed
        self.fingerprint = data_fingerprint(tokens)

    def check(self, seq_len: int) -> None:
        """Raise ValueError when a split is too short for one sequence of `seq_len` + 1 tokens."""
        for name, toks in self.splits.items():
            if len(toks) <= seq_len + 1:
                raise ValueError(
                    f"the {name} split has {len(toks)} tokens, too few for sequences of {seq_len}; "
                    "use more data or a shorter --seq-len"
                )

    def batch(
        self, split: str, step: int, micro: int, rank: int, spec: BatchSpec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s micro-batch `micro` of optimizer step `step` (or eval batch `step`).

        Returns (x, y), int64 [micro_batch, seq_len] each; y is x shifted by one token.
        """
        toks = self.splits[split]
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
        starts = rng.integers(0, len(toks) - spec.seq_len - 1, size=spec.global_batch)
        part = micro * spec.world + rank
        mine = starts[part * spec.micro_batch : (part + 1) * spec.micro_batch]
        rows = np.stack([np.asarray(toks[s : s + spec.seq_len + 1], dtype=np.int64) for s in mine])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]
