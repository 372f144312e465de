"""Token files (`.bin`): a 32-byte header, then the ids as little-endian uint16 or uint32.

Header (little-endian): magic b"MMOETOK1" (8 bytes), uint32 format version (1), uint32 bytes per
id (2 or 4), uint64 vocabulary size, uint64 number of ids. uint32 is used when the vocabulary
exceeds 65,536 ids (Qwen's 151,936). Files without the magic are read as nanoGPT-style headerless
uint16 streams, so older `.bin` files keep working.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

MAGIC = b"MMOETOK1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per id, vocab size, number of ids
assert HEADER.size == 32


def id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits, else uint32."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocabulary size must be in [1, 2**32], got {vocab_size}")
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class TokenWriter:
    """Append ids to a token file; written to `PATH.part` and renamed on a clean close.

    Args:
        path: the `.bin` to write.
        vocab_size: every id must be below it; picks the id width.
    """

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        self.path, self.vocab_size = Path(path), vocab_size
        self.dtype = id_dtype(vocab_size)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._part = self.path.with_name(self.path.name + ".part")
        self._file = open(self._part, "wb")  # closed by close() or __exit__
        self._file.write(b"\0" * HEADER.size)  # filled in by close()

    def write(self, ids: npt.ArrayLike) -> None:
        """Append ids (any integer array); ValueError when one is outside [0, vocab_size)."""
        arr = np.asarray(ids)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise ValueError(f"token id outside [0, {self.vocab_size}) written to {self.path}")
        self._file.write(arr.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False).tobytes())
        self.count += arr.size

    def close(self) -> None:
        """Write the header and move the file into place."""
        self._file.seek(0)
        self._file.write(
            HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.vocab_size, self.count)
        )
        self._file.close()
        os.replace(self._part, self.path)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:  # leave no half-written file behind
            self._file.close()
            self._part.unlink(missing_ok=True)


def read_token_file(path: str | Path) -> tuple[npt.NDArray[np.unsignedinteger], int]:
    """(ids memory-mapped [N], vocab size) of a token file with our header, or of a headerless
    uint16 file (vocab size = largest id + 1). ValueError naming the file when it is malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if head[:8] == MAGIC:
        if len(head) < HEADER.size:
            raise ValueError(f"{path}: truncated header")
        _, version, width, vocab, count = HEADER.unpack(head)
        if version != VERSION or width not in (2, 4):
            raise ValueError(f"{path}: unknown token file version {version} / id width {width}")
        if size != HEADER.size + count * width:
            raise ValueError(
                f"{path}: header says {count} ids of {width} bytes, file has {size - HEADER.size} bytes"
            )
        if count == 0:
            raise ValueError(f"{path} holds no tokens")
        dtype = np.dtype("<u2" if width == 2 else "<u4")
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,)), int(vocab)
    if size % 2:
        raise ValueError(f"{path}: an odd number of bytes and no header: not a uint16 token file")
    if size == 0:
        raise ValueError(f"{path} is empty")
    tokens = np.memmap(path, dtype="<u2", mode="r")
    return tokens, int(tokens.max()) + 1
