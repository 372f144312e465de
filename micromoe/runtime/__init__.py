"""micromoe.runtime: torch.distributed execution of MoE layers (plain EP and MicroEP).

Build a `ParallelLayout`, then `build_process_groups` once; build a single-device `MoELayer` and
`apply_expert_parallel` to it; call `sync_gradients` after backward.
"""

from micromoe.runtime.dispatch import DispatchMeta, LocalDispatcher
from micromoe.runtime.dispatch_a2a import EPDispatcher, MicroEPDispatcher
from micromoe.runtime.experts import GroupedSwiGLU, grouped_mm
from micromoe.runtime.grad_sync import sync_dense_gradients, sync_expert_gradients, sync_gradients
from micromoe.runtime.groups import ProcessGroups, ReplicaGroup, build_process_groups
from micromoe.runtime.layer import MoEConfig, MoELayer, MoEStats
from micromoe.runtime.layout import ParallelLayout
from micromoe.runtime.parallelize import apply_expert_parallel
from micromoe.runtime.router import Routing, TopKRouter

__all__ = [
    "DispatchMeta",
    "EPDispatcher",
    "GroupedSwiGLU",
    "LocalDispatcher",
    "MicroEPDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "ParallelLayout",
    "ProcessGroups",
    "ReplicaGroup",
    "Routing",
    "TopKRouter",
    "apply_expert_parallel",
    "build_process_groups",
    "grouped_mm",
    "sync_dense_gradients",
    "sync_expert_gradients",
    "sync_gradients",
]
