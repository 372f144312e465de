"""Process groups, built once from a validated `ParallelLayout` and a placement, then passed around.

Every rank calls `dist.new_group` for every group in the same order (torch.distributed requires it
even for groups a rank is not in). Nothing here reads environment variables or a global rank: the
caller passes its rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from micromoe.plan import Placement
from micromoe.runtime.layout import ParallelLayout
from micromoe.runtime.timeouts import world_timeout


@dataclass(frozen=True)
class ReplicaGroup:
    """The ranks holding one expert; its gradient is all-reduced over them.

    Attributes:
        expert: expert id.
        slot: the local slot index of every replica (the local-slot rule).
        ranks: global ranks holding a replica, ascending.
        group: the process group over `ranks`, or None when this rank is not a member.
    """

    expert: int
    slot: int
    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None


@dataclass(frozen=True)
class ProcessGroups:
    """All groups one rank needs for one placement.

    Attributes:
        layout: the validated parallel layout (world size, DP, EP, merge factor).
        placement: which expert sits in which local slot of each GPU of one MicroEP group (the
            same in every MicroEP group).
        rank: this process's global rank.
        dp: the group for dense-parameter gradients (all ranks).
        microep: this rank's MicroEP group (d*EP ranks); the dispatcher's all-to-all runs here.
        replicas: one `ReplicaGroup` per expert in collective order (slot, then expert id).
    """

    layout: ParallelLayout
    placement: Placement
    rank: int
    dp: dist.ProcessGroup
    microep: dist.ProcessGroup
    replicas: tuple[ReplicaGroup, ...]

    @property
    def microep_rank(self) -> int:
        """This rank's GPU index inside its MicroEP group (the planner's numbering)."""
        return self.layout.microep_rank(self.rank)

    @property
    def local_slots(self) -> tuple[int, ...]:
        """Experts in this rank's local slots, -1 for an empty slot."""
        return tuple(int(e) for e in self.placement.slot_expert[self.microep_rank])


def build_process_groups(layout: ParallelLayout, placement: Placement, rank: int) -> ProcessGroups:
    """Validate `placement` against `layout`, then create every group (collective over the world).

    Must be called by every rank with identical arguments (except `rank`), after
    `dist.init_process_group`. Raises ValueError before creating any group if the arguments do
    not fit together.
    """
    layout.check_placement(placement)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call dist.init_process_group first")
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"the process group has {dist.get_world_size()} ranks but the layout says world_size="
            f"{layout.world_size}"
        )
    layout.microep_rank(rank)  # validates the rank
    cache: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    timeout = world_timeout()  # subgroups do not inherit it by themselves (torch: 30 min)

    def group_of(ranks: list[int]) -> dist.ProcessGroup | None:
        # collective over the world (every rank calls new_group with the same ranks, in order)
        key = tuple(ranks)
        if key not in cache:
            cache[key] = dist.new_group(list(key), timeout=timeout)
        return cache[key] if rank in key else None

    # the same groups in the same order on every rank: DP, MicroEP groups, replica groups (plain EP
    # needs no group of its own: with merge factor 1 the MicroEP group is the EP group)
    dp = group_of(layout.dp_ranks())
    microep = [group_of(r) for r in layout.microep_group_ranks()]
    replicas = []
    for expert, _ in placement.replica_groups():  # collective order: (slot, expert)
        ranks = layout.replica_ranks(placement, expert)
        slot = int(placement.expert_slot[expert])
        replicas.append(ReplicaGroup(expert, slot, tuple(ranks), group_of(ranks)))
    return ProcessGroups(
        layout=layout,
        placement=placement,
        rank=rank,
        dp=dp,
        microep=next(g for g in microep if g is not None),
        replicas=tuple(replicas),
    )
