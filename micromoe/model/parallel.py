"""Parallelism applied to a single-device `MoETransformer` (the model file knows nothing of it):
expert parallelism for the MoE layers, FSDP2 for the dense parameters, activation checkpointing.

The order a training run applies them in, on a model built on the meta device:
`parallelize_model` (experts owned once, slots gathered), `shard_dense` (FSDP2 over the
data-parallel ranks, the expert masters left out), `apply_activation_checkpointing`, then
`model.init.materialize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from micromoe.model.transformer import MoETransformer
from micromoe.runtime import GroupedSwiGLU, OwnedExperts, ProcessGroups, apply_expert_parallel, link_prefetch
from micromoe.runtime.owned import GatherMode

DispatcherName = Literal["ep", "microep"]
Recompute = Literal["none", "full", "moe"]


def parallelize_model(
    model: MoETransformer,
    groups_per_layer: Sequence[ProcessGroups],
    dispatcher: DispatcherName,
    *,
    cost_model: str | None = None,
    compute_dtype: torch.dtype | None = None,
    gather: GatherMode = "micro",
    device: torch.device | None = None,
) -> MoETransformer:
    """Shard MoE layer i over `groups_per_layer[i]` (its placement and process groups) with the
    "ep" or "microep" dispatcher: every expert owned by one rank of each MicroEP group, the local
    slots gathered from the owners (in `compute_dtype`), each layer prefetching the next one's.
    Every rank must have built `model` the same way (from the same seed, or on the meta device and
    materialized afterwards). `cost_model` (MicroEP only) makes the dispatcher plan for predicted
    GPU time: a bundled name, a JSON path, "bundled" or "auto" (see `apply_expert_parallel`);
    `device` is where the model will run (pass it for a model still on the meta device).
    In place; returns `model`."""
    layers = model.moe_layers()
    if len(groups_per_layer) != len(layers):
        raise ValueError(
            f"got process groups for {len(groups_per_layer)} MoE layers, the model has {len(layers)}"
        )
    for layer, groups in zip(layers, groups_per_layer, strict=True):
        apply_expert_parallel(
            layer,
            groups,
            dispatcher,
            cost_model=cost_model,
            compute_dtype=compute_dtype,
            gather=gather,
            device=device,
        )
    link_prefetch(layers)
    return model


def expert_parameters(model: MoETransformer) -> list[torch.nn.Parameter]:
    """The expert master parameters (owned or all local), which FSDP leaves alone."""
    return [
        p for m in model.modules() if isinstance(m, (OwnedExperts, GroupedSwiGLU)) for p in m.parameters()
    ]


def shard_dense(
    model: MoETransformer,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> MoETransformer:
    """FSDP2 (`fully_shard`) over `mesh` (the data-parallel ranks) for every block and the root:
    dense parameters sharded, gathered in `param_dtype` for compute, gradients reduce-scattered
    in `reduce_dtype` during the backward. Expert masters are left out (`ignored_params`): their
    own gather brings them to the slots. In place; returns `model`."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    experts = set(expert_parameters(model))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=experts & set(block.parameters()))
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=experts)
    return model


def apply_activation_checkpointing(model: MoETransformer, recompute: Recompute) -> MoETransformer:
    """Recompute activations in the backward: "none", "full" (whole blocks) or "moe" (only the
    MoE FFNs). In place; returns `model`."""
    if recompute not in ("none", "full", "moe"):
        raise ValueError(f"activation checkpointing must be none, full or moe, got {recompute!r}")
    for block in model.blocks:
        block.recompute = recompute
    return model
