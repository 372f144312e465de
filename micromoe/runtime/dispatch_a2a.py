"""The two distributed dispatchers: plain EP and MicroEP (see `dispatch.py` for the pipeline)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement, Plan, schedule
from micromoe.runtime.comm import all_to_all_rows
from micromoe.runtime.dispatch import LocalDispatcher
from micromoe.runtime.routing import RankRoute, planned_route


class EPDispatcher(LocalDispatcher):
    """Plain expert parallelism over `group` (Megatron-Core's alltoall dispatcher).

    Each expert has exactly one host in the group; rows are permuted by expert (which already is
    destination order), counts are exchanged, rows go through one all-to-all there and back.

    Args:
        group: the EP process group (G ranks).
        rank: this rank's index in `group`.
        placement: G GPUs, one replica per expert (e.g. `Placement.expert_parallel(G, E)`).
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, placement: Placement) -> None:
        super().__init__(placement.num_experts)
        _check_group(group, rank, placement)
        if np.any(placement.replica_counts != 1):
            raise ValueError(
                "the 'ep' dispatcher needs exactly one replica per expert in its group; use 'microep' "
                "for replicated placements"
            )
        self.placement = placement
        self.rank = rank
        self.group = group

    def _all_to_all(self, x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...]) -> torch.Tensor:
        return all_to_all_rows(x, send, recv, self.group)  # collective inside (dispatch group)


class MicroEPDispatcher(EPDispatcher):
    """MicroEP: rows of each expert split over its replicas in the group by the optimal plan.

    Every rank computes the same plan from the same gathered counts (the planner is
    deterministic), so no plan is ever broadcast. Local rows stay local first.

    Args:
        group: the MicroEP process group (G = d*EP ranks).
        rank: this rank's index in `group`.
        placement: the replica layout over the group's G GPUs.
        gpus_per_node: GPUs per node, for the planner's same-node preference (optional).
    """

    def __init__(
        self, group: dist.ProcessGroup, rank: int, placement: Placement, *, gpus_per_node: int | None = None
    ) -> None:
        LocalDispatcher.__init__(self, placement.num_experts)
        _check_group(group, rank, placement)
        self.placement = placement
        self.rank = rank
        self.group = group
        self.gpus_per_node = gpus_per_node

    def _route(self, counts_ge: npt.NDArray[np.int64]) -> tuple[RankRoute, Plan | None]:
        plan = schedule(counts_ge, self.placement, gpus_per_node=self.gpus_per_node)
        return planned_route(plan, self.rank), plan


def _check_group(group: dist.ProcessGroup, rank: int, placement: Placement) -> None:
    size = dist.get_world_size(group)
    if placement.num_gpus != size:
        raise ValueError(
            f"placement is for {placement.num_gpus} GPUs but the dispatch group has {size} ranks"
        )
    if not 0 <= rank < size or dist.get_rank(group) != rank:
        raise ValueError(
            f"rank {rank} is not this process's rank {dist.get_rank(group)} in the dispatch group"
        )
