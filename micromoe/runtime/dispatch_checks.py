"""Input checks of a dispatch and the count vector that carries their verdict to every rank.

A bad input on one rank must not leave the other ranks waiting in a collective. So each rank's
verdict rides the count vector it contributes anyway (`count_vector`: tokens per expert, then
error entries); after the count exchange every rank reads every rank's flags and raises the same
error (`raise_if_flagged`). A single device reads its own vector the same way.

Legend: T tokens on this rank, K top-k, H hidden, E experts, G ranks of the dispatch group,
V = E + 2 entries of a count vector.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

ERR_NONFINITE, ERR_CALLER, ERR_EXPERT_ID = 1, 2, 4
_REASONS = {
    ERR_CALLER: "bad input shape or value (see that rank's message)",
    ERR_EXPERT_ID: "expert index out of range",
    ERR_NONFINITE: "non-finite gate weights (NaN/inf router logits or inputs)",
}


def check_shapes(
    x_TH: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int
) -> str:
    """'' if the shapes, dtypes and devices fit, else what is wrong (no device sync)."""
    if x_TH.dim() != 2:
        return f"tokens must be [T, H], got shape {tuple(x_TH.shape)}"
    if expert_TK.dim() != 2 or expert_TK.shape[0] != x_TH.shape[0]:
        return f"expert indices must be [T={x_TH.shape[0]}, K], got shape {tuple(expert_TK.shape)}"
    if weight_TK.shape != expert_TK.shape:
        return f"gate weights {tuple(weight_TK.shape)} must match expert indices {tuple(expert_TK.shape)}"
    if expert_TK.dtype not in (torch.int32, torch.int64):
        return f"expert indices must be int32/int64, got {expert_TK.dtype}"
    if expert_TK.shape[1] > num_experts:
        return f"top-k {expert_TK.shape[1]} exceeds the {num_experts} experts"
    if expert_TK.device != x_TH.device or weight_TK.device != x_TH.device:
        return "tokens, expert indices and gate weights must be on one device"
    return ""


def count_vector(expert_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [V] on the device: rows per expert on this rank; then the number of expert ids outside
    [0, E); then the error bits (ERR_NONFINITE). Few kernels: the host is the bottleneck here."""
    e = num_experts
    flat = expert_TK.reshape(-1).long()
    idx = torch.where((flat >= 0) & (flat < e), flat, e)
    vec_V = torch.zeros(e + 2, dtype=torch.int64, device=flat.device)
    # scatter_add, not bincount: CUDA bincount reads the max to the host (a sync)
    vec_V.scatter_add_(0, idx, torch.ones_like(idx))
    vec_V[e + 1 :] = torch.isfinite(weight_TK.sum()).logical_not()  # NaN/inf propagate into the sum
    return vec_V


def caller_error_vector(num_experts: int, device: torch.device) -> torch.Tensor:
    """int64 [V]: the count vector of a rank that refuses its input (ERR_CALLER, no counts)."""
    vec_V = torch.zeros(num_experts + 2, dtype=torch.int64, device=device)
    vec_V[-1] = ERR_CALLER
    return vec_V


def raise_if_flagged(
    counts_GV: npt.NDArray[np.int64], num_experts: int, rank: int, local_message: str | None
) -> None:
    """counts_GV: int64 [G, V] as gathered; raise ValueError if any rank flagged an error.

    Every rank of the group reads the same matrix, so every rank raises (or none does); the
    message names each culprit rank and why, and `local_message` replaces this rank's reason.
    """
    e = num_experts
    flags_G = counts_GV[:, e + 1] | np.where(counts_GV[:, e] > 0, ERR_EXPERT_ID, 0)
    if not flags_G.any():
        return
    parts = []
    for r in np.flatnonzero(flags_G):
        reasons = [text for bit, text in _REASONS.items() if flags_G[r] & bit]
        if r == rank and local_message:
            reasons = [local_message]
        parts.append(f"rank {r} of the dispatch group: {'; '.join(reasons)}")
    raise ValueError("MoE dispatch refused, no collective was started: " + " | ".join(parts))
