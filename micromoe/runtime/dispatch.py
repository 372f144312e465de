"""Token dispatchers: plain objects with `dispatch(...) -> (tokens, rows, meta)` and `combine`.

Legend: T tokens on this rank, K top-k, H hidden, E experts, S local slots, G ranks of the dispatch
group, N rows. The hierarchy follows capability:
- `LocalDispatcher`: every expert on this device, no communication (the reference);
- `EPDispatcher` (`dispatch_a2a.py`): plain expert parallelism, Megatron-Core's alltoall style;
- `MicroEPDispatcher` (`dispatch_a2a.py`): tokens scheduled over expert replicas by the planner.
All share one pipeline; subclasses change only the group, the route and the all-to-all:

  count + flag -> [collective] all-gather counts  |  GPU: sort rows by expert, gather tokens
  host sync (counts only) -> route on the CPU (the planner for MicroEP) while the GPU permutes
  -> reorder rows by destination -> [collective] all-to-all -> slot-major, padded, grouped rows.

`combine` runs the same steps backwards and sums each token's top-k outputs weighted by its
gates. Everything is differentiable (index ops and an autograd-aware all-to-all). Dispatchers hold
configuration only: all per-call state travels in the frozen `DispatchMeta`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement, Plan
from micromoe.runtime.comm import start_count_exchange
from micromoe.runtime.permute import (
    gather_rows,
    gather_tokens,
    permute_rows,
    scatter_rows,
)
from micromoe.runtime.routing import RankRoute, RowLayout, plain_ep_route, range_shift, row_layout

ERR_NONFINITE, ERR_CALLER, ERR_EXPERT_ID = 1, 2, 4
_REASONS = {
    ERR_CALLER: "bad input shape or value (see that rank's message)",
    ERR_EXPERT_ID: "expert index out of range",
    ERR_NONFINITE: "non-finite gate weights (NaN/inf router logits or inputs)",
}


class PhaseTimer(Protocol):
    """Optional hook (benchmarks): `mark(name)` closes the phase that ends here."""

    def mark(self, name: str) -> None: ...


@dataclass(frozen=True)
class DispatchMeta:
    """Everything `combine` needs from one `dispatch` (device index tensors and host layout).

    Attributes:
        sorted_idx: int64 [T*K]; flat (token, choice) t*K+k of each row in expert-sorted order.
        row_of_tk: int64 [T*K]; its inverse: the sorted row of each flat (token, choice).
        weight: [T, K] gate weights (carry the router's gradient).
        layout: host-side row layout (splits, per-slot loads).
        send_pos: int64 [N_send] on device (sorted row of each send row), or None when sorted
            order is the send order; send_inv is its inverse.
        group_pos: int64 [N_recv] on device; received row -> grouped row.
        counts_ge: int64 [G, E]; the gathered counts (counts[src, e]).
        plan: the planner's plan (MicroEP) or None.
        route_s: host seconds spent routing (planner + row layout) for this call.
    """

    sorted_idx: torch.Tensor
    row_of_tk: torch.Tensor
    weight: torch.Tensor
    layout: RowLayout
    send_pos: torch.Tensor | None
    send_inv: torch.Tensor | None
    group_pos: torch.Tensor
    counts_ge: npt.NDArray[np.int64]
    plan: Plan | None
    route_s: float


class LocalDispatcher:
    """All E experts live in this device's E local slots; no communication.

    Args:
        num_experts: E.
    """

    def __init__(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.placement = Placement.expert_parallel(1, num_experts, 1)
        self.rank = 0
        self.group: dist.ProcessGroup | None = None
        self.timer: PhaseTimer | None = None

    # ----------------------------------------------------------------------------------------
    # the hooks subclasses change
    @property
    def slot_expert(self) -> npt.NDArray[np.int64]:
        """int64 [S]: expert in each local slot of this rank (-1 = empty)."""
        return self.placement.slot_expert[self.rank]

    def _route(self, counts_ge: npt.NDArray[np.int64]) -> tuple[RankRoute, Plan | None]:
        return plain_ep_route(counts_ge, self.placement, self.rank), None

    def _all_to_all(self, x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...]) -> torch.Tensor:
        return x

    # ----------------------------------------------------------------------------------------
    def dispatch(
        self, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """Send each (token, choice) row to a replica of its expert.

        Args:
            x: [T, H] tokens.
            expert: int64 [T, K] chosen experts (distinct per token).
            weight: [T, K] gate weights (differentiable).

        Returns:
            tokens: [N, H] rows for this rank's local slots, slot-major, each slot's block padded
                to the grouped GEMM's alignment with zero rows.
            rows: int64 [S] on x's device; rows per local slot (padded).
            meta: the record `combine` consumes.
        Raises ValueError on every rank of the group if any rank's input is invalid.
        """
        problem = _check_shapes(x, expert, weight, self.num_experts)
        if problem:
            self.fail(problem, x.device)
        self.mark("start")
        vec = self._count_vector(expert, weight)
        pending = start_count_exchange(vec, self.group)  # collective inside: count all-gather
        self.mark("count_exchange")
        k = expert.shape[1]
        sorted_idx = torch.argsort(expert.reshape(-1), stable=True)
        row_of_tk = torch.argsort(sorted_idx)  # the inverse permutation, one kernel
        token_of_row = torch.div(sorted_idx, k, rounding_mode="floor")
        x_sorted = gather_tokens(x, token_of_row, row_of_tk, k)  # overlaps the host wait
        self.mark("permute")
        counts = pending.wait()  # host sync (counts only; the permutation keeps the GPU busy)
        self._raise_if_flagged(counts, None)
        t0 = time.perf_counter()
        route, plan = self._route(counts[:, : self.num_experts])
        align = 8 if x.is_cuda else 1  # CUDA grouped GEMM: 16-byte-aligned row groups
        layout = row_layout(route, counts.shape[0], self.slot_expert, self.num_experts, align)
        route_s = time.perf_counter() - t0
        send_pos, send_inv, group_pos, rows = _index_to_device(layout, x.device)
        x_send = x_sorted if send_pos is None else permute_rows(x_sorted, send_pos, send_inv)
        self.mark("route")
        recv = self._all_to_all(x_send, layout.send_splits, layout.recv_splits)
        self.mark("dispatch_a2a")
        tokens = scatter_rows(recv, group_pos, layout.num_grouped)
        self.mark("slot_sort")
        meta = DispatchMeta(
            sorted_idx,
            row_of_tk,
            weight,
            layout,
            send_pos,
            send_inv,
            group_pos,
            counts[:, : self.num_experts],
            plan,
            route_s,
        )
        return tokens, rows, meta

    def combine(self, out: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """[N, H] expert outputs (dispatch's row order) -> [T, H]: sum_k gate_k * expert_k(x)."""
        recv_out = gather_rows(out, meta.group_pos)
        lay = meta.layout
        send_out = self._all_to_all(recv_out, lay.recv_splits, lay.send_splits)
        if meta.send_pos is None:
            sorted_out = send_out
        else:
            sorted_out = permute_rows(send_out, meta.send_inv, meta.send_pos)
        t, k = meta.weight.shape
        out_tk = permute_rows(sorted_out, meta.row_of_tk, meta.sorted_idx).view(t, k, out.shape[1])
        y = (out_tk * meta.weight.to(out.dtype).unsqueeze(2)).sum(dim=1)
        self.mark("combine")
        return y

    def fail(self, message: str, device: torch.device) -> None:
        """Join the count exchange with an error flag so every rank raises, then raise."""
        vec = torch.zeros(self.num_experts + 2, dtype=torch.int64, device=device)
        vec[-1] = ERR_CALLER
        counts = start_count_exchange(vec, self.group).wait()  # collective + host sync
        self._raise_if_flagged(counts, message)
        raise AssertionError("unreachable: the local flag is set")

    # ----------------------------------------------------------------------------------------
    def _count_vector(self, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """int64 [E+2] on the device: tokens per expert on this rank; then the number of expert
        ids outside [0, E); then the error bits (ERR_NONFINITE). Few kernels: the host is the
        bottleneck here."""
        e = self.num_experts
        flat = expert.reshape(-1).long()
        idx = torch.where((flat >= 0) & (flat < e), flat, e)
        vec = torch.zeros(e + 2, dtype=torch.int64, device=flat.device)
        # scatter_add, not bincount: CUDA bincount reads the max to the host (a sync)
        vec.scatter_add_(0, idx, torch.ones_like(idx))
        vec[e + 1 :] = torch.isfinite(weight.sum()).logical_not()  # NaN/inf propagate into the sum
        return vec

    def _raise_if_flagged(self, counts: npt.NDArray[np.int64], local_message: str | None) -> None:
        """counts: int64 [G, E+2] as gathered; raise on every rank if any rank flagged an error."""
        e = self.num_experts
        flags = counts[:, e + 1] | np.where(counts[:, e] > 0, ERR_EXPERT_ID, 0)
        if not flags.any():
            return
        parts = []
        for r in np.flatnonzero(flags):
            reasons = [text for bit, text in _REASONS.items() if flags[r] & bit]
            if r == self.rank and local_message:
                reasons = [local_message]
            parts.append(f"rank {r} of the dispatch group: {'; '.join(reasons)}")
        raise ValueError("MoE dispatch refused, no collective was started: " + " | ".join(parts))

    def mark(self, name: str) -> None:
        """Close the phase `name` on the optional timer (benchmarks); no-op otherwise."""
        if self.timer is not None:
            self.timer.mark(name)


def _check_shapes(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, num_experts: int) -> str:
    """'' if the shapes fit, else what is wrong (no device sync)."""
    if x.dim() != 2:
        return f"tokens must be [T, H], got shape {tuple(x.shape)}"
    if expert.dim() != 2 or expert.shape[0] != x.shape[0]:
        return f"expert indices must be [T={x.shape[0]}, K], got shape {tuple(expert.shape)}"
    if weight.shape != expert.shape:
        return f"gate weights {tuple(weight.shape)} must match expert indices {tuple(expert.shape)}"
    if expert.dtype not in (torch.int32, torch.int64):
        return f"expert indices must be int32/int64, got {expert.dtype}"
    if expert.shape[1] > num_experts:
        return f"top-k {expert.shape[1]} exceeds the {num_experts} experts"
    if expert.device != x.device or weight.device != x.device:
        return "tokens, expert indices and gate weights must be on one device"
    return ""


def _index_to_device(layout: RowLayout, device: torch.device):
    """(send_pos, send_inv, group_pos, slot_rows) on `device` from ONE host-to-device copy of the
    small per-piece tables; rows are expanded on the device with sizes known on the host (no
    host sync). The host buffer is pinned on CUDA so the copy is asynchronous.
    """
    lay = layout
    pieces = [(lay.group_start, lay.group_count, sum(lay.recv_splits))]
    if lay.send_start is not None:
        total = sum(lay.send_splits)
        pieces += [(lay.send_start, lay.send_count, total), (lay.inv_start, lay.inv_count, total)]
    parts = [lay.slot_rows]
    for start, count, _ in pieces:
        parts += [range_shift(start, count), count]
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    out, at = [], lay.slot_rows.size
    for start, _, total in pieces:
        p = start.size
        shift, count = dev[at : at + p], dev[at + p : at + 2 * p]
        out.append(
            torch.repeat_interleave(shift, count, output_size=total) + torch.arange(total, device=device)
        )
        at += 2 * p
    group_pos = out[0]
    send_pos, send_inv = (out[1], out[2]) if len(out) == 3 else (None, None)
    return send_pos, send_inv, group_pos, dev[: lay.slot_rows.size]
