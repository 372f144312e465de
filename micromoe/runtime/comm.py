"""Collectives of the token dispatchers: the count all-gather and an autograd-aware all-to-all.

Works on NCCL (CUDA tensors) and gloo (CPU tensors). Every collective is commented at its call
site; every host-device sync is marked "host sync".

Legend: G ranks of the dispatch group, V entries of one rank's count vector (E experts + 2 error
entries), N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `send_splits` go to the group's ranks; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        # collective (dispatch group): the uneven all-to-all of token rows
        dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        # collective (dispatch group): gradients take the forward route in reverse
        dist.all_to_all_single(out, grad.contiguous(), list(send_splits), list(recv_splits), group=ctx.group)
        return out, None, None, None


def all_to_all_rows(
    x: torch.Tensor,
    send_splits: tuple[int, ...],
    recv_splits: tuple[int, ...],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows.

    Args:
        x: [sum(send_splits), ...]; rows for rank i are the i-th block of `send_splits[i]` rows.
        send_splits, recv_splits: rows sent to / received from each rank of `group`.

    Returns:
        [sum(recv_splits), ...]; blocks ordered by source rank.
    """
    assert x.shape[0] == sum(send_splits), (x.shape, sum(send_splits))
    return _AllToAll.apply(x, tuple(send_splits), tuple(recv_splits), group)


@dataclass(frozen=True)
class PendingCounts:
    """Count vectors on their way to the host; `wait()` returns them as a NumPy matrix."""

    host: torch.Tensor
    event: torch.cuda.Event | None
    num_ranks: int

    def wait(self) -> npt.NDArray[np.int64]:
        """int64 [G, V]: row src = the vector rank src contributed."""
        if self.event is not None:
            self.event.synchronize()  # host sync: waits for the counts and their copy only
        return self.host.numpy().reshape(self.num_ranks, -1).astype(np.int64, copy=True)


def copy_counts_to_host(counts_GV: torch.Tensor) -> PendingCounts:
    """Start copying the int64 matrix `counts_GV` [G, V] to the host (no collective).

    On CUDA the copy goes to pinned memory behind an event, so the caller can queue more GPU work
    (the token permutation) before waiting: the host sync then waits for the counts only.
    """
    if not counts_GV.is_cuda:
        return PendingCounts(counts_GV.reshape(-1), None, counts_GV.shape[0])
    host = torch.empty(counts_GV.numel(), dtype=counts_GV.dtype, pin_memory=True)
    host.copy_(counts_GV.reshape(-1), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingCounts(host, event, counts_GV.shape[0])


def all_gather_counts(vec_V: torch.Tensor, group: dist.ProcessGroup) -> PendingCounts:
    """All-gather the int64 vector `vec_V` [V] over `group`, then start its copy to the host.

    The dispatchers' count exchange; migration also gathers its small agreement and checksum
    records with it."""
    counts_GV = vec_V.new_empty((dist.get_world_size(group), vec_V.numel()))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    # collective (`group`): in dispatch, the one count exchange per layer and micro-batch
    gather(counts_GV.reshape(-1), vec_V, group=group)
    return copy_counts_to_host(counts_GV)
