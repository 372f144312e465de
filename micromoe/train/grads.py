"""Gradients of a sharded model: synchronization over DP and replica groups, and global-norm clipping.

After `sync_gradients` every replica of an expert holds the same gradient, so the global norm
counts each expert once: a rank adds |g_slot|^2 / (copies of that expert in the world) for its
local slots, and the world's sum over ranks is the sum over experts. Dense gradients are identical
on every rank after their all-reduce and are counted locally. Every rank then scales by the same
factor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from micromoe.runtime import sync_dense_gradients, sync_expert_gradients
from micromoe.train.trainer import Run


def _split_params(run: Run) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    expert = [p for m in run.model.moe_layers() for p in m.experts.parameters()]
    ids = {id(p) for p in expert}
    return [p for p in run.model.parameters() if id(p) not in ids], expert


def sync_gradients(run: Run) -> None:
    """Dense gradients averaged over DP; each MoE layer's experts over that layer's replica groups."""
    if not run.parallel.distributed:
        return
    dense, _ = _split_params(run)
    sync_dense_gradients(dense, run.parallel.groups[0])  # collective (DP group)
    for layer, groups in zip(run.model.moe_layers(), run.parallel.groups, strict=True):
        sync_expert_gradients(layer.experts, groups)  # collectives (replica groups)


def _expert_norm_sq(run: Run) -> torch.Tensor:
    """Sum over this rank's local expert slots of |grad|^2 / copies of the slot's expert (float32)."""
    total = torch.zeros((), dtype=torch.float32, device=run.parallel.device)
    for i, layer in enumerate(run.model.moe_layers()):
        if run.parallel.distributed:
            groups = run.parallel.groups[i]
            copies = {rg.expert: len(rg.ranks) for rg in groups.replicas}
            weights = [1.0 / copies[e] if e >= 0 else 0.0 for e in groups.local_slots]
        else:
            weights = [1.0] * layer.experts.num_slots
        w = torch.tensor(weights, dtype=torch.float32, device=total.device)
        for p in layer.experts.parameters():
            if p.grad is not None:
                per_slot = torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=torch.float32)  # [S]
                total += (per_slot.square() * w).sum()
    return total


@torch.no_grad()
def clip_gradients(run: Run, max_norm: float) -> torch.Tensor:
    """Scale every gradient so the global L2 norm is at most `max_norm` (0 = only measure).
    Call after `sync_gradients`. Returns the norm before clipping, a float32 scalar on the device
    (identical on every rank); no host sync here."""
    dense, _ = _split_params(run)
    grads = [p.grad for p in dense if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []  # one fused kernel per dtype
    dense_sq = sum((n.float().square() for n in norms), torch.zeros((), device=run.parallel.device))
    expert_sq = _expert_norm_sq(run)
    if run.parallel.distributed:
        dist.all_reduce(expert_sq)  # collective (world): every expert's share summed once
    norm = (dense_sq + expert_sq).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        all_grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        torch._foreach_mul_(all_grads, scale.to(all_grads[0].dtype))
    return norm
