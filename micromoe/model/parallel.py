"""Apply expert parallelism to a single-device `MoETransformer` (the model file knows nothing of it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from micromoe.model.transformer import MoETransformer
from micromoe.runtime import ProcessGroups, apply_expert_parallel

DispatcherName = Literal["ep", "microep"]


def parallelize_model(
    model: MoETransformer,
    groups_per_layer: Sequence[ProcessGroups],
    dispatcher: DispatcherName,
    *,
    cost_model: str | None = None,
) -> MoETransformer:
    """Shard MoE layer i over `groups_per_layer[i]` (its placement and process groups) with the
    "ep" or "microep" dispatcher. Every rank must have built `model` from the same seed, so
    replicas start identical. `cost_model` (MicroEP only) makes the dispatcher plan for predicted
    GPU time: a bundled name, a JSON path, "bundled" or "auto" (see `apply_expert_parallel`).
    In place; returns `model`."""
    layers = model.moe_layers()
    if len(groups_per_layer) != len(layers):
        raise ValueError(
            f"got process groups for {len(groups_per_layer)} MoE layers, the model has {len(layers)}"
        )
    for layer, groups in zip(layers, groups_per_layer, strict=True):
        apply_expert_parallel(layer, groups, dispatcher, cost_model=cost_model)
    return model
