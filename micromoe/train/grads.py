"""Gradients of a sharded model: the owned experts' synchronization, and global-norm clipping.

Dense gradients need nothing here: FSDP reduce-scatters them (averaged over DP) during the
backward. The owned experts' gradients were summed at their owners by the gather's backward;
`sync_gradients` adds the other MicroEP groups' owners and divides by DP (`runtime.grad_sync`).

The global norm counts every parameter once: a rank adds the squares of its dense shard and of its
owned experts divided by the number of MicroEP groups (each group owns every expert once, and all
groups' owners hold the same gradient), and the world's sum over ranks is the sum over parameters.
Every rank then scales by the same factor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from micromoe.model.parallel import expert_parameters
from micromoe.runtime import sync_expert_gradients
from micromoe.train.trainer import Run


def sync_gradients(run: Run) -> None:
    """Each MoE layer's owned expert gradients: summed over every MicroEP group's owners, / DP."""
    if not run.parallel.distributed:
        return
    for layer, groups in zip(run.model.moe_layers(), run.parallel.groups, strict=True):
        # collectives: the gather group (gather="step"), the expert-DP group
        sync_expert_gradients(layer.experts, groups)


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    norms = torch._foreach_norm(grads) if grads else []  # one fused kernel per dtype
    return sum((n.float().square() for n in norms), torch.zeros((), device=device))


@torch.no_grad()
def clip_gradients(run: Run, max_norm: float) -> torch.Tensor:
    """Scale every gradient so the global L2 norm is at most `max_norm` (0 = only measure).
    Call after `sync_gradients`. Returns the norm before clipping, a float32 scalar on the device
    (identical on every rank); no host sync here."""
    device = run.parallel.device
    experts = {id(p) for p in expert_parameters(run.model)}
    dense = [_local(p.grad) for p in run.model.parameters() if p.grad is not None and id(p) not in experts]
    owned = [p.grad for p in expert_parameters(run.model) if p.grad is not None]
    groups = run.parallel.layout.num_microep_groups if run.parallel.layout is not None else 1
    total = _sum_sq(dense, device) + _sum_sq(owned, device) / groups
    if dist.is_initialized():
        dist.all_reduce(total)  # collective (world): every rank's share, each parameter once
    norm = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grads in (dense, owned):
            if grads:
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
