"""Raw slot generators: slot tables built by rule or at random, without scoring them.

Legend: G GPUs, E experts, S local slots per GPU, d replicas per expert.

Every generator returns `slot_expert` int64 [G, S] (-1 = empty) that obeys the local-slot rule:
each slot index j is split into disjoint replica groups, one per expert placed in that slot.
With 2 replicas a layout is a multigraph on GPUs (an expert = an edge between its two hosts) whose
slot indices are perfect matchings. The builders that pick among these by balance are in
`layouts.py`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray, positive_int

# --------------------------------------------------------------------------------------------
# plain EP


def expert_parallel_slots(num_gpus: int, num_experts: int, replicas: int = 1) -> IntArray:
    """EP repeated `replicas` times: GPU g holds experts (g % ep) * S .. + S - 1, ep = G / replicas.

    This is the one statement of the plain-EP rule (expert e lives on GPU e // (E / G) for d = 1).
    """
    _check_replicas(num_gpus, num_experts, replicas, need_divisible=True)
    ep = num_gpus // replicas
    if num_experts % ep:  # (E * d is then a multiple of G as well)
        raise ValueError(
            f"plain EP needs experts divisible by GPUs: {num_experts} experts on {ep} GPUs "
            f"(per replica group); change the expert or GPU count"
        )
    per_gpu = num_experts // ep
    g = np.arange(num_gpus)[:, None] % ep
    return (g * per_gpu + np.arange(per_gpu)[None, :]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# random and the paper's Cayley graphs


def random_slots(num_gpus: int, num_experts: int, replicas: int, rng: np.random.Generator) -> IntArray:
    """Each slot index gets E/S experts at random, each on a random disjoint group of `replicas` GPUs."""
    check_sizes(num_gpus, num_experts, replicas)
    per_slot = num_gpus // replicas
    num_slots = num_experts * replicas // num_gpus
    experts = rng.permutation(num_experts)
    slots = np.full((num_gpus, num_slots), -1, dtype=np.int64)
    for j in range(num_slots):
        gpus = rng.permutation(num_gpus).reshape(per_slot, replicas)
        for k, e in enumerate(experts[j * per_slot : (j + 1) * per_slot]):
            slots[gpus[k], j] = e
    return slots


def cayley_slots(num_gpus: int, num_experts: int) -> IntArray | None:
    """The paper's Cayley-graph layouts (2 replicas) for its four sizes, or None for other sizes:
    8 GPUs/8 experts = the cycle C8, 8/16 = K_{4,4}, 16/32 = the 4x4 torus, 8/32 = K_8 plus a
    perfect matching."""
    matchings = _paper_cayley_matchings(num_gpus, num_experts)
    if matchings is None:
        return None
    return _slots_from_matchings(num_gpus, matchings)


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


# --------------------------------------------------------------------------------------------
# load-aware packing (uneven replica counts)


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


def packed_columns(
    loads: npt.NDArray[np.float64], num_gpus: int, slots_per_gpu: int
) -> list[list[tuple[int, int]]]:
    """Replica counts by load per replica (every slot used), packed into slot indices: the
    deterministic part of `packed_slots`, for callers that sample the GPUs many times."""
    reps = replica_counts_for(loads, num_gpus * slots_per_gpu, num_gpus)
    return pack_columns(np.asarray(loads, dtype=np.float64), reps, num_gpus, slots_per_gpu)


def packed_slots(
    loads: npt.NDArray[np.float64], num_gpus: int, slots_per_gpu: int, rng: np.random.Generator
) -> IntArray:
    """Replica counts by load per replica, packed into slot indices, GPUs of each group at random."""
    return random_gpus(packed_columns(loads, num_gpus, slots_per_gpu), num_gpus, slots_per_gpu, rng)


def random_gpus(
    columns: list[list[tuple[int, int]]], num_gpus: int, slots_per_gpu: int, rng: np.random.Generator
) -> IntArray:
    """slot_expert int64 [G, S] (-1 empty): column j's groups (expert, replicas) on GPUs drawn at
    random for slot index j, one permutation of the GPUs per column."""
    slots = np.full((num_gpus, slots_per_gpu), -1, dtype=np.int64)
    for j, column in enumerate(columns):
        perm = rng.permutation(num_gpus)
        at = 0
        for e, r in column:
            slots[perm[at : at + r], j] = e
            at += r
    return slots


def pack_columns(
    loads, reps, num_gpus: int, num_slots: int, *, fill: bool = True
) -> list[list[tuple[int, int]]]:
    """First-fit decreasing of replica groups (expert, replicas) into slot indices of width num_gpus.

    An expert that fits nowhere is shrunk to the largest free width; with `fill`, free width left
    at the end goes, one replica at a time, to the hottest-per-replica expert of that column
    (without it, leftover slots stay empty).
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
        while fill and free[j] > 0 and columns[j]:
            item = max(columns[j], key=lambda it: (loads[it[0]] / it[1], -it[0]))
            item[1] += 1
            free[j] -= 1
    return [[(e, r) for e, r in col] for col in columns]


def check_sizes(num_gpus: int, num_experts: int, replicas: int, *, need_divisible: bool = True) -> None:
    """ValueError unless E experts x d replicas fill G GPUs evenly (and d divides G if asked)."""
    _check_replicas(num_gpus, num_experts, replicas, need_divisible=need_divisible)
    if (num_experts * replicas) % num_gpus:
        raise ValueError(
            f"num_experts*replicas = {num_experts * replicas} must be a multiple of num_gpus={num_gpus} "
            "for a layout with equal slots per GPU"
        )


def _check_replicas(num_gpus: int, num_experts: int, replicas: int, *, need_divisible: bool) -> None:
    for name, v in (("num_gpus", num_gpus), ("num_experts", num_experts), ("replicas", replicas)):
        positive_int(v, name)
    if replicas > num_gpus:
        raise ValueError(f"replicas={replicas} exceeds num_gpus={num_gpus}: replicas sit on distinct GPUs")
    if need_divisible and num_gpus % replicas:
        raise ValueError(
            f"replicas={replicas} must divide num_gpus={num_gpus} so every slot splits into replica groups"
        )
