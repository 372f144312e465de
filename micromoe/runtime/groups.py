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
class ProcessGroups:
    """All groups one rank needs, and the placement of one MoE layer.

    The groups depend on the layout only, so every MoE layer (and every later placement) shares
    them; `dataclasses.replace(groups, placement=new)` describes a re-placed layer.

    Attributes:
        layout: the validated parallel layout (world size, DP, EP, merge factor).
        placement: which expert sits in which local slot of each GPU of one MicroEP group (the
            same in every MicroEP group).
        rank: this process's global rank.
        dp: the group for dense-parameter gradients (all ranks).
        microep: this rank's MicroEP group (d*EP ranks); the token all-to-alls run here.
        gather: the same ranks as `microep`, a second group for expert weights and their
            gradients (so a prefetched gather can run beside the token all-to-alls).
        expert_dp: the ranks at this rank's position in every MicroEP group: the owners of the
            same experts, whose master gradients are summed (None when there is one MicroEP group).
    """

    layout: ParallelLayout
    placement: Placement
    rank: int
    dp: dist.ProcessGroup
    microep: dist.ProcessGroup
    gather: dist.ProcessGroup
    expert_dp: dist.ProcessGroup | None

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
    not fit together. The groups do not depend on the placement: build them once and reuse them
    for every layer (`dataclasses.replace(groups, placement=...)`).
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
    timeout = world_timeout()  # subgroups do not inherit it by themselves (torch: 30 min)

    def mine(rank_lists: list[list[int]]) -> dist.ProcessGroup | None:
        # collective over the world: every rank creates every group, in the same order
        groups = [dist.new_group(r, timeout=timeout) for r in rank_lists]
        return next((g for g, r in zip(groups, rank_lists, strict=True) if rank in r), None)

    # the same groups in the same order on every rank: DP, MicroEP, gather, expert-DP (plain EP
    # needs no group of its own: with merge factor 1 the MicroEP group is the EP group)
    dp = mine([layout.dp_ranks()])
    microep = mine(layout.microep_group_ranks())
    gather = mine(layout.microep_group_ranks())
    size, num = layout.microep_size, layout.num_microep_groups
    expert_dp = mine([[m * size + q for m in range(num)] for q in range(size)]) if num > 1 else None
    assert dp is not None and microep is not None and gather is not None
    return ProcessGroups(layout, placement, rank, dp, microep, gather, expert_dp)
