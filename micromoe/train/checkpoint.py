"""Checkpoints: per-rank files written to a temporary folder that is renamed into place.

Layout under `DIR/checkpoints/`::

    step_00000100/meta.json        config, layout, placements (slot_expert per MoE layer), step
    step_00000100/rank00000.pt     this rank's model + optimizer state, RNG states
    latest                         the name of the newest complete checkpoint folder

Every rank writes `.tmp-step_N/rankR.pt`; after a barrier rank 0 writes meta.json, renames the
folder to `step_N` and then atomically replaces `latest`. A process killed at any point leaves
either the previous `latest` or the new one, never a partial checkpoint (leftover `.tmp-*` folders
are ignored and removed by the next save). Multi-node runs need a shared file system.

Resuming needs the same world size, layout, dispatcher, placement kind and model; the placements
themselves come from the checkpoint (adaptive replacement may have changed them). Anything else
raises ValueError (no resharding).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()  # collective (world): every rank's file is on disk before the rename


def rng_state() -> dict[str, Any]:
    # the data sampler and the planner use no global RNG; torch's seeds nothing after init
    # either, but a resumed run restores it for any randomness added later
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, meta: dict[str, Any], rank_state: dict[str, Any], *, rank: int, distributed: bool
) -> Path:
    """Write one checkpoint (collective when distributed: every rank calls it). Returns its folder."""
    ck = Path(root) / "checkpoints"
    name = f"step_{step:08d}"
    tmp = ck / f".tmp-{name}"
    if rank == 0:
        ck.mkdir(parents=True, exist_ok=True)
        for old in ck.glob(".tmp-*"):  # leftovers of a killed save
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    _barrier(distributed)
    part = tmp / f"rank{rank:05d}.pt.part"
    torch.save(rank_state, part)
    os.replace(part, tmp / f"rank{rank:05d}.pt")
    _barrier(distributed)
    final = ck / name
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = ck / f"{LATEST}.part"
        pointer.write_text(name)
        os.replace(pointer, ck / LATEST)
    _barrier(distributed)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    pointer = Path(root) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not (folder / "meta.json").exists():
        raise ValueError(f"{str(pointer)!r} names {folder.name!r}, which is not a complete checkpoint")
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "meta.json").read_text())


def check_compatible(meta: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise ValueError unless the checkpoint's world size, layout, dispatcher, data stream
    (micro-batch, accumulation, seed) and model match."""
    keys = (
        "world",
        "dp",
        "ep",
        "merge",
        "dispatcher",
        "placement",
        "micro_batch",
        "grad_accum",
        "seed",
        "model",
    )
    for key in keys:
        if meta.get(key) != now.get(key):
            raise ValueError(
                f"the checkpoint was written with {key}={meta.get(key)!r} but this run has {key}="
                f"{now.get(key)!r}; resharding is not supported: resume with the same settings, or "
                "train into a fresh --out"
            )


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    """This rank's saved state, every tensor on the CPU: RNG states must be CPU ByteTensors
    (`set_rng_state` rejects them on a GPU), and `load_state_dict` copies model and optimizer
    tensors to their parameters' devices."""
    path = Path(folder) / f"rank{rank:05d}.pt"
    if not path.exists():
        raise ValueError(f"checkpoint {str(folder)!r} has no file for rank {rank}: written by fewer ranks?")
    return torch.load(path, map_location="cpu", weights_only=False)
