"""The one function that applies expert parallelism to a single-device `MoELayer`.

Legend: E experts, S local slots of this rank, H hidden, F expert FFN hidden.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from micromoe.runtime.cost_select import CostSpec, resolve_cost_model
from micromoe.runtime.dispatch_ep import EPDispatcher
from micromoe.runtime.dispatch_local import PhaseTimer
from micromoe.runtime.dispatch_microep import MicroEPDispatcher
from micromoe.runtime.groups import ProcessGroups
from micromoe.runtime.layer import MoELayer

DispatcherName = Literal["ep", "microep"]


def apply_expert_parallel(
    layer: MoELayer,
    groups: ProcessGroups,
    dispatcher: DispatcherName,
    *,
    gpus_per_node: int | None = None,
    timer: PhaseTimer | None = None,
    cost_model: CostSpec = None,
) -> MoELayer:
    """Shard `layer`'s experts to this rank's local slots and swap in a distributed dispatcher.

    The layer must hold all E experts (as built); each rank keeps the weights of the experts in
    its local slots (so replicas start identical when every rank built the layer from the same
    seed) and zeros for empty slots. In place; returns `layer`.

    Args:
        layer: a single-device MoE layer with E local slots.
        groups: the process groups; `groups.placement` says which experts this rank holds.
        dispatcher: "ep" (plain EP; needs merge factor 1 and one replica per expert) or
            "microep" (tokens scheduled over replicas in the MicroEP group).
        gpus_per_node: for MicroEP's same-node routing preference.
        timer: optional phase timer handed to the dispatcher (benchmarks): `timer.mark(name)` at
            each phase boundary of dispatch and combine.
        cost_model: MicroEP only: plan for predicted GPU time (`runtime.cost_select`): a
            `plan.cost.CostModel`, a bundled name or path, "bundled" (this GPU and the layer's
            shape) or "auto" (calibrated at start-up, ~2 s, collective over the MicroEP group).
    """
    p, cfg = groups.placement, layer.cfg
    if p.num_experts != cfg.num_experts:
        raise ValueError(f"placement has {p.num_experts} experts but the layer has {cfg.num_experts}")
    if layer.experts.num_slots != cfg.num_experts:
        raise ValueError("apply_expert_parallel needs an unsharded layer (all experts in local slots)")
    if dispatcher == "ep":
        if groups.layout.merge != 1:
            raise ValueError(f"the 'ep' dispatcher needs merge factor d=1, got d={groups.layout.merge}")
        if cost_model is not None:
            raise ValueError(
                "cost_model plans MicroEP's replica split; the 'ep' dispatcher has none: drop it"
            )
        new = EPDispatcher(groups.microep, groups.microep_rank, p, timer=timer)
    elif dispatcher == "microep":
        cost = resolve_cost_model(
            cost_model,
            hidden=cfg.hidden,
            ffn=cfg.ffn_hidden,
            device=layer.experts.w_down.device,
            group=groups.microep,
            num_slots=p.slots_per_gpu,
        )
        new = MicroEPDispatcher(
            groups.microep, groups.microep_rank, p, gpus_per_node=gpus_per_node, timer=timer, cost_model=cost
        )
    else:
        raise ValueError(f"unknown dispatcher {dispatcher!r}; use 'ep' or 'microep'")
    _shard_experts(layer, groups.local_slots)
    layer.dispatcher = new
    return layer


@torch.no_grad()
def _shard_experts(layer: MoELayer, slot_expert: tuple[int, ...]) -> None:
    ex = layer.experts
    idx = torch.tensor([max(e, 0) for e in slot_expert], device=ex.w_down.device)
    empty = torch.tensor([e < 0 for e in slot_expert], device=ex.w_down.device)
    for name in ("w_gate_up", "w_down"):
        full = getattr(ex, name)
        local = full.index_select(0, idx)
        local[empty] = 0
        setattr(ex, name, nn.Parameter(local))
    ex.num_slots = len(slot_expert)
