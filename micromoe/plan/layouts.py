"""Placement builders: plain EP, symmetric (Cayley graphs), random, and load-aware asymmetric.

Every builder returns `slot_expert` int64 [G, S] (-1 = empty) that obeys the local-slot rule: each
slot index j is split into disjoint replica groups, one per expert placed in that slot.
With 2 replicas a layout is a multigraph on GPUs (an expert = an edge between its two hosts) whose
slot indices are perfect matchings; balance under skew depends on how well that graph expands.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

from micromoe.plan.placement import IntArray, Placement

# --------------------------------------------------------------------------------------------
# plain EP


def expert_parallel_slots(num_gpus: int, num_experts: int, replicas: int = 1) -> IntArray:
    """EP repeated `replicas` times: GPU g holds experts (g % ep) * S .. + S - 1, ep = G / replicas."""
    _check_sizes(num_gpus, num_experts, replicas)
    ep = num_gpus // replicas
    if num_experts % ep:
        raise ValueError(f"plain EP over {ep} GPUs needs num_experts divisible by {ep}, got {num_experts}")
    per_gpu = num_experts // ep
    g = np.arange(num_gpus)[:, None] % ep
    return (g * per_gpu + np.arange(per_gpu)[None, :]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# random and symmetric


def random_slots(num_gpus: int, num_experts: int, replicas: int, rng: np.random.Generator) -> IntArray:
    """Each slot index gets E/S experts at random, each on a random disjoint group of `replicas` GPUs."""
    _check_sizes(num_gpus, num_experts, replicas)
    per_slot = num_gpus // replicas
    num_slots = num_experts * replicas // num_gpus
    experts = rng.permutation(num_experts)
    slots = np.full((num_gpus, num_slots), -1, dtype=np.int64)
    for j in range(num_slots):
        gpus = rng.permutation(num_gpus).reshape(per_slot, replicas)
        for k, e in enumerate(experts[j * per_slot : (j + 1) * per_slot]):
            slots[gpus[k], j] = e
    return slots


def symmetric_slots(num_gpus: int, num_experts: int, replicas: int = 2) -> IntArray:
    """Symmetric shuffled layout: every expert gets `replicas` replicas, every slot is full.

    The paper's Cayley-graph constructions for its four sizes (2 replicas): 8 GPUs/8 experts = the
    cycle C8, 8/16 = K_{4,4}, 16/32 = the 4x4 torus, 8/32 = K_8 plus a perfect matching. Other sizes:
    among a fixed, seeded set of random layouts, the one with the best balance under a fixed
    family of Zipf-skewed loads (deterministic: the same sizes give the same layout everywhere).
    When `replicas` does not divide num_gpus, a slot index cannot hold only groups of that size:
    replica counts then differ by at most a few around `replicas` (the packing of `asymmetric`).
    """
    _check_sizes(num_gpus, num_experts, replicas, need_divisible=False)
    return _symmetric_cached(num_gpus, num_experts, replicas).copy()


@lru_cache(maxsize=64)
def _symmetric_cached(num_gpus: int, num_experts: int, replicas: int) -> IntArray:
    if replicas == 1:
        return expert_parallel_slots(num_gpus, num_experts, 1)
    if replicas == 2:
        matchings = _paper_cayley_matchings(num_gpus, num_experts)
        if matchings is not None:
            return _slots_from_matchings(num_gpus, matchings)
    probes = _probe_loads(num_experts)
    best, best_score = None, np.inf
    for seed in range(16):
        rng = np.random.default_rng(seed)
        if num_gpus % replicas:
            slots = _packed_slots(np.ones(num_experts), num_gpus, num_experts * replicas // num_gpus, rng)
        else:
            slots = random_slots(num_gpus, num_experts, replicas, rng)
        score = _skew_score(slots, num_experts, probes)
        if score < best_score:
            best, best_score = slots, score
    return best


def _paper_cayley_matchings(num_gpus: int, num_experts: int) -> list[list[tuple[int, int]]] | None:
    """Perfect matchings of the paper's Cayley graphs, or None for other sizes."""
    if (num_gpus, num_experts) == (8, 8):  # cycle C8 = even edges + odd edges
        return [[(i, i + 1) for i in range(0, 8, 2)], [(i, (i + 1) % 8) for i in range(1, 8, 2)]]
    if (num_gpus, num_experts) == (8, 16):  # K_{4,4}, parts {0..3} and {4..7}
        return [[(i, 4 + (i + k) % 4) for i in range(4)] for k in range(4)]
    if (num_gpus, num_experts) == (16, 32):  # 4x4 torus: rows and columns, each 4-cycle split in two
        out = []
        for step in (1, 4):
            for parity in (0, 1):
                pairs = []
                for a in range(4):
                    for b in range(parity, 4, 2):
                        u = a * 4 + b if step == 1 else b * 4 + a
                        v = a * 4 + (b + 1) % 4 if step == 1 else ((b + 1) % 4) * 4 + a
                        pairs.append((u, v))
                out.append(pairs)
        return out
    if (num_gpus, num_experts) == (8, 32):  # K_8 (7 round-robin matchings) + one more matching
        rounds = _round_robin(8)
        return rounds + [rounds[0]]
    return None


