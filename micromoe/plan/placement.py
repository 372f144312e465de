"""`Placement`: the slot layout the planner and the runtime take, with its named builders.

A `Placement` is a validated `SlotLayout` (see `slot_layout.py` for the slot table, the replica
CSR lists and the local-slot rule). This subclass only adds the discoverable constructors; it sits
above the builders (`slots.py`, `layouts.py`) so that the imports of `micromoe.plan` run one way.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from micromoe.plan.layouts import asymmetric_slots, symmetric_slots
from micromoe.plan.slot_layout import SlotLayout
from micromoe.plan.slots import expert_parallel_slots, random_slots


class Placement(SlotLayout):
    """Replica layout of one MoE layer over a MicroEP group: a validated slot table.

    Build one with `from_slots` (any table that obeys the rules) or a named builder below.
    See `SlotLayout` for the attributes (`slot_expert` [G, S], the replica CSR lists, ...).
    """

    @classmethod
    def expert_parallel(cls, num_gpus: int, num_experts: int, replicas: int = 1) -> Placement:
        """Plain EP repeated `replicas` times: the unshuffled baseline (replica sets identical or disjoint)."""
        return cls.from_slots(expert_parallel_slots(num_gpus, num_experts, replicas), num_experts)

    @classmethod
    def symmetric(cls, num_gpus: int, num_experts: int, replicas: int = 2) -> Placement:
        """Shuffled symmetric layout (Cayley graphs for the paper's sizes, a scored construction otherwise)."""
        return cls.from_slots(symmetric_slots(num_gpus, num_experts, replicas), num_experts)

    @classmethod
    def random(cls, num_gpus: int, num_experts: int, replicas: int = 2, seed: int = 0) -> Placement:
        """Uniformly shuffled symmetric layout that respects the local-slot rule."""
        rng = np.random.default_rng(seed)
        return cls.from_slots(random_slots(num_gpus, num_experts, replicas, rng), num_experts)

    @classmethod
    def asymmetric(
        cls,
        expected_loads: npt.ArrayLike,
        num_gpus: int,
        slots_per_gpu: int,
        *,
        seed: int = 0,
        num_samples: int = 64,
    ) -> Placement:
        """Load-aware layout: more replicas for hot experts, best of `num_samples` sampled layouts."""
        loads = np.asarray(expected_loads, dtype=np.float64)
        slots = asymmetric_slots(loads, num_gpus, slots_per_gpu, seed=seed, num_samples=num_samples)
        return cls.from_slots(slots, loads.size)
