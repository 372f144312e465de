"""Stream tensors out of a Hugging Face model folder, one at a time.

A folder holds `model.safetensors`, or `model.safetensors.index.json` (its `weight_map` names the
shard of every tensor) and the shards. A safetensors file is an 8-byte little-endian header length,
a JSON header ({name: {dtype, shape, data_offsets}}) and the raw tensor bytes. Opening reads only
the index; a shard's header is read the first time one of its tensors is asked for; `get` reads
one tensor's bytes straight into a fresh tensor (one `readinto` at its offset). So a rank reads
only the tensors it keeps, and an import holds one tensor at a time, never a shard: memory-mapping
the shard instead (`safe_open`) kept the touched pages of the open shard resident, about one shard
of RSS (measured in tests/test_hf_source.py).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """({tensor name: {dtype, shape, data_offsets}}, byte offset of the data) of a safetensors file;
    ValueError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                raise ValueError(f"{path}: header of {size} bytes; not a safetensors file")
            header = json.loads(f.read(size))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsFolder:
    """The tensors of a model folder, read on demand.

    Args:
        folder: the model folder.

    Raises ValueError naming the file: no weights, a bad index, a shard named by the index missing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            self.listing = index
            self.weight_map = _read_index(index)
            for shard in sorted(set(self.weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise ValueError(f"{self.folder / shard}: missing; {index} names it as a shard")
        elif single.is_file():
            self.listing = single
            self.weight_map = dict.fromkeys(self._header(SINGLE)[0], SINGLE)
        else:
            raise ValueError(f"{self.folder}: no {SINGLE} or {INDEX}; is this a Hugging Face model folder?")

    def names(self) -> list[str]:
        """Every tensor name in the folder."""
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        """The shard holding `name`; ValueError naming the listing file when none has it."""
        if name not in self.weight_map:
            raise ValueError(f"{self.listing}: has no tensor {name!r}")
        return self.folder / self.weight_map[name]

    def _header(self, shard: str) -> tuple[dict[str, dict[str, Any]], int]:
        if shard not in self._headers:
            self._headers[shard] = read_header(self.folder / shard)
        return self._headers[shard]

    def _entry(self, name: str) -> dict[str, Any]:
        path = self.file_of(name)
        header, _ = self._header(self.weight_map[name])
        if name not in header:
            raise ValueError(f"{path}: has no tensor {name!r}, though {self.listing.name} says it does")
        return header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name` (reads the shard's header only)."""
        return tuple(self._entry(name)["shape"])

    def get(self, name: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` as float32 on the CPU; ValueError naming the shard when its stored shape
        differs from `expected` (checked before any data is read) or the file is truncated."""
        path, entry = self.file_of(name), self._entry(name)
        shape = tuple(entry["shape"])
        if expected is not None and shape != tuple(expected):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(shape)}, but config.json implies {list(expected)}"
            )
        if entry["dtype"] not in DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which micromoe cannot read"
            )
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} holds {end - begin} bytes, its shape needs {nbytes}")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(self._header(self.weight_map[name])[1] + begin)
            if nbytes and f.readinto(memoryview(raw.numpy())) != nbytes:
                raise ValueError(f"{path}: truncated inside tensor {name!r}")
        return raw.view(dtype).reshape(shape).to(torch.float32)

    def close(self) -> None:
        """Forget the cached shard headers (no file stays open between reads)."""
        self._headers = {}


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' is empty")
    return {str(k): str(v) for k, v in weight_map.items()}
