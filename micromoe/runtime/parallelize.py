"""The one function that applies expert parallelism to a single-device `MoELayer`.

Legend: E experts, S local slots of this rank, H hidden, F expert FFN hidden.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from micromoe.plan.ownership import expert_owners, gather_table
from micromoe.runtime.cost_select import CostSpec, resolve_cost_model
from micromoe.runtime.dispatch_ep import EPDispatcher
from micromoe.runtime.dispatch_local import PhaseTimer
from micromoe.runtime.dispatch_microep import MicroEPDispatcher
from micromoe.runtime.groups import ProcessGroups
from micromoe.runtime.layer import MoELayer
from micromoe.runtime.owned import GatherMode, OwnedExperts

DispatcherName = Literal["ep", "microep"]


def apply_expert_parallel(
    layer: MoELayer,
    groups: ProcessGroups,
    dispatcher: DispatcherName,
    *,
    gpus_per_node: int | None = None,
    timer: PhaseTimer | None = None,
    cost_model: CostSpec = None,
    owners: npt.ArrayLike | None = None,
    compute_dtype: torch.dtype | None = None,
    gather: GatherMode = "micro",
    device: torch.device | None = None,
) -> MoELayer:
    """Give each expert one owner in the MicroEP group and swap in a distributed dispatcher.

    The layer must hold all E experts (as built, the same on every rank: build it from the same
    seed). Each rank keeps the master weights of the experts it owns (`layer.experts` becomes an
    `OwnedExperts`); its local slots are filled from the owners before every use. In place;
    returns `layer`.

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
        owners: int [E], the owning GPU (MicroEP-group index) of every expert; default
            `plan.ownership.expert_owners(placement)`. Keep them when the placement changes.
        compute_dtype: dtype of the gathered slot copies (None: the masters' dtype).
        gather: "micro" (gather per forward) or "step" (once per optimizer step; see
            `runtime.owned`).
        device: where the layer will run (for the cost model's calibration); default the
            layer's (pass it when the layer is still on the meta device).
    """
    p, cfg = groups.placement, layer.cfg
    if p.num_experts != cfg.num_experts:
        raise ValueError(f"placement has {p.num_experts} experts but the layer has {cfg.num_experts}")
    if isinstance(layer.experts, OwnedExperts) or layer.experts.num_slots != cfg.num_experts:
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
            device=device or layer.experts.w_down.device,
            group=groups.microep,
            num_slots=p.slots_per_gpu,
        )
        new = MicroEPDispatcher(
            groups.microep, groups.microep_rank, p, gpus_per_node=gpus_per_node, timer=timer, cost_model=cost
        )
    else:
        raise ValueError(f"unknown dispatcher {dispatcher!r}; use 'ep' or 'microep'")
    owners = expert_owners(p) if owners is None else np.asarray(owners, dtype=np.int64)
    table = gather_table(p, owners, groups.microep_rank)
    ex = layer.experts
    idx = torch.from_numpy(table.owned).to(ex.w_down.device)
    layer.experts = OwnedExperts(
        ex.w_gate_up.detach().index_select(0, idx),
        ex.w_down.detach().index_select(0, idx),
        table,
        groups.gather,
        compute_dtype=compute_dtype,
        gather=gather,
        owners=owners,
    )
    layer.dispatcher = new
    return layer


def link_prefetch(layers: list[MoELayer]) -> None:
    """Let each MoE layer's experts prefetch the next layer's slots during its forward (layers in
    forward order; all must be expert-parallel)."""
    owned = [m.experts for m in layers]
    for cur, nxt in zip(owned, owned[1:] + [None], strict=True):
        if not isinstance(cur, OwnedExperts):
            raise ValueError("link_prefetch needs layers made expert-parallel by apply_expert_parallel")
        cur.set_next(nxt)
