"""Predicted expert time of a plan under a cost model (`micromoe simulate --cost-model`).

Legend: G GPUs, E experts, S local slots per GPU, M micro-batches, L layers.

A balancer's quota [E, G] gives each GPU the rows of the experts it serves; each becomes one local
slot's rows, padded to `ROW_ALIGN` as the dispatchers pad them, and the model predicts the GPU's
forward+backward expert time. Replicas of one expert on one GPU (EPLB may place two) show in a
quota as one slot; the simulator scores them so (the emulation benchmark splits them again).
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.checks import FloatArray, IntArray
from micromoe.plan.cost import ROW_ALIGN, CostModel


def slot_rows(quota_EG: IntArray, slots_per_gpu: int) -> IntArray:
    """int64 [G, S]: each GPU's rows per local slot, largest first, zero-padded, padded to ROW_ALIGN."""
    assert np.all(np.count_nonzero(quota_EG, axis=0) <= slots_per_gpu), "a GPU serves more experts than slots"
    top = -np.sort(-quota_EG, axis=0)[:slots_per_gpu].T
    return -(-top // ROW_ALIGN) * ROW_ALIGN


def predict_quota(model: CostModel, quota_EG: IntArray, slots_per_gpu: int) -> FloatArray:
    """float64 [G]: predicted expert time (us) of every GPU under quota [E, G]."""
    return model.predict(slot_rows(quota_EG, slots_per_gpu))


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
