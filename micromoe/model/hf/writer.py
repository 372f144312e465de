"""Write tensors as Hugging Face safetensors shards, streaming: at most one shard in memory.

Shards are named as `save_pretrained` names them: `model.safetensors` when everything fits one
shard, else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (`metadata.
total_size` in bytes and the `weight_map`). Shards are written under temporary names and renamed
once N is known.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from micromoe.model.hf.reader import INDEX, SINGLE

try:  # the `hf` extra
    from safetensors.torch import save_file
except ImportError:  # pragma: no cover - exercised only without the extra
    save_file = None


def require_safetensors() -> None:
    """ValueError with the install line when the `hf` extra is missing."""
    if save_file is None:
        raise ValueError("writing safetensors needs the hf extra: pip install 'micromoe[hf]'")


def write_shards(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], *, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write (name, tensor) pairs, in order, into shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own). Returns the shard paths."""
    require_safetensors()
    if max_shard_bytes < 1:
        raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temp: list[Path] = []
    names: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            temp.append(_flush(folder, len(temp), shard))
            names.append(list(shard))
            shard, size = {}, 0
        shard[name] = t.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    if shard or not temp:
        temp.append(_flush(folder, len(temp), shard))
        names.append(list(shard))
    return _finish(folder, temp, names, total)


def _flush(folder: Path, i: int, shard: dict[str, torch.Tensor]) -> Path:
    path = folder / f".shard-{i:05d}.safetensors.part"
    save_file(shard, str(path), metadata={"format": "pt"})
    return path


def _finish(folder: Path, temp: list[Path], names: list[list[str]], total: int) -> list[Path]:
    """Rename the temporary shards and write the index (several shards only)."""
    if len(temp) == 1:
        final = folder / SINGLE
        os.replace(temp[0], final)
        (folder / INDEX).unlink(missing_ok=True)
        return [final]
    n = len(temp)
    finals = [folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for src, dst in zip(temp, finals, strict=True):
        os.replace(src, dst)
    weight_map = {name: dst.name for dst, shard in zip(finals, names, strict=True) for name in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / SINGLE).unlink(missing_ok=True)
    return finals
