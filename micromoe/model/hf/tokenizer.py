"""A model folder's fast tokenizer (`tokenizer.json`, read with `tokenizers`, not `transformers`).

`load_tokenizer(folder)` returns the tokenizer, the id that ends a document (EOS) and the model's
vocabulary size: config.json's `vocab_size` (the embedding's rows, which may exceed the
tokenizer's ids: Qwen pads to 151,936 rows for 151,665 tokens), else the tokenizer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # the `hf` extra (pip install 'micromoe[hf]') is optional for the rest of micromoe
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - exercised only without the extra
    Tokenizer = None

# files that make up a tokenizer in a Hugging Face folder (copied by `micromoe export`)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class HFTokenizer:
    """Attributes: tokenizer (a `tokenizers.Tokenizer`), eos_id (ends every document),
    vocab_size (ids the model's embedding accepts), path (the tokenizer.json read)."""

    tokenizer: Any
    eos_id: int
    vocab_size: int
    path: Path


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _eos_id(folder: Path, tok: Any) -> int | None:
    """config.json's eos_token_id (the pretraining document separator; the first of a list), else
    generation_config.json's, else tokenizer_config.json's eos_token looked up in the tokenizer."""
    for name in ("config.json", "generation_config.json"):
        eos = _json(folder / name).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    eos_token = _json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    return tok.token_to_id(eos_token) if isinstance(eos_token, str) else None


def load_tokenizer(folder: str | Path) -> HFTokenizer:
    """The fast tokenizer of a model folder; ValueError naming the file when it is missing, or
    when no end-of-document token is defined."""
    if Tokenizer is None:
        raise ValueError(
            "tokenizing with a Hugging Face tokenizer needs tokenizers: pip install 'micromoe[hf]'"
        )
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{path}: not found; micromoe needs the model's fast tokenizer (tokenizer.json) to tokenize text"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type for malformed files
        raise ValueError(f"{path}: not a tokenizers file ({exc})") from None
    eos = _eos_id(folder, tok)
    if eos is None:
        raise ValueError(
            f"{folder / 'config.json'}: no eos_token_id (nor an eos_token in tokenizer_config.json) to "
            "separate documents"
        )
    vocab = int(_json(folder / "config.json").get("vocab_size") or tok.get_vocab_size(with_added_tokens=True))
    if not 0 <= eos < vocab:
        raise ValueError(f"{folder / 'config.json'}: eos_token_id {eos} is outside the vocabulary of {vocab}")
    return HFTokenizer(tok, eos, vocab, path)
