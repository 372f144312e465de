"""The all-to-all dispatcher base: what every distributed dispatcher shares (abstract).

Per layer and micro-batch, on every rank of the dispatch group:

  count vector (+ error bits) -> [collective] all-gather counts  |  GPU: sort rows by expert
  host sync (counts only) -> `_route` on the CPU (subclass: plain EP or the planner) while the GPU
  permutes -> row map -> reorder rows by destination -> [collective] all-to-all -> slot-major,
  padded, grouped rows.

The pipeline itself is `LocalDispatcher`'s reference path; this class fills in its four
distributed steps (the count all-gather, the row map from the route, the all-to-all out and back)
and never takes the single-device fast path. `combine` runs the same steps backwards. Subclasses
implement only `_route`: which rows of this rank go to which rank, and which it receives, from
the gathered counts (identical on every rank, so no route is ever communicated). Error bits ride the count all-gather, so a bad input on any
rank makes every rank raise the same ValueError before the all-to-all.

Legend: T tokens on this rank, K top-k, H hidden, E experts, S local slots, G ranks of the dispatch
group, V = E + 2 count-vector entries, N rows.
"""

from __future__ import annotations

import abc

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement, Plan
from micromoe.runtime.comm import PendingCounts, all_gather_counts, all_to_all_rows
from micromoe.runtime.dispatch_checks import caller_error_vector, raise_if_flagged
from micromoe.runtime.dispatch_local import LocalDispatcher, PhaseTimer
from micromoe.runtime.rows import RankRoute, RowMap, rank_row_map


class AllToAllDispatcher(LocalDispatcher, abc.ABC):
    """Rows move over `group` with one uneven all-to-all each way; subclasses choose the route.

    Args:
        group: the dispatch process group (G ranks).
        rank: this rank's index in `group` (the planner's GPU index).
        placement: which expert sits in which local slot of each of the group's G GPUs.
        timer: optional phase timer (benchmarks).
    """

    def __init__(
        self, group: dist.ProcessGroup, rank: int, placement: Placement, *, timer: PhaseTimer | None = None
    ) -> None:
        if not isinstance(placement, Placement):
            raise ValueError(f"placement must be a micromoe.plan.Placement, got {type(placement).__name__}")
        super().__init__(placement.num_experts, timer=timer, fast_path=False)  # one device only
        _check_group(group, rank, placement)
        self.group = group
        self.rank = rank
        self.placement = placement

    @property
    def slot_expert(self) -> npt.NDArray[np.int64]:
        """int64 [S]: expert in each local slot of this rank (-1 = empty)."""
        return self.placement.slot_expert[self.rank]

    @abc.abstractmethod
    def _route(self, counts_GE: npt.NDArray[np.int64]) -> tuple[RankRoute, Plan | None]:
        """This rank's share of the route for the gathered counts [G, E], and the plan if any."""

    def _exchange_counts(self, vec_V: torch.Tensor) -> PendingCounts:
        """All-gather every rank's count vector [V] (with its error bits) over the group."""
        pending = all_gather_counts(vec_V, self.group)  # collective inside: the count all-gather
        self.mark("count_exchange")
        return pending

    def _row_map(self, counts_GE: npt.NDArray[np.int64], align: int) -> tuple[RowMap, Plan | None]:
        """This rank's row map for the gathered counts [G, E] (from `_route`), and the plan."""
        route, plan = self._route(counts_GE)
        return rank_row_map(route, counts_GE.shape[0], self.slot_expert, self.num_experts, align), plan

    def _send_rows(self, x_send: torch.Tensor, row_map: RowMap) -> torch.Tensor:
        """Rows in send order -> the rows this rank's slots receive (by source rank)."""
        # collective inside (dispatch group): rows to their replicas
        x_recv = all_to_all_rows(x_send, row_map.send_splits, row_map.recv_splits, self.group)
        self.mark("dispatch_a2a")
        return x_recv

    def _return_rows(self, out_recv: torch.Tensor, row_map: RowMap) -> torch.Tensor:
        """Outputs of the received rows -> outputs of this rank's rows, in send order."""
        # collective inside (dispatch group): outputs back to the rows' sources
        return all_to_all_rows(out_recv, row_map.recv_splits, row_map.send_splits, self.group)

    def fail(self, message: str, device: torch.device) -> None:
        """Join the count all-gather with an error flag so every rank raises, then raise."""
        pending = all_gather_counts(caller_error_vector(self.num_experts, device), self.group)
        counts_GV = pending.wait()  # collective above; host sync here
        raise_if_flagged(counts_GV, self.num_experts, self.rank, message)
        raise AssertionError("unreachable: the local flag is set")


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
