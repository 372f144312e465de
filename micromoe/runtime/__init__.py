"""micromoe.runtime: torch.distributed execution of MoE layers (plain EP and MicroEP).

Owns everything between the planner (`micromoe.plan`, pure NumPy) and a model: the validated
parallel layout and its process groups, the single-device MoE layer (router, grouped SwiGLU
experts), the token dispatchers (local reference -> all-to-all base -> plain EP and MicroEP), the
function that applies expert parallelism to a layer (every expert owned by one rank of its
MicroEP group, replica slots gathered from the owners), gradient sync of the owned experts, and
re-placement (a new gather table; weights and optimizer state stay with their owners).
It imports only `micromoe.plan`; `model` and `train` build on it.

Build a `ParallelLayout`, then `build_process_groups` once; build a single-device `MoELayer` and
`apply_expert_parallel` to it; call `sync_gradients` after backward.
"""

from micromoe.runtime.dispatch_a2a import AllToAllDispatcher
from micromoe.runtime.dispatch_ep import EPDispatcher
from micromoe.runtime.dispatch_local import DispatchMeta, LocalDispatcher, PhaseTimer
from micromoe.runtime.dispatch_microep import MicroEPDispatcher
from micromoe.runtime.experts import GroupedSwiGLU, grouped_mm, swiglu_experts
from micromoe.runtime.grad_sync import sync_dense_gradients, sync_expert_gradients, sync_gradients
from micromoe.runtime.groups import ProcessGroups, build_process_groups
from micromoe.runtime.layer import MoEConfig, MoELayer, MoEStats
from micromoe.runtime.layout import ParallelLayout
from micromoe.runtime.migrate import MigrationStats, migrate_layer
from micromoe.runtime.owned import OwnedExperts
from micromoe.runtime.parallelize import apply_expert_parallel, link_prefetch
from micromoe.runtime.router import RouterOutput, TopKRouter

__all__ = [
    "AllToAllDispatcher",
    "DispatchMeta",
    "EPDispatcher",
    "GroupedSwiGLU",
    "LocalDispatcher",
    "MicroEPDispatcher",
    "MigrationStats",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "ParallelLayout",
    "PhaseTimer",
    "ProcessGroups",
    "OwnedExperts",
    "RouterOutput",
    "TopKRouter",
    "apply_expert_parallel",
    "build_process_groups",
    "grouped_mm",
    "link_prefetch",
    "migrate_layer",
    "sync_dense_gradients",
    "sync_expert_gradients",
    "sync_gradients",
    "swiglu_experts",
]
