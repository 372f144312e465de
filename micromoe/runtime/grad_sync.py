"""Gradient synchronization: owned experts over the owners of the same experts, dense over DP.

Gradients end up as the data-parallel average would have them: the gradient of the mean of every
rank's loss. The gather's backward has already summed, at each owner, the gradients of every slot
copy of its experts in its MicroEP group (`runtime.owned`); the owners of the same experts in the
other MicroEP groups (`ProcessGroups.expert_dp`) then sum theirs, and the total is divided by DP.
Every owner of an expert gets the same reduced bits, so its copies in every MicroEP group stay
bit-identical. Dense parameters are averaged over DP with one flat all-reduce (the trainer shards
them with FSDP instead, which reduces them during the backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from micromoe.runtime.groups import ProcessGroups
from micromoe.runtime.owned import OwnedExperts


def sync_gradients(model: nn.Module, groups: ProcessGroups) -> None:
    """Synchronize every gradient of `model` (plain tensors, no FSDP): dense parameters over DP,
    then every `OwnedExperts` module in module order."""
    experts = [m for m in model.modules() if isinstance(m, OwnedExperts)]
    expert_params = {id(p) for m in experts for p in m.parameters()}
    sync_dense_gradients([p for p in model.parameters() if id(p) not in expert_params], groups)
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


def sync_expert_gradients(experts: OwnedExperts, groups: ProcessGroups) -> None:
    """Owned master gradients: the step's slot gradients returned to the owners (`gather="step"`),
    summed over the owners of the same experts in every MicroEP group, divided by DP."""
    experts.finish_gradients()  # collective (gather group) with gather="step", else nothing
    params = list(experts.parameters())
    for p in params:
        if p.grad is None:  # no forward this step: still take part in the collective below
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if groups.expert_dp is not None:
        # collective (expert-DP group: this rank's position in every MicroEP group)
        dist.all_reduce(flat, group=groups.expert_dp)
    flat /= groups.layout.dp
    _copy_back(flat, [p.grad for p in params])


def _copy_back(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
