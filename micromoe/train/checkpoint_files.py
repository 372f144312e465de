"""The files of a checkpoint (the format `micromoe.train.checkpoint` writes): where they are, their
validation before anything loads them, and whole logical tensors for one process (export).

Everything here reads JSON and safetensors headers; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader

FORMAT = "micromoe-checkpoint/2"
LATEST = "latest"
STEP_DIR = re.compile(r"step_\d{8}")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None; ValueError for a pointer that
    names anything but a `step_*` folder of this run, or an incomplete one."""
    pointer = Path(root) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="ascii", errors="strict").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint pointer {pointer} is unreadable ({exc})") from None
    if not STEP_DIR.fullmatch(name):
        raise ValueError(
            f"checkpoint pointer {pointer} names {name[:80]!r}, not a step_NNNNNNNN folder of this run"
        )
    folder = pointer.parent / name
    if not (folder / "meta.json").is_file():
        raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint (no meta.json)")
    return folder


def checkpoint_folder(root: Path, step: int | None = None) -> Path:
    """The checkpoint of `step` under the run folder `root` (default: the latest); ValueError."""
    if step is None:
        folder = latest_checkpoint(root)
        if folder is None:
            raise ValueError(f"no checkpoint under {Path(root) / 'checkpoints'}")
        return folder
    folder = Path(root) / "checkpoints" / step_dir(step)
    if not (folder / "meta.json").is_file():
        have = sorted(p.name for p in (Path(root) / "checkpoints").glob("step_*"))
        raise ValueError(
            f"no checkpoint of step {step} under {folder.parent} (found: {', '.join(have) or 'none'})"
        )
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a checkpoint; ValueError naming the file if it is torn or not ours."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint file {path} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"checkpoint file {path} is not a {FORMAT} checkpoint (format {found!r})")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise ValueError(f"checkpoint file {path} has no valid step")
    return meta


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Validate a checkpoint without loading it (meta.json, and every safetensors file's header
    against its size); returns the meta. ValueError naming the first bad file."""
    meta = read_meta(folder)
    files = sorted((Path(folder) / "state").glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {folder} has no tensor files under state/")
    for f in files + sorted((Path(folder) / "rng").glob("*.safetensors")):
        safetensors_header(f)
    return meta


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (truncation, random
    bytes, another format); ValueError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp:
            head = fp.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length beyond the file")
            header = json.loads(fp.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint file {path} is corrupt or not a safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise ValueError(
            f"checkpoint file {path} is truncated or corrupt: {size} bytes, its header says {8 + n + end}"
        )
    return header


# ------------------------------------------------------------------------------------------------
# one process reading whole tensors (export)


@dataclass
class CheckpointReader:
    """Whole logical tensors of one checkpoint, read on demand by a single process.

    Attributes:
        folder: the checkpoint folder. meta: its meta.json.
    """

    folder: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        md = HuggingFaceStorageReader(str(self.folder / "state")).read_metadata()
        self._chunks: dict[str, list[tuple[tuple[int, ...], str]]] = {}
        self._shapes = {k: tuple(v.size) for k, v in md.state_dict_metadata.items()}
        self._dtypes = {k: v.properties.dtype for k, v in md.state_dict_metadata.items()}
        for index, info in md.storage_data.items():
            self._chunks.setdefault(index.fqn, []).append((tuple(index.offset), str(info.relative_path)))

    def tensor_names(self) -> list[str]:
        """Logical model names (without the `model.` prefix), experts per expert id."""
        return sorted(k.removeprefix("model.") for k in self._shapes if k.startswith("model."))

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (a model name from `tensor_names`, or `optim.<...>`), float32 CPU."""
        from safetensors import safe_open

        key = name if name.startswith("optim.") else f"model.{name}"
        if key not in self._shapes:
            raise ValueError(f"checkpoint {self.folder} has no tensor {name!r}")
        out = torch.empty(self._shapes[key], dtype=self._dtypes[key])
        for offset, path in self._chunks[key]:
            with safe_open(path, framework="pt") as f:
                piece = f.get_tensor(key)
            out[tuple(slice(o, o + n) for o, n in zip(offset, piece.shape, strict=True))] = piece
        return out.float()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names():
            yield name, self.tensor(name)


def open_checkpoint(run_out: Path, step: int | None = None) -> CheckpointReader:
    """A reader of the run folder `run_out`'s checkpoint of `step` (default: the latest),
    validated first (`check_checkpoint`)."""
    folder = checkpoint_folder(Path(run_out), step)
    return CheckpointReader(folder, check_checkpoint(folder))
