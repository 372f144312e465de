"""Checkpoints: what one is, how it is written and read. Nothing in it is pickled.

Layout under `OUT/checkpoints/`::

    step_00000100/meta.json          format, step, configs, layout, placements, optimizer step,
                                     replacement history, data fingerprint (JSON)
    step_00000100/state/*.safetensors  model and optimizer tensors by logical name, written by
                                     every rank through torch.distributed.checkpoint (DCP) in the
                                     safetensors format, one file per rank and layer
    step_00000100/rng/rankNNNNN.safetensors   each rank's RNG states (restored on the same layout)
    latest                           the name of the newest complete checkpoint folder

Logical names: the single-device model's names, with every MoE layer's experts split by expert
id (`model.blocks.3.ffn.experts.17.w_gate_up` [H, 2F], `...w_down` [F, H]) and every optimizer
tensor beside its parameter (`optim.<name>.exp_avg`, `.exp_avg_sq`). Dense parameters sharded by
FSDP are saved as DCP saves DTensors (each rank its rows, with their offsets), experts by the
ranks that own them (one MicroEP group). So a checkpoint does not depend on the world size, EP, d
or placement that wrote it: any layout loads it, each rank reading only the pieces it keeps.

Every rank writes `.tmp-step_N/`; after all ranks report success rank 0 writes meta.json, renames
the folder to `step_N`, atomically replaces `latest`, and prunes all but the newest `keep`. A
process killed at any point leaves the previous `latest` intact; a failed save (a full disk) is
removed again and reported with its cause. Reading validates the pointer (a `step_*` folder of
this run only), meta.json and every file's safetensors header before any process starts
(`check_checkpoint`); a failure while loading names the file and the rank that found it.
Multi-node runs need a shared file system.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, distribute_tensor

from micromoe.runtime import GroupedSwiGLU, OwnedExperts
from micromoe.train.checkpoint_files import (  # the files' layout and validation, re-exported
    FORMAT,
    LATEST,
    STEP_DIR,
    CheckpointReader,
    check_checkpoint,
    checkpoint_folder,
    latest_checkpoint,
    open_checkpoint,
    read_meta,
    safetensors_header,
    step_dir,
)

__all__ = [
    "FORMAT",
    "LATEST",
    "CheckpointReader",
    "check_checkpoint",
    "checkpoint_folder",
    "fill_model",
    "init_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "logical_state",
    "open_checkpoint",
    "optimizer_step",
    "read_meta",
    "read_rng",
    "save_checkpoint",
    "set_optimizer_step",
    "step_dir",
]

_EXPERT_PARAMS = ("w_gate_up", "w_down")
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------------
# logical state: names -> tensors (views into the model and optimizer)


@dataclass(frozen=True)
class _Entry:
    """One logical tensor of the model: its key, its view, and the parameter it is (a row of)."""

    key: str
    view: torch.Tensor
    param: torch.Tensor | None  # None for a buffer
    row: int | None  # the expert row of `param`, None for the whole tensor
    sharded: bool  # a DTensor: every rank holds (and writes) its own rows
    expert: bool


def _entries(model: nn.Module) -> list[_Entry]:
    """Parameters (a tied weight once, under its first name) and persistent buffers."""
    expert_of = _expert_modules(model)
    persistent = set(model.state_dict().keys())
    named = [(n, p, True) for n, p in model.named_parameters()]
    named += [(n, b, False) for n, b in model.named_buffers() if n in persistent]
    out: list[_Entry] = []
    for name, t, is_param in named:
        param = t if is_param else None
        owner = expert_of.get(id(t))
        if owner is None:
            out.append(_Entry(f"model.{name}", t.detach(), param, None, isinstance(t, DTensor), False))
            continue
        base, ids = owner
        leaf = name.rsplit(".", 1)[1]
        for row, e in enumerate(ids):
            out.append(_Entry(f"model.{base}.{e}.{leaf}", t.detach()[row], param, row, False, True))
    return out


def _expert_modules(model: nn.Module) -> dict[int, tuple[str, tuple[int, ...]]]:
    """id(expert parameter) -> (its module's name, the expert ids of its rows)."""
    found = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, OwnedExperts):
            ids = mod.owned
        elif isinstance(mod, GroupedSwiGLU):
            ids = tuple(range(mod.num_slots))
        else:
            continue
        for p in mod.parameters():
            found[id(p)] = (mod_name, ids)
    return found


