"""Expert FFNs of one rank as grouped GEMMs over its local slots.

Legend: S local slots, N rows (slot-major: slot 0's rows, then slot 1's, ...), H hidden, F expert
FFN hidden. On CUDA with bf16, each projection is one `torch._grouped_mm` over all slots, with
device-side group offsets (any group size: the reference dispatchers pad groups to 8 rows, the
single-device fast path does not), and the SwiGLU between them is one fused kernel each way
(`kernels.swiglu`). Elsewhere a per-slot loop and plain torch ops compute the same function (the
CPU reference path; never used on the GPU fast path).

Optional chunked weight gradients (`max_group_rows=C`): a slot of n > C rows is one long-K group in
the weight-gradient GEMM (output tiles fixed at H x F, reduction over n rows), which leaves most of
the GPU idle at the end. With C set, the weight gradients are computed over chunks of at most C
rows (Gc = S + N // C groups, a static count: no host sync) and each slot's chunk partials are
summed back into it. Forward and input gradients keep the slot groups. Same function; in bf16 the
chunk partials are each rounded before the sum (atomic adds, order not fixed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micromoe.plan import positive_int
from micromoe.runtime.kernels import swiglu, uses_triton


def _fast(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, *, offs: torch.Tensor | None = None
) -> torch.Tensor:
    """out[rows of slot s] = x[rows of slot s] @ w[s].

    Args:
        x: [N, K], slot-major rows.
        w: [S, K, M].
        rows: int32/int64 [S] on x's device; rows per slot, summing to N (on CUDA at most N:
            rows past the last group belong to no slot and their output is undefined).
        offs: optional int32 [S] = cumsum(rows) on x's device (CUDA path; lets two projections
            share one cumsum).

    Returns:
        [N, M], differentiable in x and w.
    """
    if _fast(x, w):
        if offs is None:
            offs = torch.cumsum(rows, 0, dtype=torch.int32)  # group end offsets, stays on device
        return torch._grouped_mm(x, w, offs=offs)
    sizes = rows.tolist()  # host sync on CUDA (fallback path only; free on CPU)
    parts = [xs @ w[s] for s, xs in enumerate(torch.split(x, sizes))]
    return torch.cat(parts) if parts else x.new_zeros((0, w.shape[2]))


def chunk_layout(rows: torch.Tensor, num_rows: int, max_group_rows: int) -> tuple[torch.Tensor, ...]:
    """Every slot's rows cut into chunks of at most C = `max_group_rows` rows, as Gc = S + N // C groups.

    Every slot gets max(1, ceil(rows[s] / C)) consecutive chunks (an empty slot one empty chunk), so
    at most Gc are used; the unused ones are empty groups at the end. Computed on rows' device
    (no host sync).

    Args:
        rows: int32/int64 [S], rows per slot, summing to at most N = `num_rows`.

    Returns:
        chunk_ends: int32 [Gc], the chunks' end offsets (grouped-GEMM `offs`).
        first: int64 [S], each slot's first chunk.
        extra: int64 [N // C], the other chunks (later chunks of a slot, then the unused ones).
        extra_slot: int64 [N // C], the slot of each `extra` chunk (S - 1 for an unused one,
            which is empty and adds zeros).
    """
    num_slots, c = rows.shape[0], max_group_rows
    rows64 = rows.to(torch.int64)
    per_slot = torch.clamp((rows64 + c - 1) // c, min=1)
    cum = torch.cumsum(per_slot, 0)
    first = cum - per_slot
    j = torch.arange(num_slots + num_rows // c, device=rows.device)
    slot = torch.searchsorted(cum, j, right=True).clamp_(max=num_slots - 1)  # unused -> last slot
    ends = torch.cumsum(rows64, 0)
    chunk_ends = torch.minimum(ends[slot] - rows64[slot] + (j - first[slot] + 1) * c, ends[slot])
    chunk_ends = torch.where(j < cum[-1], chunk_ends, ends[-1])  # unused chunks: empty, at the end
    is_first = torch.zeros(j.shape[0], dtype=torch.int32, device=rows.device)
    is_first[first] = 1
    extra = torch.argsort(is_first, stable=True)[: num_rows // c]  # static size: Gc - S
    return chunk_ends.to(torch.int32), first, extra, slot[extra]


def _weight_grad_chunks(x: torch.Tensor, gy: torch.Tensor, chunk_ends: torch.Tensor) -> torch.Tensor:
    """[Gc, K, M]: x[rows of chunk g].T @ gy[rows of chunk g] (zeros for an empty chunk)."""
    if _fast(x, gy):
        return torch._grouped_mm(x.t(), gy, offs=chunk_ends)
    ends = chunk_ends.tolist()
    starts = [0, *ends[:-1]]
    return torch.stack([x[a:b].T @ gy[a:b] for a, b in zip(starts, ends, strict=True)])


class _ChunkedWeightGradMM(torch.autograd.Function):
    """grouped_mm(x, w, rows) whose weight gradient is computed over row chunks (`chunk_layout`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w: torch.Tensor,
        rows: torch.Tensor,
        offs: torch.Tensor | None,
        *layout: torch.Tensor,
    ) -> torch.Tensor:
        chunk_ends, first, extra, extra_slot = layout
        ctx.save_for_backward(x, w, rows, offs, chunk_ends, first, extra, extra_slot)
        return grouped_mm(x, w, rows, offs=offs)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, rows, offs, chunk_ends, first, extra, extra_slot = ctx.saved_tensors
        gy = gy.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = grouped_mm(gy, w.transpose(1, 2), rows, offs=offs)
        if ctx.needs_input_grad[1]:
            part = _weight_grad_chunks(x, gy, chunk_ends)  # [Gc, H, M]
            gw = part.index_select(0, first)  # each slot's first chunk
            gw.index_add_(0, extra_slot, part.index_select(0, extra))  # plus its later chunks
        return gx, gw, None, None, None, None, None, None


class GroupedSwiGLU(nn.Module):
    """SwiGLU experts in S local slots: out = (silu(x W_gate) * (x W_up)) W_down, per slot.

    Parameters:
        w_gate_up: [S, H, 2F]; columns [:F] are the gate projection, [F:] the up projection.
        w_down: [S, F, H].

    Rows of an empty slot (no expert) never arrive; its weights stay unused. A zero input row gives
    a zero output row and zero weight gradients (no biases), so alignment padding is inert.

    `max_group_rows`: None (default) computes each slot's weight gradient as one GEMM group; C > 0
    computes it over chunks of at most C rows, summed per slot (see the module docstring). As
    implemented it measured 1.25-4.9x slower on an H200 (docs/RESULTS.md, issue 7): leave it None.
    """

    def __init__(
        self,
        num_slots: int,
        hidden: int,
        ffn_hidden: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_group_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.max_group_rows = (
            None if max_group_rows is None else positive_int(max_group_rows, "max_group_rows")
        )
        self.num_slots, self.hidden, self.ffn_hidden = num_slots, hidden, ffn_hidden
        kw = {"device": device, "dtype": dtype}
        self.w_gate_up = nn.Parameter(torch.empty(num_slots, hidden, 2 * ffn_hidden, **kw))
        self.w_down = nn.Parameter(torch.empty(num_slots, ffn_hidden, hidden, **kw))
        self.fused_swiglu = True  # False: plain torch ops everywhere (reference runs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.ffn_hidden))

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor, *, offs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, H] slot-major, rows int32/int64 [S] -> [N, H]. `offs`: optional int32 [S] =
        cumsum(rows) on x's device, when the dispatcher already has it (CUDA)."""
        if offs is None and x.is_cuda:
            offs = torch.cumsum(rows, 0, dtype=torch.int32)  # group ends, on the device
        c = self.max_group_rows
        if c is not None and x.shape[0] >= c:  # some slot may exceed C rows: chunk the weight grads
            layout = chunk_layout(rows, x.shape[0], c)  # shared by both projections
            h = _ChunkedWeightGradMM.apply(x, self.w_gate_up, rows, offs, *layout)
        else:
            layout = None
            h = grouped_mm(x, self.w_gate_up, rows, offs=offs)
        if self.fused_swiglu and uses_triton(h):
            act = swiglu(h)  # one pass each way instead of split + silu + multiply
        else:
            gate, up = h.split(self.ffn_hidden, dim=1)
            act = F.silu(gate) * up
        if layout is not None:
            return _ChunkedWeightGradMM.apply(act, self.w_down, rows, offs, *layout)
        return grouped_mm(act, self.w_down, rows, offs=offs)
