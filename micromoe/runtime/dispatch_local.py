"""The reference token dispatcher: every expert on this device, no communication.

Dispatchers are plain objects: `dispatch(x, expert, weight) -> (tokens, rows, meta)` hands the
grouped GEMM its slot-major rows, and `combine(out, meta)` sums each token's top-k expert outputs
weighted by its gates. They hold configuration only: all per-call state travels in the frozen
`DispatchMeta`. Everything is differentiable (gather-only index ops; the distributed dispatchers
add an autograd-aware all-to-all). The hierarchy grows by capability:
- `LocalDispatcher` (here): sort rows by expert, pad each slot's block, no communication; on
  CUDA with Triton it takes the fast path of `dispatch_fast.py` (no host sync, fused kernels);
- `AllToAllDispatcher` (`dispatch_a2a.py`, abstract): adds the count all-gather with error bits,
  the host-side row map and the all-to-all over a dispatch group; subclasses only route:
  - `EPDispatcher` (`dispatch_ep.py`): plain expert parallelism, one replica per expert;
  - `MicroEPDispatcher` (`dispatch_microep.py`): rows scheduled over replicas by the planner.

Legend: T tokens on this rank, K top-k, H hidden, E experts, S local slots, G ranks of the dispatch
group, N rows. Public record fields keep lower-case names (`counts_ge` is [G, E]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from micromoe.plan import Plan, positive_int
from micromoe.runtime.comm import PendingCounts, copy_counts_to_host
from micromoe.runtime.dispatch_checks import ERR_CALLER, check_shapes, count_vector, raise_if_flagged
from micromoe.runtime.dispatch_fast import FAST_ALIGN, FastMeta, fast_combine, fast_dispatch, uses_fast_path
from micromoe.runtime.idle import HostWaitProbe
from micromoe.runtime.permute import gather_rows, gather_tokens, permute_rows, scatter_rows
from micromoe.runtime.rows import RowMap, local_row_map, range_shift


class PhaseTimer(Protocol):
    """Optional hook (benchmarks): `mark(name)` closes the phase that ends here."""

    def mark(self, name: str) -> None: ...


@dataclass(frozen=True)
class DispatchMeta:
    """Everything `combine` needs from one `dispatch` (device index tensors and the host row map).

    Attributes:
        tk_of_row: int64 [T*K]; flat (token, choice) t*K+k of each row in expert-sorted order.
        row_of_tk: int64 [T*K]; its inverse: the sorted row of each flat (token, choice).
        weight: [T, K] gate weights (carry the router's gradient).
        row_map: host-side row map (splits, per-piece tables, per-slot loads).
        send_pos: int64 [N_send] on device (sorted row of each send row), or None when sorted
            order is the send order; send_inv is its inverse.
        group_pos: int64 [N_recv] on device; received row -> grouped row.
        counts_ge: int64 [G, E]; the gathered counts (counts[src, e]); G = 1 for a single device.
        plan: the planner's plan (MicroEP) or None.
        route_s: host seconds spent routing (planner + row map) for this call.
        idle: the probe around this call's host wait for the counts (`gpu_idle_ms`).
    """

    tk_of_row: torch.Tensor
    row_of_tk: torch.Tensor
    weight: torch.Tensor
    row_map: RowMap
    send_pos: torch.Tensor | None
    send_inv: torch.Tensor | None
    group_pos: torch.Tensor
    counts_ge: npt.NDArray[np.int64]
    plan: Plan | None
    route_s: float
    idle: HostWaitProbe | None = None

    @property
    def slot_load(self) -> npt.NDArray[np.int64]:
        """int64 [S]: real rows each local slot computed."""
        return self.row_map.slot_load

    @property
    def gpu_idle_ms(self) -> float:
        """GPU idle time the host wait for the counts caused (reading it waits for the GPU)."""
        return 0.0 if self.idle is None else self.idle.gpu_idle_ms


class LocalDispatcher:
    """All E experts live in this device's E local slots (slot e holds expert e).

    Args:
        num_experts: E.
        timer: optional phase timer (benchmarks); `mark` is called at each phase boundary.
        fast_path: take the fast path where it runs (CUDA with Triton); False keeps the
            reference pipeline everywhere (checks, benchmarks). Both compute the same function.
        fast_align: the fast path's rows per expert group are padded to a multiple of this.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        timer: PhaseTimer | None = None,
        fast_path: bool = True,
        fast_align: int = FAST_ALIGN,
    ) -> None:
        self.num_experts = positive_int(num_experts, "num_experts")
        self.timer = timer
        self.fast_path = bool(fast_path)
        self.fast_align = positive_int(fast_align, "fast_align")
        self.rank = 0  # this device's index in its dispatch group (of one here)

    def dispatch(
        self, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta | FastMeta]:
        """Put each (token, choice) row into a slot of its expert (in subclasses: on a replica's
        rank of the dispatch group).

        Args:
            x: [T, H] tokens.
            expert: int64 [T, K] chosen experts (distinct per token).
            weight: [T, K] gate weights (differentiable).

        Returns:
            tokens: [N, H] rows for the local slots, slot-major, each slot's block padded to the
                grouped GEMM's alignment with zero rows.
            rows: int64 [S] on x's device; rows per local slot (padded).
            meta: the record `combine` consumes.
        Raises ValueError if the input is invalid (bad shapes, expert ids, non-finite gates; in
        subclasses on every rank of the group if any rank's input is). On
        the fast path, bad expert ids and non-finite gates are found on the device and raised
        when the counts are read (`meta.slot_load`, the layer's stats): no host sync here.
        """
        self.check_inputs(x, expert, weight)
        e = self.num_experts
        self.mark("start")
        if self.fast_path and uses_fast_path(x):
            tokens, rows, fast_meta = fast_dispatch(x, expert, weight, e, self.fast_align)
            self.mark("permute")
            return tokens, rows, fast_meta
        pending = self._exchange_counts(count_vector(expert, weight, e))
        tk_of_row, row_of_tk, x_sorted = sort_by_expert(x, expert)  # overlaps the host wait
        self.mark("permute")
        idle = HostWaitProbe(x.device)
        counts_GV = pending.wait()  # host sync (counts only; the permutation keeps the GPU busy)
        raise_if_flagged(counts_GV, e, self.rank, None)
        counts_GE = counts_GV[:, :e]
        t0 = time.perf_counter()
        row_map, plan = self._row_map(counts_GE, grouped_gemm_align(x))
        route_s = time.perf_counter() - t0
        idle.stop()  # the next line queues GPU work again
        send_pos, send_inv, group_pos, rows = row_indices_on(row_map, x.device)
        x_send = x_sorted if send_pos is None else permute_rows(x_sorted, send_pos, send_inv)
        self.mark("route")
        x_recv = self._send_rows(x_send, row_map)
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

    def combine(self, out: torch.Tensor, meta: DispatchMeta | FastMeta) -> torch.Tensor:
        """[N, H] expert outputs (dispatch's row order) -> [T, H]: sum_k gate_k * expert_k(x)."""
        if isinstance(meta, FastMeta):
            y = fast_combine(out, meta)  # one fused gather-weight-sum pass
        else:
            out_send = self._return_rows(gather_rows(out, meta.group_pos), meta.row_map)
            if meta.send_pos is None:
                out_sorted = out_send
            else:
                out_sorted = permute_rows(out_send, meta.send_inv, meta.send_pos)
            y = weighted_sum_of_choices(out_sorted, meta)
        self.mark("combine")
        return y

    # --------------------------------------------------------------------------------------------
    # the steps a distributed dispatcher changes (`AllToAllDispatcher`); here: one device

    def _exchange_counts(self, vec_V: torch.Tensor) -> PendingCounts:
        """Start the count vector [V] on its way to the host as a [1, V] matrix (no collective)."""
        return copy_counts_to_host(vec_V.unsqueeze(0))

    def _row_map(self, counts_GE: npt.NDArray[np.int64], align: int) -> tuple[RowMap, Plan | None]:
        """The row map for the gathered counts [1, E] (expert e in slot e), and no plan."""
        return local_row_map(counts_GE[0], align), None

    def _send_rows(self, x_send: torch.Tensor, row_map: RowMap) -> torch.Tensor:
        """Rows in send order -> the rows this device's slots receive: the same rows here."""
        return x_send

    def _return_rows(self, out_recv: torch.Tensor, row_map: RowMap) -> torch.Tensor:
        """Outputs of the received rows -> outputs of the sent rows: the same rows here."""
        return out_recv

    def check_inputs(self, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> None:
        """Refuse (via `fail`) inputs whose shapes, dtypes or devices do not fit (no device sync)."""
        problem = check_shapes(x, expert, weight, self.num_experts)
        if problem:
            self.fail(problem, x.device)

    def fail(self, message: str, device: torch.device) -> None:
        """Refuse this call with `message` (a ValueError in the dispatch group's common format)."""
        flags_GV = np.zeros((1, self.num_experts + 2), dtype=np.int64)
        flags_GV[0, -1] = ERR_CALLER
        raise_if_flagged(flags_GV, self.num_experts, self.rank, message)
        raise AssertionError("unreachable: the local flag is set")

    def mark(self, name: str) -> None:
        """Close the phase `name` on the optional timer (benchmarks); no-op otherwise."""
        if self.timer is not None:
            self.timer.mark(name)


# ------------------------------------------------------------------------------------------------
# the steps every dispatcher shares


def grouped_gemm_align(x: torch.Tensor) -> int:
    """Rows per slot are padded to a multiple of this: CUDA's grouped GEMM needs 16-byte-aligned
    row groups (8 bf16 rows); the CPU loop needs none."""
    return 8 if x.is_cuda else 1


def sort_by_expert(
    x_TH: torch.Tensor, expert_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tk_of_row, row_of_tk, x_sorted [T*K, H]): each token K times, rows sorted by expert (stable)."""
    k = expert_TK.shape[1]
    tk_of_row = torch.argsort(expert_TK.reshape(-1), stable=True)
    row_of_tk = torch.argsort(tk_of_row)  # the inverse permutation, one kernel
    token_of_row = torch.div(tk_of_row, k, rounding_mode="floor")
    return tk_of_row, row_of_tk, gather_tokens(x_TH, token_of_row, row_of_tk, k)


def weighted_sum_of_choices(sorted_out: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """[T*K, H] outputs in expert-sorted row order -> [T, H]: sum over k of gate_k * output_k."""
    t, k = meta.weight.shape
    out_TKH = permute_rows(sorted_out, meta.row_of_tk, meta.tk_of_row).view(t, k, sorted_out.shape[1])
    return (out_TKH * meta.weight.to(sorted_out.dtype).unsqueeze(2)).sum(dim=1)


def row_indices_on(
    row_map: RowMap, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(send_pos, send_inv, group_pos, slot_rows) on `device` from ONE host-to-device copy of the
    row map's small per-piece tables; rows are expanded on the device with sizes known on the
    host (no host sync). The host buffer is pinned on CUDA so the copy is asynchronous.
    """
    rm = row_map
    pieces = [(rm.group_start, rm.group_count, sum(rm.recv_splits))]
    if rm.send_start is not None:
        total = sum(rm.send_splits)
        pieces += [(rm.send_start, rm.send_count, total), (rm.inv_start, rm.inv_count, total)]
    parts = [rm.slot_rows]
    for start, count, _ in pieces:
        parts += [range_shift(start, count), count]
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    out, at = [], rm.slot_rows.size
    for start, _, total in pieces:
        p = start.size
        shift, count = dev[at : at + p], dev[at + p : at + 2 * p]
        out.append(
            torch.repeat_interleave(shift, count, output_size=total) + torch.arange(total, device=device)
        )
        at += 2 * p
    send_pos, send_inv = (out[1], out[2]) if len(out) == 3 else (None, None)
    return send_pos, send_inv, out[0], dev[: rm.slot_rows.size]
