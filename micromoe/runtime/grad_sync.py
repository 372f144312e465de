"""Gradient synchronization: experts over their replica groups, dense parameters over DP.

Gradients end up as the data-parallel average would have them: the gradient of the mean of every
rank's loss. An expert replica's local gradient covers the tokens it computed (from any rank of
its MicroEP group), so the true gradient is the *sum* over all its replicas divided by DP.
Collectives are issued in the placement's collective order (slot, then expert) on every rank; the
local-slot rule makes that order consistent across overlapping replica groups (no deadlock).
Every rank of a replica group gets the same reduced bits, so replicas stay bit-identical.

Legend: S local slots (expert weights are [S, ...]; slot `rg.slot` holds expert `rg.expert`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from micromoe.runtime.experts import GroupedSwiGLU
from micromoe.runtime.groups import ProcessGroups


def sync_gradients(model: nn.Module, groups: ProcessGroups) -> None:
    """Synchronize every gradient of `model` (all its MoE layers share `groups.placement`)."""
    experts = [m for m in model.modules() if isinstance(m, GroupedSwiGLU)]
    expert_params = {id(p) for m in experts for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_params]
    sync_dense_gradients(dense, groups)
    for m in experts:
        sync_expert_gradients(m, groups)


def sync_dense_gradients(params: list[nn.Parameter], groups: ProcessGroups) -> None:
    """Average dense gradients over the DP group with one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    # collective (DP group): sum of dense gradients
    dist.all_reduce(flat, group=groups.dp)
    flat /= groups.layout.dp
    _copy_back(flat, grads)


def sync_expert_gradients(experts: GroupedSwiGLU, groups: ProcessGroups) -> None:
    """Sum each expert's gradient over its replicas, divide by DP; one all-reduce per expert."""
    params = list(experts.parameters())
    dp = groups.layout.dp
    for rg in groups.replicas:  # collective order, identical on every rank
        if groups.rank not in rg.ranks:
            continue
        grads = [p.grad[rg.slot] for p in params if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        if len(rg.ranks) > 1:
            # collective (replica group of expert rg.expert): sum over its replicas
            dist.all_reduce(flat, group=rg.group)
        flat /= dp
        _copy_back(flat, grads)


def _copy_back(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
