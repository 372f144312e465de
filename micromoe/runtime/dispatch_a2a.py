"""The all-to-all dispatcher base: what every distributed dispatcher shares (abstract).

Per layer and micro-batch, on every rank of the dispatch group:

  count vector (+ error bits) -> [collective] all-gather counts  |  GPU: sort rows by expert
  host sync (counts only) -> `_route` on the CPU (subclass: plain EP or the planner) while the GPU
  permutes -> row map -> reorder rows by destination -> [collective] all-to-all -> slot-major,
  padded, grouped rows.

`combine` runs the same steps backwards. Subclasses implement only `_route`: which rows of this
rank go to which rank, and which it receives, from the gathered counts (identical on every rank,
so no route is ever communicated). Error bits ride the count all-gather, so a bad input on any
rank makes every rank raise the same ValueError before the all-to-all.

Legend: T tokens on this rank, K top-k, H hidden, E experts, S local slots, G ranks of the dispatch
group, V = E + 2 count-vector entries, N rows.
"""

from __future__ import annotations

import abc
import time

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement, Plan
from micromoe.runtime.comm import all_gather_counts, all_to_all_rows
from micromoe.runtime.dispatch_checks import caller_error_vector, count_vector, raise_if_flagged
from micromoe.runtime.dispatch_local import (
    DispatchMeta,
    LocalDispatcher,
    PhaseTimer,
    grouped_gemm_align,
    row_indices_on,
    sort_by_expert,
    weighted_sum_of_choices,
)
from micromoe.runtime.idle import HostWaitProbe
from micromoe.runtime.permute import gather_rows, permute_rows, scatter_rows
from micromoe.runtime.rows import RankRoute, rank_row_map


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
        super().__init__(placement.num_experts, timer=timer)
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

    def dispatch(
        self, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """Send each (token, choice) row to a replica of its expert (see `LocalDispatcher.dispatch`).

        Raises ValueError on every rank of the group if any rank's input is invalid.
        """
        self.check_inputs(x, expert, weight)
        e = self.num_experts
        self.mark("start")
        pending = all_gather_counts(count_vector(expert, weight, e), self.group)  # collective inside
        self.mark("count_exchange")
        tk_of_row, row_of_tk, x_sorted = sort_by_expert(x, expert)  # overlaps the host wait
        self.mark("permute")
        idle = HostWaitProbe(x.device)
        counts_GV = pending.wait()  # host sync (counts only; the permutation keeps the GPU busy)
        raise_if_flagged(counts_GV, e, self.rank, None)
        counts_GE = counts_GV[:, :e]
        t0 = time.perf_counter()
        route, plan = self._route(counts_GE)
        row_map = rank_row_map(route, counts_GE.shape[0], self.slot_expert, e, grouped_gemm_align(x))
        route_s = time.perf_counter() - t0
        idle.stop()  # the next line queues GPU work again
        send_pos, send_inv, group_pos, rows = row_indices_on(row_map, x.device)
        x_send = x_sorted if send_pos is None else permute_rows(x_sorted, send_pos, send_inv)
        self.mark("route")
        # collective inside (dispatch group): rows to their replicas
        x_recv = all_to_all_rows(x_send, row_map.send_splits, row_map.recv_splits, self.group)
        self.mark("dispatch_a2a")
        tokens = scatter_rows(x_recv, group_pos, row_map.num_grouped)
        self.mark("slot_sort")
        meta = DispatchMeta(
            tk_of_row,
            row_of_tk,
            weight,
            row_map,
            send_pos,
            send_inv,
            group_pos,
            counts_GE,
            plan,
            route_s,
            idle,
        )
        return tokens, rows, meta

    def combine(self, out: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """[N, H] expert outputs (dispatch's row order) -> [T, H]: sum_k gate_k * expert_k(x)."""
        rm = meta.row_map
        out_recv = gather_rows(out, meta.group_pos)
        # collective inside (dispatch group): outputs back to the rows' sources
        out_send = all_to_all_rows(out_recv, rm.recv_splits, rm.send_splits, self.group)
        if meta.send_pos is None:
            out_sorted = out_send
        else:
            out_sorted = permute_rows(out_send, meta.send_inv, meta.send_pos)
        y = weighted_sum_of_choices(out_sorted, meta)
        self.mark("combine")
        return y

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
