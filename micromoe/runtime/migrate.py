"""Re-placement: move one MoE layer to a new placement.

Adaptive replacement changes which expert sits in which local slot. With every expert owned once
(`runtime.owned`), the master weights and the optimizer state stay with their owners: a new
placement is only a new gather table and a new dispatcher, and no weight or optimizer byte moves.
The next forward gathers the new slots from the same owners.

`migrate_layer` runs these steps, every collective in the same order on every rank:
1. local validation, then [collective, world] an all-gather of a small agreement record (error
   flag, placement hash): a bad call raises ValueError on every rank before anything changes;
2. the layer's experts take the gather table of the new placement (same owners);
3. the layer gets a new dispatcher for the new placement, with the same cost model.

Legend: G GPUs of a MicroEP group, S local slots per GPU, E experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from micromoe.plan import Placement
from micromoe.plan.ownership import gather_table
from micromoe.runtime.comm import all_gather_counts
from micromoe.runtime.dispatch_microep import MicroEPDispatcher
from micromoe.runtime.groups import ProcessGroups
from micromoe.runtime.layer import MoELayer
from micromoe.runtime.owned import OwnedExperts


@dataclass(frozen=True)
class MigrationStats:
    """What one layer's re-placement cost.

    Attributes:
        bytes_moved: weight and optimizer-state bytes sent between ranks, summed over the world
            (0: owners keep both; the new slots are filled by the next forward's gather).
        slots_changed: local slots whose expert changed, summed over the world.
        ms: this rank's wall time for the re-placement, in milliseconds.
    """

    bytes_moved: int
    slots_changed: int
    ms: float


def placement_hash(placement: Placement) -> int:
    """A signed 64-bit hash of the slot table (for cross-rank agreement checks)."""
    digest = hashlib.blake2b(placement.key(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def migrate_layer(
    layer: MoELayer,
    groups: ProcessGroups,
    placement: Placement,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[ProcessGroups, MigrationStats]:
    """Move `layer` (expert-parallel, MicroEP dispatcher) to `placement`. Collective (world).

    Every rank calls it with the same `placement`. The owned master weights and their optimizer
    state do not move; the layer's gather table and dispatcher are replaced.

    Args:
        layer: a MoE layer made expert-parallel by `apply_expert_parallel(..., "microep")`.
        groups: its current process groups (`groups.placement` is the old placement).
        placement: the new placement: same GPUs, local slots and experts as the old one.
        optimizer: optional; if given it must hold the layer's master parameters (the state that
            stays with the owners), else the call is refused.

    Returns:
        (the layer's ProcessGroups with the new placement, stats).
    Raises ValueError on every rank, before anything changes, if any rank's arguments are invalid.
    """
    t0 = time.perf_counter()
    problem = _problem(layer, groups, placement, optimizer)
    _agree(problem, placement, groups, layer)
    experts: OwnedExperts = layer.experts  # type: ignore[assignment]
    experts.set_table(gather_table(placement, experts.owners, groups.microep_rank))
    new_groups = dataclasses.replace(groups, placement=placement)
    old = layer.dispatcher
    layer.dispatcher = MicroEPDispatcher(
        groups.microep,
        groups.microep_rank,
        placement,
        gpus_per_node=old.gpus_per_node,
        timer=old.timer,
        cost_model=old.cost_model,  # the new placement is planned with the same time model
    )
    changed = int((groups.placement.slot_expert != placement.slot_expert).sum())
    stats = MigrationStats(
        bytes_moved=0,
        slots_changed=changed * groups.layout.num_microep_groups,
        ms=(time.perf_counter() - t0) * 1e3,
    )
    return new_groups, stats


def _problem(
    layer: MoELayer, groups: ProcessGroups, placement: Placement, optimizer: torch.optim.Optimizer | None
) -> str:
    """'' or what is wrong with this rank's arguments."""
    old = groups.placement
    if not isinstance(placement, Placement):
        return f"placement must be a micromoe.plan.Placement, got {type(placement).__name__}"
    if not isinstance(layer.dispatcher, MicroEPDispatcher) or not isinstance(layer.experts, OwnedExperts):
        return (
            f"only a MicroEP layer can be re-placed; this layer's dispatcher is "
            f"{type(layer.dispatcher).__name__}: apply_expert_parallel(layer, groups, 'microep') first"
        )
    if layer.dispatcher.placement != old:
        return "the layer's dispatcher placement differs from groups.placement: pass the layer's groups"
    shape_new = (placement.num_gpus, placement.slots_per_gpu, placement.num_experts)
    shape_old = (old.num_gpus, old.slots_per_gpu, old.num_experts)
    if shape_new != shape_old:
        return (
            f"the new placement has (GPUs, slots, experts) = {shape_new} but the old one {shape_old}; "
            "build it with Placement.asymmetric(loads, num_gpus, slots_per_gpu) of the old placement"
        )
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in layer.experts.named_parameters() if id(p) not in held]
        if missing:
            return (
                f"the optimizer does not hold this layer's expert parameters ({', '.join(missing)}): "
                "pass the optimizer built over the model after apply_expert_parallel"
            )
    return ""


def _agree(problem: str, placement: Placement, groups: ProcessGroups, layer: MoELayer) -> None:
    """Raise ValueError on every rank unless all ranks are valid and chose the same placement."""
    h = 0 if problem else placement_hash(placement)
    device = layer.router.weight.device
    mine = torch.tensor([int(bool(problem)), h], dtype=torch.int64, device=device)
    # collective (world): the agreement record; host sync in wait()
    rec = all_gather_counts(mine, groups.dp).wait()
    bad = np.flatnonzero(rec[:, 0])
    if bad.size:
        where = f"this rank: {problem}" if problem else "see those ranks' messages"
        raise ValueError(f"re-placement refused on ranks {bad.tolist()} ({where}); nothing changed")
    if np.any(rec[:, 1] != rec[0, 1]):
        raise ValueError(
            f"re-placement refused: ranks disagree on the placement ({rec[:, 1].tolist()}); every rank "
            "must pass the same placement; nothing changed"
        )
