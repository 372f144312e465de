"""The single-device fast path of the local dispatcher: no host sync, fused permute and combine.

Used by `LocalDispatcher` on CUDA when Triton is available (`uses_fast_path`); the CPU path keeps
the reference pipeline of `dispatch_local.py`. Both compute the same function.

Every index is computed on the device: a counting sort of the flat expert ids (two Triton
launches, `kernels_rows.py`; a stable radix sort and a `searchsorted` elsewhere) gives each
(token, choice) its row and the per-expert group ends that the grouped GEMM takes as device
offsets. The host never sees a count on the way: counts and the
input verdict stay on the device (`LazyCounts`) until someone reads them (stats).

Legend: T tokens, K top-k, H hidden, E experts (= local slots), N rows of the grouped buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from micromoe.runtime.dispatch_checks import raise_if_flagged
from micromoe.runtime.kernels import combine_tokens, permute_tokens, uses_triton
from micromoe.runtime.kernels_rows import rows_layout, uses_rows_kernel

FAST_ALIGN = 1  # no group padding: torch's grouped GEMM takes any group size for our layouts


def uses_fast_path(x: torch.Tensor) -> bool:
    """True when the local dispatcher takes the fast path for tokens `x` (CUDA with Triton)."""
    return uses_triton(x) and x.is_cuda


class LazyCounts:
    """Rows per expert and the input verdict of one dispatch, kept on the device until read.

    Nothing is copied on the hot path: reading (`slot_load`, `counts_ge`) copies the small
    vectors to the host (a host sync, waiting for the work queued so far) and raises ValueError
    for bad expert ids or non-finite gates, like the reference path's count check.

    Args:
        bounds: int32 [E+1] on the device; bounds[j] = number of flat expert ids < j.
        weight: [T, K] the call's gate weights (checked for NaN/inf when read).
        num_rows: T*K.
        num_experts: E.
    """

    def __init__(self, bounds: torch.Tensor, weight: torch.Tensor, num_rows: int, num_experts: int) -> None:
        self._bounds, self._weight = bounds, weight
        self.num_rows, self.num_experts = num_rows, num_experts
        self._host: npt.NDArray[np.int64] | None = None

    def counts_GV(self) -> npt.NDArray[np.int64]:
        """int64 [1, E+2]: the reference path's count vector (rows per expert, ids out of range,
        error bits); raises ValueError on bad input."""
        if self._host is None:
            finite = torch.isfinite(self._weight.detach().sum()).long().view(1)  # NaN/inf propagate
            both = torch.cat([self._bounds.long(), finite])
            b = both.cpu().numpy()  # host sync, only when someone reads the counts
            e, n = self.num_experts, self.num_rows
            out_of_range = b[0] + n - b[e]
            self._host = np.concatenate([np.diff(b[: e + 1]), [out_of_range, 1 - b[e + 1]]])[None]
            self._host = self._host.astype(np.int64)  # ERR_NONFINITE = 1 when not finite
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
    """What `fast_combine` needs from `fast_dispatch`, and the stats interface of `DispatchMeta`.

    Attributes:
        pos: int32 [T*K]; grouped row of flat (token, choice) t*K + k.
        weight: [T, K] gate weights (carry the router's gradient).
        counts: the counts, read lazily.
        offs: int32 [E] on the device; cumsum of the rows per expert (the grouped GEMM's group
            ends, handed to the experts so they need no scan of their own).
    """

    pos: torch.Tensor
    weight: torch.Tensor
    counts: LazyCounts
    offs: torch.Tensor

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
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(pos int32 [T*K], rows int32 [E], N, bounds int32 [E+1], offs int32 [E]): the grouped
    layout, on the device; offs = cumsum(rows), the grouped GEMM's group ends.

    Rows are grouped by expert (stable: by token, then choice, inside one expert); expert e's
    block starts at sum(rows[:e]) and has counts[e] real rows, then zero padding up to rows[e]
    (a multiple of `align`). N = T*K + E*(align-1) bounds sum(rows) without a host sync; rows
    past sum(rows) belong to no group. bounds[j] - bounds[0] = number of valid ids < j: counts
    and the out-of-range count come from it. Out-of-range ids give garbage rows past the groups
    (flagged when the counts are read) but every index stays inside the buffers.

    Where Triton runs and T*K <= `kernels_rows.MAX_ROWS`, a two-launch counting sort
    (`rows_layout`) computes it; elsewhere a radix sort of 1-byte keys (`sorted_rows`). Both give
    the same layout for valid ids.
    """
    n, e = expert_TK.numel(), num_experts
    if uses_rows_kernel(expert_TK):
        pos, rows, bounds, ends = rows_layout(expert_TK, e, align)
        return pos, rows, n + e * (align - 1), bounds, ends
    return sorted_rows(expert_TK, e, align)


def sorted_rows(
    expert_TK: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """`device_rows` from a stable sort of the ids and one `searchsorted` on the sorted ids
    (any size, any device)."""
    n, e = expert_TK.numel(), num_experts
    dev = expert_TK.device
    keys = _sort_keys(expert_TK.reshape(-1), e)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, _arange(e + 1, dev, keys.dtype), out_int32=True)
    rows = torch.diff(bounds)
    row_sorted = _arange(n, dev, torch.int32)  # read-only
    if align > 1:
        rows = (rows + (align - 1)) // align * align
        ends = torch.cumsum(rows, 0, dtype=torch.int32)
        # padded start - sorted start; bounds[0] (ids < 0, wider keys only) keeps every row >= 0
        shift = ends - rows - (bounds[:-1] - bounds[:1])
        row_sorted = row_sorted + shift[sorted_keys.long().clamp(0, e - 1)]
    elif keys.dtype == torch.uint8:
        ends = bounds[1:]  # = cumsum(rows): bad ids sort last, so bounds[0] = 0
    else:
        ends = bounds[1:] - bounds[0]
    pos = torch.empty(n, device=dev, dtype=torch.int32).scatter_(0, order, row_sorted)
    return pos, rows, n + e * (align - 1), bounds, ends


def _sort_keys(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The ids in the narrowest type the radix sort takes (1 byte: one pass instead of four);
    ids outside [0, E) map to keys outside [0, E) (-1 or 255, or E), never onto a valid id."""
    e = num_experts
    if e < 255:
        return flat.clamp(-1, e).to(torch.uint8)  # -1 wraps to 255 >= E
    if e < 32767:
        return flat.clamp(-1, e).to(torch.int16)
    return flat.to(torch.int32)


_ARANGE: dict[tuple[torch.device, int, torch.dtype], torch.Tensor] = {}


def _arange(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """arange(n) on `device`, cached (one launch fewer per call; callers never write it)."""
    key = (device, n, dtype)
    if key not in _ARANGE:
        if len(_ARANGE) > 32:
            _ARANGE.clear()
        _ARANGE[key] = torch.arange(n, device=device, dtype=dtype)
    return _ARANGE[key]


def fast_dispatch(
    x_TH: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, FastMeta]:
    """(tokens [N, H], rows int32 [E] on the device, meta): one permute pass, no host sync."""
    pos, rows, num_rows, bounds, offs = device_rows(expert_TK, num_experts, align)
    tokens = permute_tokens(x_TH, pos, expert_TK.shape[1], num_rows)
    counts = LazyCounts(bounds, weight_TK, expert_TK.numel(), num_experts)
    return tokens, rows, FastMeta(pos, weight_TK, counts, offs)


def fast_combine(out_NH: torch.Tensor, meta: FastMeta) -> torch.Tensor:
    """[N, H] expert outputs -> [T, H] = sum_k gate_k * out[pos[t*K+k]], one pass."""
    return combine_tokens(out_NH, meta.pos, meta.weight.to(out_NH.dtype))
