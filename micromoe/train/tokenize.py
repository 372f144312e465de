"""`micromoe tokenize`: text -> a token file with a model's own fast tokenizer.

    micromoe tokenize --hf MODEL_DIR --data corpus.txt|corpus_dir/|corpus.jsonl --out data.bin

Documents: a text file is one document (long ones are encoded in pieces of about 256 KiB cut after
a newline that precedes a non-blank character); a folder gives one document per `.txt`/`.md`
file and per line of its `.jsonl` files; a JSON-lines file one document per line (its `text`
field). Each document's ids are followed by the tokenizer's EOS id; no BOS is added. Ids are stored
as uint16 or, when the vocabulary exceeds 65,536, uint32 (`micromoe.train.token_file`).
`micromoe train --hf DIR --data TEXT` uses the same code in memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from micromoe.model.hf import HFTokenizer, load_tokenizer
from micromoe.train.token_file import TokenWriter, id_dtype

log = logging.getLogger("micromoe.tokenize")

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PIECE_BYTES = 1 << 18  # a long text file is encoded in pieces of about this many characters
BATCH_CHARS = 4 << 20  # characters handed to the tokenizer per (multi-threaded) batch call


@dataclass(frozen=True)
class TokenizeStats:
    """What a tokenization produced: documents, ids (EOS included), input bytes, wall seconds."""

    documents: int
    tokens: int
    input_bytes: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _pieces(text: str) -> Iterator[str]:
    """`text` cut into pieces of about PIECE_BYTES characters, each cut after a newline followed
    by a non-whitespace character (where tokenizers start a new pre-token anyway)."""
    start = 0
    while len(text) - start > PIECE_BYTES:
        cut = start + PIECE_BYTES
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, int]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{line_no}: not a JSON object with a {field!r} string ({exc})"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: {field!r} is not a string")
            yield text, len(line.encode())


def documents(path: str | Path, *, field: str = "text") -> Iterator[tuple[list[str], int]]:
    """(pieces of one document, input bytes it covered) for every document under `path`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {str(path)!r} does not exist; pass a text file, a folder or a .jsonl")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
        )
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no .txt, .md or .jsonl files")
    else:
        files = [path]
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            yield from (([text], n) for text, n in _jsonl(f, field))
        else:
            yield list(_pieces(f.read_text(encoding="utf-8", errors="replace"))), f.stat().st_size


def _batches(docs: Iterator[tuple[list[str], int]]) -> Iterator[tuple[list[str], list[int], int]]:
    """Group documents into (texts, pieces per document, bytes) of about BATCH_CHARS characters."""
    texts: list[str] = []
    counts: list[int] = []
    size = nbytes = 0
    for pieces, n in docs:
        texts.extend(pieces)
        counts.append(len(pieces))
        size += sum(len(p) for p in pieces)
        nbytes += n
        if size >= BATCH_CHARS:
            yield texts, counts, nbytes
            texts, counts, size, nbytes = [], [], 0, 0
    if counts:
        yield texts, counts, nbytes


def _input_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(
            f.stat().st_size
            for f in path.rglob("*")
            if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
        )
    return path.stat().st_size


def encode_documents(
    tok: HFTokenizer,
    path: str | Path,
    sink: Callable[[npt.NDArray[np.integer]], None],
    *,
    field: str = "text",
    progress: bool = False,
) -> TokenizeStats:
    """Tokenize every document under `path`, calling `sink` with each batch's ids (documents
    joined, each followed by EOS; uint32 [n]). Returns counts and timing."""
    start = time.perf_counter()
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)  # fast: no offsets
    eos = np.array([tok.eos_id], dtype=np.uint32)
    docs = tokens = nbytes = 0
    batches = _batches(documents(path, field=field))  # checks `path` before the bar starts
    first = next(batches, None)
    bar = tqdm(
        total=_input_bytes(Path(path)),
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=None if progress else True,
    )
    with bar:
        for texts, counts, n in itertools.chain([first] if first else [], batches):
            encodings = iter(encode(texts, add_special_tokens=False))
            parts: list[npt.NDArray[np.uint32]] = []
            for k in counts:
                parts.extend(np.asarray(next(encodings).ids, dtype=np.uint32) for _ in range(k))
                parts.append(eos)
            ids = np.concatenate(parts)
            sink(ids)
            docs, tokens, nbytes = docs + len(counts), tokens + ids.size, nbytes + n
            bar.update(n)
    return TokenizeStats(docs, tokens, nbytes, time.perf_counter() - start)


def tokenize_in_memory(hf: str | Path, path: str | Path) -> tuple[npt.NDArray[np.unsignedinteger], int]:
    """(ids [N] in the narrowest dtype, vocab size) of the text under `path` with `hf`'s tokenizer."""
    tok = load_tokenizer(hf)
    chunks: list[npt.NDArray[np.integer]] = []
    encode_documents(tok, path, chunks.append)
    if not chunks:
        raise ValueError(f"{path}: no text to tokenize")
    return np.concatenate(chunks).astype(id_dtype(tok.vocab_size)), tok.vocab_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hf", required=True, metavar="DIR", help="Hugging Face model folder (its tokenizer.json)"
    )
    p.add_argument(
        "--data", required=True, help="a text file, a folder of .txt/.md/.jsonl files, or a .jsonl file"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="token file to write (e.g. data.bin)")
    p.add_argument(
        "--text-field", default="text", help="the field of each JSON line that holds text (default: text)"
    )


def run(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.hf)
    with TokenWriter(args.out, tok.vocab_size) as out:
        stats = encode_documents(tok, args.data, out.write, field=args.text_field, progress=True)
    log.info(
        "%s: %d documents, %d tokens (%s ids, vocabulary %d) from %.1f MB in %.1f s: %.0f tokens/s",
        args.out,
        stats.documents,
        stats.tokens,
        np.dtype(out.dtype).name,
        tok.vocab_size,
        stats.input_bytes / 1e6,
        stats.seconds,
        stats.tokens_per_s,
    )
    return 0
