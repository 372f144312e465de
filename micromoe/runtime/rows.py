"""Row maps: where each of one rank's rows goes in one dispatch, as small host-side tables.

Pure NumPy (no torch). A rank's share of the route (`RankRoute`: which pieces of rows it sends to
whom and receives from whom) becomes a `RowMap`: the splits of the all-to-all and the per-piece
tables that place rows in the send buffer and in the grouped buffer.

Legend: G ranks of the dispatch group, E experts, S local slots, N rows, P pieces (a piece is one
route entry's rows: consecutive in the buffer it leaves and in the buffer it lands in).

A rank needs only its share of the group's route (`RankRoute`): the entries it sends, ordered by
expert and, inside one expert, in the order it cuts its contiguous block of that expert's rows; and
the entries it receives, ordered by (source, expert). Every rank derives its share from the same
gathered counts (`Plan.routes_from` / `Plan.routes_to` for MicroEP), so no row map is communicated.

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

from micromoe.plan import IntArray, Placement, Plan
from micromoe.plan.jit import njit


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
class RowMap:
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


def plain_ep_route(counts_GE: IntArray, placement: Placement, rank: int) -> RankRoute:
    """Plain EP: all rows of expert e go to its single host (no planner needed)."""
    if np.any(placement.replica_counts != 1):
        raise ValueError("plain EP needs exactly one replica per expert in the group")
    host = placement.host_gpu[placement.host_ptr[:-1]]
    (sent_e,) = np.nonzero(counts_GE[rank])
    sent = np.stack([sent_e, host[sent_e], counts_GE[rank, sent_e]]).astype(np.int64)
    mine = np.sort(placement.experts_on(rank))
    src, k = np.nonzero(counts_GE[:, mine])  # by source, then expert ascending
    received = np.stack([src, mine[k], counts_GE[src, mine[k]]]).astype(np.int64)
    return RankRoute(sent, received)


def planned_route(plan: Plan, rank: int) -> RankRoute:
    """MicroEP: this rank's share of the plan's route."""
    return RankRoute(plan.routes_from(rank), plan.routes_to(rank))


def rank_row_map(
    route: RankRoute, num_gpus: int, slot_expert: IntArray, num_experts: int, align: int
) -> RowMap:
    """The row map of one rank (send side and receive side).

    Args:
        route: this rank's share of the group's route.
        num_gpus: G, the group size.
        slot_expert: int64 [S]; expert in each local slot of this rank (-1 = empty).
        num_experts: E.
        align: pad each slot's row block to a multiple of this (>= 1).
    """
    send_start, send_count, inv_start, inv_count, send_splits = _send_side(route.sent, num_gpus)
    recv_splits, group_start, group_count, slot_load, slot_rows = _recv_side(
        route.received, num_gpus, slot_expert, num_experts, align
    )
    return RowMap(
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


def local_row_map(counts_E: IntArray, align: int) -> RowMap:
    """The row map of a single device holding expert e in slot e (no communication).

    Args:
        counts_E: int64 [E]; rows per expert (the sorted buffer's blocks).
        align: pad each slot's row block to a multiple of this (>= 1).
    """
    counts_E = np.asarray(counts_E, dtype=np.int64)
    slot_rows = -(-counts_E // align) * align
    total = (int(counts_E.sum()),)
    return RowMap(
        send_start=None,
        send_count=None,
        inv_start=None,
        inv_count=None,
        send_splits=total,
        recv_splits=total,
        group_start=_exclusive_cumsum(slot_rows),
        group_count=counts_E,
        slot_load=counts_E,
        slot_rows=slot_rows,
    )


def _send_side(sent: IntArray, num_gpus: int):
    send_start, send_count, inv_start, send_splits, identity = _send_kernel(sent, num_gpus)
    if identity:
        return None, None, None, None, send_splits
    return send_start, send_count, inv_start, sent[2], send_splits


def _recv_side(received: IntArray, num_gpus: int, slot_expert: IntArray, num_experts: int, align: int):
    slot_of = np.full(num_experts, -1, dtype=np.int64)
    held = slot_expert >= 0
    slot_of[slot_expert[held]] = np.flatnonzero(held)
    recv_splits, group_start, slot_load, slot_rows, ok = _recv_kernel(
        received, num_gpus, slot_of, slot_expert.size, align
    )
    assert ok, "route sends an expert to a rank that holds no replica of it"
    return recv_splits, group_start, received[2], slot_load, slot_rows


# The two maps run once per layer and micro-batch on the critical path between the count
# exchange and the all-to-all: compiled, they are single passes instead of a dozen NumPy calls.


@njit
def _send_kernel(sent, num_gpus):
    """Pieces in sorted order (by expert) -> send order (by destination, stable)."""
    dst, cnt = sent[1], sent[2]
    n = dst.size
    send_splits = np.zeros(num_gpus, dtype=np.int64)
    pieces = np.zeros(num_gpus + 1, dtype=np.int64)
    identity = True
    for i in range(n):
        send_splits[dst[i]] += cnt[i]
        pieces[dst[i] + 1] += 1
        if i > 0 and dst[i] < dst[i - 1]:
            identity = False
    send_start = np.empty(n, dtype=np.int64)
    send_count = np.empty(n, dtype=np.int64)
    inv_start = np.empty(n, dtype=np.int64)
    if identity:
        return send_start, send_count, inv_start, send_splits, True
    row_at = np.zeros(num_gpus, dtype=np.int64)  # next send row of each destination's block
    for g in range(num_gpus):
        pieces[g + 1] += pieces[g]
        if g > 0:
            row_at[g] = row_at[g - 1] + send_splits[g - 1]
    sorted_row = 0
    for i in range(n):
        j = pieces[dst[i]]
        pieces[dst[i]] += 1
        send_start[j] = sorted_row
        send_count[j] = cnt[i]
        inv_start[i] = row_at[dst[i]]
        row_at[dst[i]] += cnt[i]
        sorted_row += cnt[i]
    return send_start, send_count, inv_start, send_splits, False


@njit
def _recv_kernel(received, num_gpus, slot_of, num_slots, align):
    """Received pieces (by source) -> their rows in the slot-major, padded grouped buffer."""
    src, exp, cnt = received[0], received[1], received[2]
    recv_splits = np.zeros(num_gpus, dtype=np.int64)
    slot_load = np.zeros(num_slots, dtype=np.int64)
    for i in range(src.size):
        if slot_of[exp[i]] < 0:
            return recv_splits, src, slot_load, slot_load, False
        recv_splits[src[i]] += cnt[i]
        slot_load[slot_of[exp[i]]] += cnt[i]
    slot_rows = np.empty(num_slots, dtype=np.int64)
    row_at = np.empty(num_slots, dtype=np.int64)  # next grouped row of each slot's block
    at = 0
    for j in range(num_slots):
        slot_rows[j] = -(-slot_load[j] // align) * align
        row_at[j] = at
        at += slot_rows[j]
    group_start = np.empty(src.size, dtype=np.int64)
    for i in range(src.size):
        j = slot_of[exp[i]]
        group_start[i] = row_at[j]
        row_at[j] += cnt[i]
    return recv_splits, group_start, slot_load, slot_rows, True


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
