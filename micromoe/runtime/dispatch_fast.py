"""The single-device fast path of the local dispatcher: no host sync, fused permute and combine.

Used by `LocalDispatcher` on CUDA when Triton is available (`uses_fast_path`); the CPU path keeps
the reference pipeline of `dispatch_local.py`. Both compute the same function.

Every index is computed on the device: a stable sort of the flat expert ids gives each
(token, choice) its row; `searchsorted` on the sorted ids gives the per-expert group ends that
the grouped GEMM takes as device offsets. The host never sees a count on the way: the count and
error vector is copied to pinned memory behind an event (`LazyCounts`) and read only when someone
asks (stats, or the next forward's deferred input check).

Legend: T tokens, K top-k, H hidden, E experts (= local slots), N rows of the grouped buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from micromoe.runtime.comm import PendingCounts, copy_counts_to_host
from micromoe.runtime.dispatch_checks import count_vector, raise_if_flagged
from micromoe.runtime.kernels import combine_tokens, permute_tokens, uses_triton

FAST_ALIGN = 8  # rows per expert group padded to this (16-byte groups for the weight gradient)


def uses_fast_path(x: torch.Tensor) -> bool:
    """True when the local dispatcher takes the fast path for tokens `x` (CUDA with Triton)."""
    return uses_triton(x) and x.is_cuda


class LazyCounts:
    """The count and error vector of one dispatch on its way to the host (no sync until read).

    Args:
        pending: the started copy of the int64 [1, E+2] vector (`count_vector`).
        num_experts: E.
        align: the group padding of the dispatch (slot rows = counts rounded up to it).
    """

    def __init__(self, pending: PendingCounts, num_experts: int, align: int) -> None:
        self._pending, self.num_experts, self.align = pending, num_experts, align
        self._host: npt.NDArray[np.int64] | None = None

    def ready(self) -> bool:
        """True when reading costs no wait (the copy has landed)."""
        ev = self._pending.event
        return self._host is not None or ev is None or ev.query()

    def counts_GV(self) -> npt.NDArray[np.int64]:
        """int64 [1, E+2]; waits for the copy (host sync) and raises ValueError on bad input."""
        if self._host is None:
            self._host = self._pending.wait()  # host sync, only when someone reads the counts
        raise_if_flagged(self._host, self.num_experts, 0, None)
        return self._host

    @property
    def slot_load(self) -> npt.NDArray[np.int64]:
        """int64 [E]: rows each expert computed."""
        return self.counts_GV()[0, : self.num_experts]

    @property
    def counts_ge(self) -> npt.NDArray[np.int64]:
        """int64 [1, E]."""
        return self.counts_GV()[:, : self.num_experts]


@dataclass(frozen=True)
class FastMeta:
    """What `fast_combine` needs from `fast_dispatch`.

    Attributes:
        pos: int32 [T*K]; grouped row of flat (token, choice) t*K + k.
        weight: [T, K] gate weights (carry the router's gradient).
        counts: the lazily copied count and error vector.
    """

    pos: torch.Tensor
    weight: torch.Tensor
    counts: LazyCounts

    # the stats interface of `DispatchMeta`; counts are read (a host sync) only on access
    plan = None
    route_s = 0.0
    gpu_idle_ms = 0.0  # no host wait on this path

    @property
    def slot_load(self) -> npt.NDArray[np.int64]:
        return self.counts.slot_load

    @property
    def counts_ge(self) -> npt.NDArray[np.int64]:
        return self.counts.counts_ge


def device_rows(
    expert_TK: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pos int32 [T*K], rows int32 [E], N): the grouped layout, computed on the device.

    Rows are grouped by expert (stable: by token, then choice, inside one expert); expert e's
    block starts at sum(rows[:e]) and has counts[e] real rows, then zero padding up to rows[e]
    (a multiple of `align`). N = T*K + E*(align-1) bounds sum(rows) without a host sync; rows
    past sum(rows) belong to no group. Expert ids outside [0, E) are clamped (the count vector
    flags them) so no index leaves the buffer.
    """
    n, e = expert_TK.numel(), num_experts
    dev = expert_TK.device
    keys = expert_TK.reshape(-1).clamp(0, e - 1).to(torch.int32)
    sorted_keys, order = torch.sort(keys, stable=True)
    experts = torch.arange(e, device=dev, dtype=torch.int32)
    ends = torch.searchsorted(sorted_keys, experts, right=True, out_int32=True)  # inclusive cumsum
    pos = torch.empty(n, device=dev, dtype=torch.int32)
    if align == 1:
        rows = torch.diff(ends, prepend=ends.new_zeros(1))
        pos.scatter_(0, order, torch.arange(n, device=dev, dtype=torch.int32))
        return pos, rows, n
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    rows = (counts + (align - 1)) // align * align
    shift = torch.cumsum(rows, 0, dtype=torch.int32) - ends - (rows - counts)  # padded start - start
    row_sorted = torch.arange(n, device=dev, dtype=torch.int32) + shift[sorted_keys]
    pos.scatter_(0, order, row_sorted)
    return pos, rows, n + e * (align - 1)


def fast_dispatch(
    x_TH: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, FastMeta]:
    """(tokens [N, H], rows int32 [E] on the device, meta): one permute pass, no host sync."""
    pending = copy_counts_to_host(count_vector(expert_TK, weight_TK, num_experts).unsqueeze(0))
    pos, rows, num_rows = device_rows(expert_TK, num_experts, align)
    tokens = permute_tokens(x_TH, pos, expert_TK.shape[1], num_rows)
    return tokens, rows, FastMeta(pos, weight_TK, LazyCounts(pending, num_experts, align))


def fast_combine(out_NH: torch.Tensor, meta: FastMeta) -> torch.Tensor:
    """[N, H] expert outputs -> [T, H] = sum_k gate_k * out[pos[t*K+k]], one pass."""
    return combine_tokens(out_NH, meta.pos, meta.weight.to(out_NH.dtype))
