"""MicroEP: each expert's rows split over its replicas in the dispatch group by the optimal plan.

Every rank computes the same plan from the same gathered counts (the planner is deterministic),
so no plan is ever broadcast; local rows stay local first. Legend: G ranks of the dispatch group
(G = d*EP), E experts.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch.distributed as dist

from micromoe.plan import Placement, Plan, positive_int, schedule
from micromoe.runtime.cost_select import CostSpec, load_cost_spec
from micromoe.runtime.dispatch_a2a import AllToAllDispatcher
from micromoe.runtime.dispatch_local import PhaseTimer
from micromoe.runtime.rows import RankRoute, planned_route


class MicroEPDispatcher(AllToAllDispatcher):
    """MicroEP over `group`: the planner splits each expert's rows over its replicas.

    Args:
        group: the MicroEP process group (G = d*EP ranks).
        rank: this rank's index in `group`.
        placement: which expert sits in which local slot of each of the group's G GPUs.
        gpus_per_node: GPUs per node, for the planner's same-node preference (optional; must
            divide G).
        timer: optional phase timer (benchmarks).
        cost_model: plan for predicted GPU time with this expert-GEMM cost model (a
            `plan.cost.CostModel`, a bundled name or a JSON path; `apply_expert_parallel` also
            takes "bundled" and "auto"); None plans tokens.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        placement: Placement,
        *,
        gpus_per_node: int | None = None,
        timer: PhaseTimer | None = None,
        cost_model: CostSpec = None,
    ) -> None:
        super().__init__(group, rank, placement, timer=timer)
        self.cost_model = load_cost_spec(cost_model)
        if gpus_per_node is not None:
            gpus_per_node = positive_int(gpus_per_node, "gpus_per_node")
            if placement.num_gpus % gpus_per_node:
                raise ValueError(
                    f"gpus_per_node={gpus_per_node} does not divide the dispatch group's "
                    f"{placement.num_gpus} GPUs; pass a divisor of {placement.num_gpus} or None"
                )
        self.gpus_per_node = gpus_per_node

    def _route(self, counts_GE: npt.NDArray[np.int64]) -> tuple[RankRoute, Plan | None]:
        plan = schedule(counts_GE, self.placement, gpus_per_node=self.gpus_per_node, cost=self.cost_model)
        return planned_route(plan, self.rank), plan
