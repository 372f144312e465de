"""Expert FFNs of one rank as grouped GEMMs over its local slots.

Legend: S local slots, N rows (slot-major: slot 0's rows, then slot 1's, ...), H hidden, F expert
FFN hidden. On CUDA with bf16, each projection is one `torch._grouped_mm` over all slots, with
device-side group offsets (any group size: the reference dispatchers pad groups to 8 rows, the
single-device fast path does not), and the SwiGLU between them is one fused kernel each way
(`kernels.swiglu`). Elsewhere a per-slot loop and plain torch ops compute the same function (the
CPU reference path; never used on the GPU fast path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from micromoe.runtime.kernels import swiglu, uses_triton


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
    if x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
        if offs is None:
            offs = torch.cumsum(rows, 0, dtype=torch.int32)  # group end offsets, stays on device
        return torch._grouped_mm(x, w, offs=offs)
    sizes = rows.tolist()  # host sync on CUDA (fallback path only; free on CPU)
    parts = [xs @ w[s] for s, xs in enumerate(torch.split(x, sizes))]
    return torch.cat(parts) if parts else x.new_zeros((0, w.shape[2]))


def swiglu_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    *,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per slot s: out[rows of s] = (silu(x W_gate[s]) * (x W_up[s])) W_down[s].

    Args:
        x: [N, H] slot-major rows.
        w_gate_up: [S, H, 2F]; columns [:F] gate, [F:] up. w_down: [S, F, H].
        rows: int32/int64 [S] rows per slot. offs: optional int32 [S] = cumsum(rows) on x's
            device, when the dispatcher already has it (CUDA).

    Returns [N, H]. A zero input row gives a zero output row and zero weight gradients (no
    biases), so alignment padding is inert.
    """
    if offs is None and x.is_cuda:
        offs = torch.cumsum(rows, 0, dtype=torch.int32)  # group ends, on the device
    h = grouped_mm(x, w_gate_up, rows, offs=offs)
    if uses_triton(h):
        act = swiglu(h)  # one pass each way instead of split + silu + multiply
    else:
        gate, up = h.split(w_down.shape[1], dim=1)
        act = F.silu(gate) * up
    return grouped_mm(act, w_down, rows, offs=offs)


class GroupedSwiGLU(nn.Module):
    """All E experts of a layer on one device, as S = E slots of `swiglu_experts`.

    Parameters (the master weights, in the dtype they were built with):
        w_gate_up: [E, H, 2F]; columns [:F] are the gate projection, [F:] the up projection.
        w_down: [E, F, H].

    `compute_dtype` (None: the parameters' dtype) is what the GEMMs run in: with float32 masters
    and bfloat16 compute, each forward casts the weights, and their gradients arrive in float32.
    """

    def __init__(
        self,
        num_slots: int,
        hidden: int,
        ffn_hidden: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_slots, self.hidden, self.ffn_hidden = num_slots, hidden, ffn_hidden
        kw = {"device": device, "dtype": dtype}
        self.w_gate_up = nn.Parameter(torch.empty(num_slots, hidden, 2 * ffn_hidden, **kw))
        self.w_down = nn.Parameter(torch.empty(num_slots, ffn_hidden, hidden, **kw))
        self.compute_dtype: torch.dtype | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(self.hidden))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.ffn_hidden))

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor, *, offs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, H] slot-major, rows int32/int64 [S] -> [N, H] in x's dtype (see `swiglu_experts`)."""
        dtype = self.compute_dtype or self.w_down.dtype
        out = swiglu_experts(x.to(dtype), self.w_gate_up.to(dtype), self.w_down.to(dtype), rows, offs=offs)
        return out.to(x.dtype)
