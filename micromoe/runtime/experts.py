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


class GroupedSwiGLU(nn.Module):
    """SwiGLU experts in S local slots: out = (silu(x W_gate) * (x W_up)) W_down, per slot.

    Parameters:
        w_gate_up: [S, H, 2F]; columns [:F] are the gate projection, [F:] the up projection.
        w_down: [S, F, H].

    Rows of an empty slot (no expert) never arrive; its weights stay unused. A zero input row gives
    a zero output row and zero weight gradients (no biases), so alignment padding is inert.
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
        h = grouped_mm(x, self.w_gate_up, rows, offs=offs)
        if uses_triton(h):
            act = swiglu(h)  # one pass each way instead of split + silu + multiply
        else:
            gate, up = h.split(self.ffn_hidden, dim=1)
            act = F.silu(gate) * up
        return grouped_mm(act, self.w_down, rows, offs=offs)