def logical_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, writer: bool, for_save: bool
) -> dict[str, torch.Tensor]:
    """The model's (and optimizer's) tensors by logical name, as views of their own storage.

    For a save (`for_save`), only what this rank writes: its DTensor shards always; experts and
    replicated tensors only when it is a `writer` (a rank of the first MicroEP group: experts are
    owned once per group). For a load, everything this rank keeps. The optimizer's moments come
    beside each parameter (`optim.<name>.exp_avg`, `.exp_avg_sq`); a load creates them first.
    """
    if optimizer is not None:
        init_optimizer_state(optimizer)
    out: dict[str, torch.Tensor] = {}
    for entry in _entries(model):
        if for_save and not (entry.sharded or writer):
            continue
        out[entry.key] = entry.view
        if optimizer is None or entry.param is None:
            continue
        for k in _OPTIM_KEYS:
            state = optimizer.state[entry.param][k]
            out[f"optim.{entry.key.removeprefix('model.')}.{k}"] = (
                state if entry.row is None else state[entry.row]
            )
    return out


@torch.no_grad()
def fill_model(model: nn.Module, tensor: Callable[[str], torch.Tensor], names: set[str]) -> int:
    """Copy logical tensors (names without the `model.` prefix) from `tensor(name)` into this
    rank's part of `model`: its owned experts' rows, its shards of FSDP parameters (read whole,
    kept in part), plain tensors whole. Tensors not in `names` are left as they are (e.g. the
    expert biases a Hugging Face model does not have). Returns how many were copied."""
    copied = 0
    for entry in _entries(model):
        name = entry.key.removeprefix("model.")
        if name not in names:
            continue
        value = tensor(name)
        target = entry.view
        if isinstance(target, DTensor):
            value = distribute_tensor(
                value.to(target.device), target.device_mesh, target.placements, src_data_rank=None
            )
            target, value = target.to_local(), value.to_local()
        if value.shape != target.shape:
            raise ValueError(f"tensor {name!r} has shape {list(value.shape)}, the model {list(target.shape)}")
        target.copy_(value)
        copied += 1
    return copied


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state (zero moments, step 0) if it has none, as AdamW itself
    would on its first step, so a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            step_device = p.device if on_device else torch.device("cpu")
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=step_device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's step count (the same for every parameter; 0 before the first step)."""
    steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"optimizer parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def set_optimizer_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for s in optimizer.state.values():
        s["step"].fill_(float(step))


# ------------------------------------------------------------------------------------------------
# writing


def save_checkpoint(
    root: Path,
    step: int,
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
    *,
    rank: int,
    distributed: bool,
    keep: int = 0,
) -> Path:
    """Write one checkpoint (collective when distributed: every rank calls it). Returns its folder.

    `state`: this rank's logical tensors to write; `rng`: its RNG state tensors; `keep`: how many
    checkpoints to keep (0 = all). Raises ValueError on every rank when any rank failed (the
    partial checkpoint removed, the previous one intact), naming the cause."""
    ck = Path(root) / "checkpoints"
    name = step_dir(step)
    tmp = ck / f".tmp-{name}"
    error = ""
    if rank == 0:
        error = _try(lambda: _fresh_dir(ck, tmp))
    _raise_any(_verdict(error, distributed), f"checkpoint {name}", tmp if rank == 0 else None)
    try:
        with _single_process_quiet():
            dcp.save(
                state,
                storage_writer=HuggingFaceStorageWriter(
                    str(tmp / "state"),
                    fqn_to_index_mapping=_file_of(state, distributed),
                    save_distributed=True,
                ),
                no_dist=not distributed,
            )
    except CheckpointException as exc:
        error = _describe(exc, tmp / "state")
    if not error:
        error = _try(lambda: _write_rng(tmp / "rng" / f"rank{rank:05d}.safetensors", rng))
    _raise_any(_verdict(error, distributed), f"checkpoint {name}", tmp if rank == 0 else None)
    final = ck / name
    if rank == 0:
        error = _try(lambda: _publish(ck, tmp, final, {**meta, "format": FORMAT, "step": step}, keep))
    _raise_any(_verdict(error, distributed), f"checkpoint {name}", tmp if rank == 0 else None)
    return final


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _file_of(state: dict[str, torch.Tensor], distributed: bool) -> dict[str, int]:
    """Every key's file index: one file per transformer block (their tensors staged together in
    memory while a file is written), index 1 for the rest. The same map on every rank."""
    layer = re.compile(r"^(?:model|optim)\.blocks\.(\d+)\.")
    keys = list(state)
    if distributed:
        everyone: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, keys)  # collective (world): the union of keys
        keys = sorted({k for part in everyone for k in part or []})
    return {k: (int(m.group(1)) + 2 if (m := layer.match(k)) else 1) for k in keys}


