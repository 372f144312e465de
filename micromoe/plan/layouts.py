"""Layout builders that score their candidates: symmetric (Cayley graphs or the best of seeded
random layouts) and load-aware asymmetric.

Legend: G GPUs, E experts, S local slots per GPU, d replicas per expert.

Both return `slot_expert` int64 [G, S] (-1 = empty) obeying the local-slot rule; candidates come
from the raw generators in `slots.py` and are compared with the density lemma (`density.py`),
the exact optimal max load a layout allows for given loads.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray, as_expected_loads, positive_int
from micromoe.plan.density import balance_ratio, lp_optimum_fraction
from micromoe.plan.slot_layout import SlotLayout
from micromoe.plan.slots import (
    cayley_slots,
    check_sizes,
    expert_parallel_slots,
    packed_columns,
    packed_slots,
    random_gpus,
    random_slots,
)

# --------------------------------------------------------------------------------------------
# symmetric


def symmetric_slots(num_gpus: int, num_experts: int, replicas: int = 2) -> IntArray:
    """Symmetric shuffled layout: every expert gets `replicas` replicas, every slot is full.

    The paper's Cayley-graph constructions for its four sizes (2 replicas, see
    `slots.cayley_slots`). Other sizes: among a fixed, seeded set of random layouts, the one with
    the best balance under a fixed family of Zipf-skewed loads (deterministic: the same sizes give
    the same layout everywhere). When `replicas` does not divide num_gpus, a slot index cannot hold
    only groups of that size: replica counts then differ by at most a few around `replicas` (the
    packing of `asymmetric_slots`).
    """
    check_sizes(num_gpus, num_experts, replicas, need_divisible=False)
    return _symmetric_cached(int(num_gpus), int(num_experts), int(replicas)).copy()


@lru_cache(maxsize=64)
def _symmetric_cached(num_gpus: int, num_experts: int, replicas: int) -> IntArray:
    if replicas == 1:
        return expert_parallel_slots(num_gpus, num_experts, 1)
    if replicas == 2:
        slots = cayley_slots(num_gpus, num_experts)
        if slots is not None:
            return slots
    probes = _probe_loads(num_experts)
    best, best_score = None, np.inf
    for seed in range(16):
        rng = np.random.default_rng(seed)
        if num_gpus % replicas:
            slots = packed_slots(np.ones(num_experts), num_gpus, num_experts * replicas // num_gpus, rng)
        else:
            slots = random_slots(num_gpus, num_experts, replicas, rng)
        score = _skew_score(slots, num_experts, probes)
        if score < best_score:
            best, best_score = slots, score
    return best


def _probe_loads(num_experts: int) -> list[IntArray]:
    """Fixed skewed loads to score symmetric candidates: Zipf s = 0.8 and 1.2, shuffled hot sets."""
    rng = np.random.default_rng(12345)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    out = []
    for s in (0.8, 1.2):
        w = ranks**-s
        for _ in range(4):
            out.append(np.round(1e6 * w[rng.permutation(num_experts)] / w.sum()).astype(np.int64))
    return out


def _skew_score(slots: IntArray, num_experts: int, probes: list[IntArray]) -> float:
    layout = SlotLayout.from_slots(slots, num_experts)
    return float(sum(balance_ratio(load, layout) for load in probes))


# --------------------------------------------------------------------------------------------
# asymmetric, load-aware


def asymmetric_slots(
    expected_loads: npt.ArrayLike, num_gpus: int, slots_per_gpu: int, *, seed: int = 0, num_samples: int = 64
) -> IntArray:
    """Load-aware layout: replica counts by load per replica, packed into slot indices, the GPUs of
    each replica group sampled `num_samples` times; keeps the sample with the lowest T* under the
    expected loads (the density lemma)."""
    loads = as_expected_loads(expected_loads)
    positive_int(num_gpus, "num_gpus")
    positive_int(slots_per_gpu, "slots_per_gpu")
    positive_int(num_samples, "num_samples")
    int_loads = integer_loads(loads)
    rng = np.random.default_rng(seed)
    columns = packed_columns(loads, num_gpus, slots_per_gpu)  # the same for every sample
    best, best_t = None, None
    for _ in range(num_samples):
        slots = random_gpus(columns, num_gpus, slots_per_gpu, rng)
        t = lp_optimum_fraction(int_loads, SlotLayout.from_slots(slots, loads.size))
        if best_t is None or t < best_t:
            best, best_t = slots, t
    return best


def integer_loads(loads: npt.NDArray[np.float64]) -> IntArray:
    """Expected (float) loads scaled to about 10^7 integer tokens, for the exact density oracle."""
    total = loads.sum()
    if total <= 0:
        return np.ones(loads.size, dtype=np.int64)
    return np.round(loads * (1e7 / total)).astype(np.int64)
