"""Predicted expert time of a plan under a cost model (`micromoe simulate --cost-model`).

Legend: G GPUs, E experts, S local slots per GPU, M micro-batches, L layers.

A balancer's quota [E, G] gives each GPU the rows of the experts it serves; each becomes one local
slot's rows, padded to `ROW_ALIGN` as the dispatchers pad them, and the model predicts the GPU's
forward+backward expert time. An expert with several local slots on one GPU (EPLB may place two
replicas there, each its own weight copy and GEMM group) has its quota split evenly over them, as
EPLB's even split does: one group of 2n rows and two of n cost differently.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.checks import FloatArray, IntArray
from micromoe.plan.cost import ROW_ALIGN, CostModel


def local_slot_rows(quota_EG: IntArray, slots_per_gpu: int, slots_EG: IntArray | None = None) -> IntArray:
    """int64 [G, S]: each GPU's rows per local slot, largest first, zero-padded (not row-aligned).

    quota_EG: int [E, G] rows of expert e on GPU g. slots_EG: int [E, G] local slots expert e has on
    GPU g; its quota there is split evenly over them (the first `quota % slots` get one row more).
    None means one slot per expert a GPU serves.
    """
    quota = np.asarray(quota_EG, dtype=np.int64)
    num_experts, num_gpus = quota.shape
    busy = quota > 0
    mult = (
        busy.astype(np.int64) if slots_EG is None else np.where(busy, np.asarray(slots_EG, dtype=np.int64), 0)
    )
    assert np.all(mult[busy] >= 1), "a GPU has rows of an expert it holds no slot of"
    reps, vals = mult.T.ravel(), quota.T.ravel()  # GPU-major: entry g * E + e
    pair = np.repeat(np.arange(reps.size), reps)
    rank = np.arange(pair.size) - np.repeat(np.cumsum(reps) - reps, reps)
    part = vals[pair] // reps[pair] + (rank < vals[pair] % reps[pair])
    gpu = pair // num_experts
    per_gpu = np.bincount(gpu, minlength=num_gpus)
    assert np.all(per_gpu <= slots_per_gpu), "a GPU serves more slots than it has"
    order = np.lexsort((-part, gpu))  # by GPU, largest slot first
    pos = np.arange(pair.size) - np.repeat(np.cumsum(per_gpu) - per_gpu, per_gpu)
    out = np.zeros((num_gpus, slots_per_gpu), dtype=np.int64)
    out[gpu[order], pos] = part[order]
    return out


def slot_rows(quota_EG: IntArray, slots_per_gpu: int, slots_EG: IntArray | None = None) -> IntArray:
    """int64 [G, S]: `local_slot_rows` padded to ROW_ALIGN, as the dispatchers pad each slot."""
    rows = local_slot_rows(quota_EG, slots_per_gpu, slots_EG)
    return -(-rows // ROW_ALIGN) * ROW_ALIGN


def predict_quota(
    model: CostModel, quota_EG: IntArray, slots_per_gpu: int, slots_EG: IntArray | None = None
) -> FloatArray:
    """float64 [G]: predicted expert time (us) of every GPU under quota [E, G] (slots_EG as in
    `local_slot_rows`)."""
    return model.predict(slot_rows(quota_EG, slots_per_gpu, slots_EG))


def even_split_times(model: CostModel, totals: IntArray, num_gpus: int, slots_per_gpu: int) -> FloatArray:
    """float64 like totals: predicted time of a perfectly even split (total / G rows on each GPU,
    even over its S slots): the time a balancer's slowest GPU is compared with."""
    per_slot = np.asarray(totals, dtype=np.float64) / (num_gpus * slots_per_gpu)
    rows = (np.round(per_slot / ROW_ALIGN) * ROW_ALIGN).astype(np.int64)
    flat = np.repeat(rows.reshape(-1, 1), slots_per_gpu, axis=1)
    return model.predict(flat).reshape(rows.shape)


def time_summary(time_max_us: FloatArray, time_mean_us: FloatArray) -> dict[str, float]:
    """time_ms_mean: mean over samples of the predicted slowest-GPU time (ms); time_max_mean: mean
    over samples of predicted max / mean GPU time."""
    mx, mean = np.ravel(time_max_us), np.ravel(time_mean_us)
    return {
        "time_ms_mean": float(mx.mean() / 1e3),
        "time_max_mean": float(np.mean(mx / np.maximum(mean, 1e-300))),
    }
