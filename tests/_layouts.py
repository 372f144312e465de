"""Random layouts for the planner's property tests."""

from __future__ import annotations

import numpy as np

from micromoe.plan import Placement


def any_slot_layout(rng: np.random.Generator, num_gpus: int, num_slots: int, fill: float) -> Placement:
    """An arbitrary layout that obeys the local-slot rule: each slot index is split into random
    groups of GPUs, each group holding a new expert with probability `fill` (else left empty), so
    replica counts are uneven and slots may be empty."""
    slots = np.full((num_gpus, num_slots), -1, dtype=np.int64)
    e = 0
    for j in range(num_slots):
        perm = rng.permutation(num_gpus)
        cuts = []
        if num_gpus > 1:
            cuts = np.sort(rng.choice(np.arange(1, num_gpus), size=rng.integers(0, num_gpus), replace=False))
        for group in np.split(perm, cuts):
            if rng.random() < fill:
                slots[group, j] = e
                e += 1
    if e == 0:
        slots[0, 0], e = 0, 1
    return Placement.from_slots(slots, e)
