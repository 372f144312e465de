"""Plain expert parallelism (Megatron-Core's alltoall dispatcher): one replica per expert.

Each expert has exactly one host in the dispatch group, so the expert-sorted rows already are in
destination order and no planner runs. Legend: G ranks of the dispatch group, E experts.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch.distributed as dist

from micromoe.plan import Placement, Plan
from micromoe.runtime.dispatch_a2a import AllToAllDispatcher
from micromoe.runtime.dispatch_local import PhaseTimer
from micromoe.runtime.rows import RankRoute, plain_ep_route


class EPDispatcher(AllToAllDispatcher):
    """Plain EP over `group`: all rows of expert e go to its single host.

    Args:
        group: the EP process group (G ranks).
        rank: this rank's index in `group`.
        placement: G GPUs, one replica per expert (e.g. `Placement.expert_parallel(G, E)`).
        timer: optional phase timer (benchmarks).
    """

    def __init__(
        self, group: dist.ProcessGroup, rank: int, placement: Placement, *, timer: PhaseTimer | None = None
    ) -> None:
        super().__init__(group, rank, placement, timer=timer)
        if np.any(placement.replica_counts != 1):
            raise ValueError(
                "the 'ep' dispatcher needs exactly one replica per expert in its group; use 'microep' "
                "for replicated placements"
            )

    def _route(self, counts_GE: npt.NDArray[np.int64]) -> tuple[RankRoute, Plan | None]:
        return plain_ep_route(counts_GE, self.placement, self.rank), None
