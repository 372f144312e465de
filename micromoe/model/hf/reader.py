"""Stream tensors out of a Hugging Face model folder, one at a time.

A folder holds `model.safetensors`, or `model.safetensors.index.json` (its `weight_map` names the
shard of every tensor) and the shards. Opening reads only the JSON index and the shards' headers;
`get` reads one tensor through `safe_open(...).get_slice`, so a rank reads the tensors it keeps and
never the whole model. At most one shard is open (memory-mapped) at a time, so the resident memory
of an import stays near one shard plus the tensor being copied, however large the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

try:  # the `hf` extra (pip install 'micromoe[hf]') is optional for the rest of micromoe
    from safetensors import safe_open
except ImportError:  # pragma: no cover - exercised only without the extra
    safe_open = None

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def require_safetensors() -> None:
    """ValueError with the install line when the `hf` extra is missing."""
    if safe_open is None:
        raise ValueError("reading Hugging Face folders needs safetensors: pip install 'micromoe[hf]'")


class SafetensorsFolder:
    """The tensors of a model folder, read on demand.

    Args:
        folder: the model folder.

    Raises ValueError naming the file: no weights, a bad index, a shard named by the index missing.
    """

    def __init__(self, folder: Path) -> None:
        require_safetensors()
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            self.weight_map = _read_index(index)
            for shard in sorted(set(self.weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise ValueError(f"{self.folder / shard}: missing; {index} names it as a shard")
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise ValueError(f"{self.folder}: no {SINGLE} or {INDEX}; is this a Hugging Face model folder?")
        self._open: tuple[str, Any] | None = None  # (shard, handle): one mapping at a time

    def names(self) -> list[str]:
        """Every tensor name in the folder."""
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        """The shard holding `name`; ValueError when no shard has it."""
        if name not in self.weight_map:
            where = self.folder / (INDEX if (self.folder / INDEX).is_file() else SINGLE)
            raise ValueError(f"{where}: has no tensor {name!r}")
        return self.folder / self.weight_map[name]

    def _handle(self, name: str) -> Any:
        self.file_of(name)  # ValueError when absent
        shard = self.weight_map[name]
        if self._open is None or self._open[0] != shard:
            self.close()
            handle = safe_open(str(self.folder / shard), framework="pt")
            self._open = (shard, handle.__enter__())
        return self._open[1]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name` (reads the header only)."""
        self.file_of(name)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` as float32 on the CPU; ValueError naming the shard when its stored shape
        differs from `expected` (checked before any data is read)."""
        path = self.file_of(name)
        piece = self._handle(name).get_slice(name)
        shape = tuple(piece.get_shape())
        if expected is not None and shape != tuple(expected):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(shape)}, but config.json implies {list(expected)}"
            )
        return piece[:].to(torch.float32)

    def close(self) -> None:
        """Unmap the open shard (the next `get` reopens what it needs)."""
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' is empty")
    return {str(k): str(v) for k, v in weight_map.items()}
