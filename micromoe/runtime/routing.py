"""Host-side row layout of one dispatch: who sends which rows where, and where received rows go.

Pure NumPy (no torch). Legend: G GPUs of the dispatch group, E experts, S local slots, N rows.
A rank needs only its share of the group's route (`RankRoute`): the entries it sends, ordered by
expert and, inside one expert, in the order it cuts its contiguous block of that expert's rows; and
the entries it receives, ordered by (source, expert). Every rank derives its share from the same
gathered counts (`Plan.routes_from` / `Plan.routes_to` for MicroEP), so no layout is communicated.

Row orders (all on one rank):
- *sorted*: this rank's (token, choice) rows sorted by expert (stable): one block per expert.
- *send*: rows grouped by destination rank (the all-to-all's input), inside one destination by
  expert then cut order.
- *recv*: the all-to-all's output: grouped by source rank, inside one source by expert.
- *grouped*: slot-major (the grouped GEMM's input), each slot's block padded to a multiple of
  `align` rows (the CUDA grouped GEMM needs 16-byte-aligned groups: 8 bf16 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from micromoe.plan import Placement, Plan

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RankRoute:
    """One rank's share of the route.

    Attributes:
        sent: int64 [3, P_send]; (expert, dst, count) of every piece this rank sends, by expert
            then cut order (the pieces tile its expert-sorted rows).
        received: int64 [3, P_recv]; (src, expert, count) of every piece it receives, by
            (src, expert): the order each source sends them in.
    """

    sent: IntArray
    received: IntArray


@dataclass(frozen=True)
class RowLayout:
    """Where this rank's rows go, as small per-piece tables (a piece = one route entry's rows).

    Attributes:
        send_start, send_count: int64 [P_send]; the pieces this rank sends, in send order: each
            is `send_count[i]` consecutive rows of the sorted buffer from `send_start[i]`. None
            when the sorted order already is the send order (plain EP).
        inv_start, inv_count: the same pieces in sorted order, with their start in the send
            buffer (the inverse map); None with send_start.
        send_splits: rows sent to each rank of the group, [G].
        recv_splits: rows received from each rank of the group, [G].
        group_start, group_count: int64 [P_recv]; the received pieces in receive order: piece i
            lands at grouped rows `group_start[i] .. + group_count[i]`.
        slot_load: int64 [S]; real rows per local slot (the planned per-slot load).
        slot_rows: int64 [S]; rows per local slot after padding to `align`.
    """

    send_start: IntArray | None
    send_count: IntArray | None
    inv_start: IntArray | None
    inv_count: IntArray | None
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    group_start: IntArray
    group_count: IntArray
    slot_load: IntArray
    slot_rows: IntArray

    @property
    def num_grouped(self) -> int:
        return int(self.slot_rows.sum())

    @property
    def send_pos(self) -> IntArray | None:
        """int64 [N_send]: row of the sorted buffer for each send row (None = identity)."""
        if self.send_start is None:
            return None
        return expand_ranges(self.send_start, self.send_count)

    @property
    def group_pos(self) -> IntArray:
        """int64 [N_recv]: grouped row of each received row."""
        return expand_ranges(self.group_start, self.group_count)


def plain_ep_route(counts_ge: IntArray, placement: Placement, rank: int) -> RankRoute:
    """Plain EP: all rows of expert e go to its single host (no planner needed)."""
    if np.any(placement.replica_counts != 1):
        raise ValueError("plain EP needs exactly one replica per expert in the group")
    host = placement.host_gpu[placement.host_ptr[:-1]]
    (sent_e,) = np.nonzero(counts_ge[rank])
    sent = np.stack([sent_e, host[sent_e], counts_ge[rank, sent_e]]).astype(np.int64)
    mine = np.sort(placement.experts_on(rank))
    src, k = np.nonzero(counts_ge[:, mine])  # by source, then expert ascending
    received = np.stack([src, mine[k], counts_ge[src, mine[k]]]).astype(np.int64)
    return RankRoute(sent, received)


def planned_route(plan: Plan, rank: int) -> RankRoute:
    """MicroEP: this rank's share of the plan's route."""
    return RankRoute(plan.routes_from(rank), plan.routes_to(rank))


def row_layout(
    route: RankRoute, num_gpus: int, slot_expert: IntArray, num_experts: int, align: int
) -> RowLayout:
    """Send and receive layout of one rank.

    Args:
        route: this rank's share of the group's route.
        num_gpus: G, the group size.
        slot_expert: int64 [S]; expert in each local slot of this rank (-1 = empty).
        num_experts: E.
        align: pad each slot's row block to a multiple of this (>= 1).
    """
    send_start, send_count, inv_start, inv_count, send_splits = _send_layout(route.sent, num_gpus)
    recv_splits, group_start, group_count, slot_load, slot_rows = _recv_layout(
        route.received, num_gpus, slot_expert, num_experts, align
    )
    return RowLayout(
        send_start=send_start,
        send_count=send_count,
        inv_start=inv_start,
        inv_count=inv_count,
        send_splits=tuple(send_splits.tolist()),
        recv_splits=tuple(recv_splits.tolist()),
        group_start=group_start,
        group_count=group_count,
        slot_load=slot_load,
        slot_rows=slot_rows,
    )


def _send_layout(sent: IntArray, num_gpus: int):
    dst, cnt = sent[1], sent[2]
    send_splits = np.bincount(dst, weights=cnt, minlength=num_gpus).astype(np.int64)
    if np.all(dst[1:] >= dst[:-1]):
        return None, None, None, None, send_splits
    start = _exclusive_cumsum(cnt)  # pieces tile the sorted buffer in COO order
    order = np.argsort(dst, kind="stable")
    send_start, send_count = start[order], cnt[order]
    inv_start = np.empty_like(cnt)
    inv_start[order] = _exclusive_cumsum(send_count)
    return send_start, send_count, inv_start, cnt, send_splits


def _recv_layout(received: IntArray, num_gpus: int, slot_expert: IntArray, num_experts: int, align: int):
    num_slots = slot_expert.size
    slot_of = np.full(num_experts, -1, dtype=np.int64)
    held = slot_expert >= 0
    slot_of[slot_expert[held]] = np.flatnonzero(held)
    src, exp, cnt = received
    recv_splits = np.bincount(src, weights=cnt, minlength=num_gpus).astype(np.int64)
    slot = slot_of[exp]
    assert np.all(slot >= 0), "route sends an expert to a rank that holds no replica of it"
    slot_load = np.bincount(slot, weights=cnt, minlength=num_slots).astype(np.int64)
    slot_rows = -(-slot_load // align) * align
    by_slot = np.argsort(slot, kind="stable")
    cnt2, slot2 = cnt[by_slot], slot[by_slot]
    offset_in_slot = _exclusive_cumsum(cnt2) - _exclusive_cumsum(slot_load)[slot2]
    grouped_start = np.empty_like(cnt)
    grouped_start[by_slot] = _exclusive_cumsum(slot_rows)[slot2] + offset_in_slot
    return recv_splits, grouped_start, cnt, slot_load, slot_rows


def _exclusive_cumsum(a: IntArray) -> IntArray:
    out = np.zeros(a.size, dtype=np.int64)
    if a.size > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


def expand_ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """concat(arange(s, s + n) for s, n in zip(starts, lengths)), vectorized."""
    total = int(lengths.sum())
    return np.repeat(range_shift(starts, lengths), lengths) + np.arange(total, dtype=np.int64)


def range_shift(starts: IntArray, lengths: IntArray) -> IntArray:
    """The per-piece shift d with expand_ranges = repeat(d, lengths) + arange(total)."""
    return starts - _exclusive_cumsum(lengths)
