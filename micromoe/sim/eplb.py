"""DeepSeek EPLB's published placement algorithm (global policy), in NumPy, for one layer.

Legend: E logical experts, P physical expert slots (P = G * S), G GPUs, S slots per GPU.

1. `replicate_experts`: every expert gets one replica; each further replica goes to the expert with
   the largest load per replica (ties to the lower id, as torch's max does).
2. `balanced_packing`: replicas in decreasing order of load per replica, each to the GPU with the
   least load among GPUs that still have a free slot.
EPLB then splits an expert's tokens evenly over its replicas in every micro-batch (`even_quota`).
Two replicas of one expert may land on the same GPU, as in the original.
With one node and one expert group, EPLB's hierarchical policy reduces to exactly this.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray


def replicate_experts(loads: npt.ArrayLike, num_slots: int) -> IntArray:
    """phy2log int64 [P]: the expert of each physical slot (first the E originals, then extras).

    loads: float [E] >= 0, the expected per-expert load; num_slots: P >= E.
    """
    w = np.asarray(loads, dtype=np.float64)
    num_experts = w.size
    if num_slots < num_experts:
        raise ValueError(
            f"EPLB needs at least one slot per expert: {num_slots} slots < {num_experts} experts"
        )
    phy2log = np.empty(num_slots, dtype=np.int64)
    phy2log[:num_experts] = np.arange(num_experts)
    logcnt = np.ones(num_experts, dtype=np.int64)
    for i in range(num_experts, num_slots):
        e = int(np.argmax(w / logcnt))
        phy2log[i] = e
        logcnt[e] += 1
    return phy2log


def balanced_packing(weights: npt.ArrayLike, num_packs: int) -> IntArray:
    """pack int64 [P]: the pack (GPU) of each item, P / num_packs items per pack, greedy by weight.

    Items are taken heaviest first (stable order for ties) and each goes to the lightest pack
    that is not yet full (lowest id on ties).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size % num_packs:
        raise ValueError(f"{w.size} items do not split evenly into {num_packs} packs")
    per_pack = w.size // num_packs
    pack = np.empty(w.size, dtype=np.int64)
    pack_weight = np.zeros(num_packs)
    pack_items = np.zeros(num_packs, dtype=np.int64)
    for i in np.argsort(-w, kind="stable"):
        open_packs = np.flatnonzero(pack_items < per_pack)
        p = int(open_packs[np.argmin(pack_weight[open_packs])])
        pack[i] = p
        pack_weight[p] += w[i]
        pack_items[p] += 1
    return pack


def eplb_slots(loads: npt.ArrayLike, num_gpus: int, slots_per_gpu: int) -> IntArray:
    """slot_expert int64 [G, S]: EPLB's placement of one layer for expected per-expert loads [E]."""
    w = np.asarray(loads, dtype=np.float64)
    phy2log = replicate_experts(w, num_gpus * slots_per_gpu)
    logcnt = np.bincount(phy2log, minlength=w.size)
    pack = balanced_packing(w[phy2log] / logcnt[phy2log], num_gpus)
    slots = np.empty((num_gpus, slots_per_gpu), dtype=np.int64)
    fill = np.zeros(num_gpus, dtype=np.int64)
    for phy, g in enumerate(pack):
        slots[g, fill[g]] = phy2log[phy]
        fill[g] += 1
    return slots


def even_quota(loads: npt.ArrayLike, slot_expert: npt.ArrayLike) -> IntArray:
    """quota int64 [E, G]: each expert's load split evenly over its replicas (remainder to the
    replicas in slot-major order: GPU 0's slots first).

    loads: int [E]; slot_expert: int [G, S], every expert present at least once.
    """
    load = np.asarray(loads, dtype=np.int64)
    slots = np.asarray(slot_expert, dtype=np.int64)
    num_gpus = slots.shape[0]
    flat = slots.ravel()
    reps = np.bincount(flat, minlength=load.size)
    # rank of each replica among its expert's replicas, in flat (GPU-major) order
    order = np.argsort(flat, kind="stable")
    rank = np.empty_like(flat)
    starts = np.concatenate(([0], np.cumsum(reps)[:-1]))
    rank[order] = np.arange(flat.size) - np.repeat(starts, reps)
    per = load[flat] // reps[flat] + (rank < load[flat] % reps[flat])
    quota = np.zeros((load.size, num_gpus), dtype=np.int64)
    np.add.at(quota, (flat, np.repeat(np.arange(num_gpus), slots.shape[1])), per)
    return quota
