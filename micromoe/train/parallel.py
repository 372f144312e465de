"""The run's process layout: device, `ParallelLayout`, and one placement + process groups per MoE
layer (`ParallelState.groups`, indexed by MoE layer: the one place adaptive replacement swaps).

The process group itself is started by `launch.py` (through `runtime.timeouts.init_distributed`);
a single process needs none, except a one-rank group for mixed precision (FSDP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from micromoe.plan import Placement
from micromoe.runtime import ParallelLayout, ProcessGroups, build_process_groups
from micromoe.train.config import TrainConfig


@dataclass
class ParallelState:
    """Where this process sits.

    Attributes:
        rank, world: global rank and world size (0 and 1 without a process group).
        device: this rank's device.
        layout: the validated layout, None on a single process.
        dispatcher: "ep" or "microep".
        groups: per MoE layer, its `ProcessGroups` (placement, MicroEP group, replica groups); empty
            on a single process (the model keeps its local dispatcher).
    """

    rank: int
    world: int
    device: torch.device
    layout: ParallelLayout | None
    dispatcher: str
    groups: list[ProcessGroups] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.layout is not None

    @property
    def ep_size(self) -> int:
        """Plain-EP group size used for the counterfactual (1 on a single process)."""
        return self.layout.ep if self.layout is not None else 1

    def placements(self) -> list[list[list[int]]]:
        """slot_expert of every MoE layer's placement (JSON-ready)."""
        return [g.placement.slot_expert.tolist() for g in self.groups]


def resolve_layout(cfg: TrainConfig, world: int) -> ParallelLayout:
    """The layout from the flags: DP = world; EP defaults to half the world; d to 2 for MicroEP."""
    merge = cfg.merge if cfg.merge is not None else (2 if cfg.dispatcher == "microep" and world > 1 else 1)
    if cfg.ep is not None:
        ep = cfg.ep
    else:
        ep = max(1, world // 2) if world % 2 == 0 else world
        if merge > 1 and world // ep < merge:
            ep = max(1, world // merge)
    if cfg.dispatcher == "ep" and merge != 1:
        raise ValueError(f"--dispatcher ep runs plain EP and needs --merge 1, got --merge {merge}")
    return ParallelLayout(world_size=world, dp=cfg.dp if cfg.dp is not None else world, ep=ep, merge=merge)


def build_placement(cfg: TrainConfig, layout: ParallelLayout, num_experts: int, layer: int) -> Placement:
    """MoE layer `layer`'s initial placement over one MicroEP group of d*EP GPUs.

    Plain EP (d = 1) holds each expert once. With d > 1: `symmetric` is the shuffled Cayley
    layout, `random` a random shuffle (seeded by seed + layer), `asymmetric` the load-aware builder
    under uniform expected loads (adaptive replacement later re-places it on measured loads).
    """
    g, d = layout.microep_size, layout.merge
    if d == 1:
        return Placement.expert_parallel(g, num_experts, 1)
    if cfg.placement == "symmetric":
        return Placement.symmetric(g, num_experts, d)
    if cfg.placement == "random":
        return Placement.random(g, num_experts, d, seed=cfg.seed + layer)
    slots_per_gpu = num_experts * d // g
    return Placement.asymmetric(np.ones(num_experts), g, slots_per_gpu, seed=cfg.seed + layer)


def build_groups(layout: ParallelLayout, placements: list[Placement], rank: int) -> list[ProcessGroups]:
    """Process groups with each MoE layer's placement; the groups themselves are built once and
    shared (they do not depend on the placement). Collective over the world: every rank calls
    this with identical placements."""
    for p in placements:
        layout.check_placement(p)
    base = build_process_groups(layout, placements[0], rank)
    return [dataclasses.replace(base, placement=p) for p in placements]