def _fresh_dir(ck: Path, tmp: Path) -> None:
    ck.mkdir(parents=True, exist_ok=True)
    for old in ck.glob(".tmp-*"):  # leftovers of a killed save
        shutil.rmtree(old, ignore_errors=True)
    (tmp / "rng").mkdir(parents=True)


def _write_rng(path: Path, rng: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in rng.items()}, str(path))
    with open(path, "rb") as fp:
        os.fsync(fp.fileno())


def _publish(ck: Path, tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    part = tmp / "meta.json.part"
    with open(part, "w") as fp:
        json.dump(meta, fp, indent=1)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(part, tmp / "meta.json")
    if final.exists():  # the same step saved again (a resumed run repeating it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = ck / f"{LATEST}.part"
    pointer.write_text(final.name)
    os.replace(pointer, ck / LATEST)
    if keep > 0:
        for old in sorted(p for p in ck.iterdir() if STEP_DIR.fullmatch(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _try(fn) -> str:
    try:
        fn()
    except OSError as exc:
        return _os_error(exc)
    return ""


def _os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on device ({exc.filename or 'writing'})"
    return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)


def _describe(exc: CheckpointException, where: Path) -> str:
    """One line for DCP's per-rank failures: the first failing rank and its cause."""
    failures = getattr(exc, "failures", {}) or {}
    if not failures:
        return str(exc).splitlines()[0]
    rank, err = min(failures.items())
    cause = err[0] if isinstance(err, tuple) else err  # DCP wraps (exception, traceback summary)
    text = _os_error(cause) if isinstance(cause, OSError) else (str(cause).strip().splitlines() or [""])[0]
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"no space left on device (rank {rank}, under {where})"
    return f"rank {rank}: {type(cause).__name__}: {text} (under {where})"


def _verdict(error: str, distributed: bool) -> list[str]:
    """Every rank's error ('' = fine), identical on every rank."""
    if not distributed:
        return [error]
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)  # collective (world): who failed, and why
    return [e or "" for e in everyone]


def _raise_any(errors: list[str], what: str, cleanup: Path | None) -> None:
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    rank, err = bad[0]
    where = f"rank {rank}: " if len(errors) > 1 and not err.startswith("rank ") else ""
    raise ValueError(f"could not write {what}: {where}{err}; the partial checkpoint was removed")


# ------------------------------------------------------------------------------------------------
# loading (validation and whole-tensor reading: checkpoint_files.py)


def load_checkpoint(folder: Path, state: dict[str, torch.Tensor], *, distributed: bool) -> None:
    """Fill `state` (this rank's logical tensors, as views into the model and optimizer) from the
    checkpoint, in place (collective when distributed). ValueError on every rank naming the file
    and the rank that failed."""
    reader = HuggingFaceStorageReader(str(Path(folder) / "state"))
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, no_dist=not distributed)
    except CheckpointException as exc:
        raise ValueError(
            f"could not load checkpoint {folder}: {_describe(exc, Path(folder) / 'state')}"
        ) from None
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"could not load checkpoint {folder}: {text}") from None


def read_rng(folder: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """This rank's saved RNG states, or None if the checkpoint has none for it."""
    from safetensors.torch import load_file

    path = Path(folder) / "rng" / f"rank{rank:05d}.safetensors"
    if not path.is_file():
        return None
    safetensors_header(path)
    return load_file(str(path))