def _round_robin(n: int) -> list[list[tuple[int, int]]]:
    """The circle-method 1-factorization of K_n (n even): n-1 perfect matchings."""
    rounds = []
    for k in range(n - 1):
        pairs = [(n - 1, k)]
        for i in range(1, n // 2):
            pairs.append(((k + i) % (n - 1), (k - i) % (n - 1)))
        rounds.append(pairs)
    return rounds


def _slots_from_matchings(num_gpus: int, matchings: list[list[tuple[int, int]]]) -> IntArray:
    slots = np.full((num_gpus, len(matchings)), -1, dtype=np.int64)
    e = 0
    for j, pairs in enumerate(matchings):
        for u, v in pairs:
            slots[[u, v], j] = e
            e += 1
    return slots


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
    from micromoe.plan.density import balance_ratio

    p = Placement.from_slots(slots, num_experts)
    return float(sum(balance_ratio(load, p) for load in probes))


# --------------------------------------------------------------------------------------------
# asymmetric, load-aware


def replica_counts_for(expected_loads: npt.ArrayLike, total_slots: int, max_replicas: int) -> IntArray:
    """One replica each, then each spare slot to the expert with the largest load per replica.

    Ties go to the lower expert id, so every rank gets the same counts.
    """
    loads = np.asarray(expected_loads, dtype=np.float64)
    num_experts = loads.size
    if total_slots < num_experts:
        raise ValueError(f"{total_slots} slots cannot hold {num_experts} experts (each needs >= 1 replica)")
    reps = np.ones(num_experts, dtype=np.int64)
    for _ in range(total_slots - num_experts):
        per = np.where(reps < max_replicas, loads / reps, -np.inf)
        best = int(np.argmax(per))
        if per[best] == -np.inf:
            break
        reps[best] += 1
    return reps


def asymmetric_slots(
    expected_loads: npt.ArrayLike, num_gpus: int, slots_per_gpu: int, *, seed: int = 0, num_samples: int = 64
) -> IntArray:
    """Load-aware layout: replica counts by load per replica, packed into slot indices, the GPUs of
    each replica group sampled `num_samples` times; keeps the sample with the lowest T* under the
    expected loads (the density lemma)."""
    loads = _check_loads(expected_loads)
    if num_gpus < 1 or slots_per_gpu < 1:
        raise ValueError(f"need num_gpus >= 1 and slots_per_gpu >= 1, got {num_gpus}, {slots_per_gpu}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    int_loads = integer_loads(loads)
    rng = np.random.default_rng(seed)
    best, best_t = None, None
    from micromoe.plan.density import lp_optimum_fraction

    for _ in range(num_samples):
        slots = _packed_slots(loads, num_gpus, slots_per_gpu, rng)
        t = lp_optimum_fraction(int_loads, Placement.from_slots(slots, loads.size))
        if best_t is None or t < best_t:
            best, best_t = slots, t
    return best


def _packed_slots(loads, num_gpus: int, slots_per_gpu: int, rng: np.random.Generator) -> IntArray:
    """Replica counts by load per replica, packed into slot indices, GPUs of each group at random."""
    reps = replica_counts_for(loads, num_gpus * slots_per_gpu, num_gpus)
    columns = _pack_columns(np.asarray(loads, dtype=np.float64), reps, num_gpus, slots_per_gpu)
    slots = np.full((num_gpus, slots_per_gpu), -1, dtype=np.int64)
    for j, column in enumerate(columns):
        perm = rng.permutation(num_gpus)
        at = 0
        for e, r in column:
            slots[perm[at : at + r], j] = e
            at += r
    return slots


def _pack_columns(loads, reps, num_gpus: int, num_slots: int) -> list[list[tuple[int, int]]]:
    """First-fit decreasing of replica groups into slot indices of width num_gpus.

    An expert that fits nowhere is shrunk to the largest free width; free width left at the end
    goes, one replica at a time, to the hottest-per-replica expert of that column.
    """
    order = sorted(range(loads.size), key=lambda e: (-reps[e], -loads[e], e))
    free = [num_gpus] * num_slots
    columns: list[list[list[int]]] = [[] for _ in range(num_slots)]
    for e in order:
        r = int(reps[e])
        j = next((j for j in range(num_slots) if free[j] >= r), None)
        if j is None:
            j = max(range(num_slots), key=lambda k: (free[k], -k))
            r = free[j]
            if r < 1:
                raise ValueError("cannot pack experts into slots: more experts than slots")
        columns[j].append([e, r])
        free[j] -= r
    for j in range(num_slots):
        while free[j] > 0 and columns[j]:
            item = max(columns[j], key=lambda it: (loads[it[0]] / it[1], -it[0]))
            item[1] += 1
            free[j] -= 1
    return [[(e, r) for e, r in col] for col in columns]


def integer_loads(loads: npt.NDArray[np.float64]) -> IntArray:
    """Expected (float) loads scaled to about 10^7 integer tokens, for the exact density oracle."""
    total = loads.sum()
    if total <= 0:
        return np.ones(loads.size, dtype=np.int64)
    return np.round(loads * (1e7 / total)).astype(np.int64)


def _check_loads(expected_loads: npt.ArrayLike) -> npt.NDArray[np.float64]:
    loads = np.asarray(expected_loads, dtype=np.float64)
    if loads.ndim != 1 or loads.size < 1:
        raise ValueError(f"expected_loads must be a non-empty 1-D array, got shape {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise ValueError("expected_loads must be finite and >= 0")
    return loads


def _check_sizes(num_gpus: int, num_experts: int, replicas: int, *, need_divisible: bool = True) -> None:
    for name, v in (("num_gpus", num_gpus), ("num_experts", num_experts), ("replicas", replicas)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if replicas > num_gpus:
        raise ValueError(f"replicas={replicas} exceeds num_gpus={num_gpus}: replicas sit on distinct GPUs")
    if need_divisible and num_gpus % replicas:
        raise ValueError(
            f"replicas={replicas} must divide num_gpus={num_gpus} so every slot splits into replica groups"
        )
    if (num_experts * replicas) % num_gpus:
        raise ValueError(
            f"num_experts*replicas = {num_experts * replicas} must be a multiple of num_gpus={num_gpus} "
            "for a layout with equal slots per GPU"
        )
