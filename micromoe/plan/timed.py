"""Time-aware scheduling: split each expert's tokens over its replicas to equalize predicted GPU
time (the slowest GPU's expert GEMMs), not token counts.

Legend: G GPUs, E experts, S local slots per GPU, R replicas (see `slot_layout.py`).

A cost model (`micromoe.plan.cost.CostModel`, or any object with `fixed_us`, `max_row_us` and
`slot_cost_table(n)`) predicts one GPU's time from the rows of its local slots:
t = fixed + sum_s f(rows[s]) + max_row * max_s rows[s], f(0) = 0 and non-decreasing. Grouped-GEMM
time is not linear in rows: a 10-row fragment costs a whole row tile and a group's setup, and one
huge slot costs a tail. So the token optimum (which equalizes rows) is not the time optimum.

`time_replica_quota` starts from the exact token plan (it already minimizes the linear part), then runs a
deterministic local search (`timed_kernel.local_search`) that shifts rows between the replicas of
one expert while that lowers the slowest GPU's predicted time. The search runs on a fixed-point
integer copy of the model (1e-6 us units), so every rank takes the same steps and computes the
bit-identical plan. It also returns a valid lower bound on the optimal slowest-GPU time, so callers
can report the remaining gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import FloatArray, IntArray
from micromoe.plan.cost import CostModel
from micromoe.plan.slot_layout import SlotLayout
from micromoe.plan.timed_bound import predict_times
from micromoe.plan.timed_kernel import timed_plan

FIXED_POINT = 1e6  # integer time units per microsecond in the search
TOKEN_SLACK = 0.01  # tokens per GPU may exceed the mean by this much (or the token optimum's excess)
_MIN_TABLE = 1024


class SlotCostModel(Protocol):
    """What the planner needs of a cost model (`micromoe.plan.cost.CostModel` has it)."""

    fixed_us: float
    max_row_us: float

    def slot_cost_table(self, max_rows: int) -> FloatArray: ...


@dataclass(frozen=True)
class TimedReplicaQuota:
    """Result of `time_replica_quota`.

    Attributes:
        replica_quota: int64 [R]; rows of each replica (placement's replica order); sums per expert to its load.
        predicted_us: float64 [G]; the model's predicted expert time of each GPU.
        lower_bound_us: a valid lower bound on the slowest GPU's time of any plan (us).
        token_predicted_us: float64 [G]; the prediction for the token-optimal quota it started from.
        steps: local-search steps taken.
    """

    replica_quota: IntArray
    predicted_us: FloatArray
    lower_bound_us: float
    token_predicted_us: FloatArray
    steps: int

    @property
    def max_us(self) -> float:
        return float(self.predicted_us.max())

    @property
    def gap(self) -> float:
        """max predicted time / lower bound (>= 1)."""
        return self.max_us / self.lower_bound_us if self.lower_bound_us > 0 else 1.0


@dataclass(frozen=True)
class _Tables:
    f_us: FloatArray  # f(0..N) in us
    f_int: IntArray  # the same in 1e-6 us units
    m_us: float
    m_int: int
    lin: FloatArray  # [2, 2] rows (a, b): f(n) >= a * n + b for n >= 1
    convex_us: FloatArray  # c(0..N): the convex part of f (CostModel's n log n and big-slot terms)
    subadditive: bool  # f - c is subadditive, f(a + b) - c(a + b) <= ...: true of CostModel's form


_CACHE: dict[int, tuple[Any, _Tables]] = {}


def check_cost_model(cost: Any) -> SlotCostModel:
    """The model itself if it has what the planner needs; ValueError naming what is missing."""
    missing = [a for a in ("fixed_us", "max_row_us", "slot_cost_table") if not hasattr(cost, a)]
    if missing:
        raise ValueError(
            f"cost must be a micromoe.plan.cost.CostModel (or have fixed_us, max_row_us and "
            f"slot_cost_table); {type(cost).__name__} lacks {', '.join(missing)}"
        )
    for name in ("fixed_us", "max_row_us"):
        v = float(getattr(cost, name))
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"cost model {name} must be finite and >= 0, got {v}")
    return cost


def _fixed_point_table(cost: SlotCostModel, f_us: FloatArray, n: int) -> IntArray:
    """The search's integer table: `CostModel` builds it by integer arithmetic, bit-identical on
    every machine; another model is rounded from its float table (identical only where its floats
    are, e.g. on identical CPUs and libraries)."""
    if isinstance(cost, CostModel):
        return cost.slot_cost_table_int(n, FIXED_POINT)
    return np.rint(f_us * FIXED_POINT).astype(np.int64)


def cost_tables(cost: SlotCostModel, max_rows: int) -> _Tables:
    """f(0..N) as float and fixed-point tables, N >= max_rows (cached per model, grown by doubling).

    The model is checked (`check_cost_model`) when its tables are built, not on every plan."""
    hit = _CACHE.get(id(cost))
    if hit is not None and hit[0] is cost and hit[1].f_us.size > max_rows:
        return hit[1]
    check_cost_model(cost)
    n = _MIN_TABLE
    while n <= max_rows:
        n *= 2
    f = np.ascontiguousarray(cost.slot_cost_table(n), dtype=np.float64)
    if f.shape != (n + 1,) or not np.all(np.isfinite(f)) or f[0] != 0 or np.any(np.diff(f) < 0):
        raise ValueError(
            "cost model's slot_cost_table(n) must return n + 1 finite values with f(0) = 0, "
            "non-decreasing in rows"
        )
    m_us = float(cost.max_row_us)
    tables = _Tables(
        f_us=f,
        f_int=_fixed_point_table(cost, f, n),
        m_us=m_us,
        m_int=int(round(m_us * FIXED_POINT)),
        lin=_linear_minorants(f),
        convex_us=cost.convex_slot_cost_table(n) if isinstance(cost, CostModel) else np.zeros(n + 1),
        subadditive=isinstance(cost, CostModel),
    )
    for a in (tables.f_us, tables.f_int, tables.lin, tables.convex_us):
        a.setflags(write=False)
    if len(_CACHE) >= 16:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(cost)] = (cost, tables)
    return tables


def _linear_minorants(f: FloatArray) -> FloatArray:
    """Two lines under f on n >= 1: (a, 0) with a = min f(n)/n, and the steepest line through
    (1, f(1)) under f, kept only if its intercept is >= 0 (so each active slot adds >= b)."""
    n = np.arange(1, f.size, dtype=np.float64)
    a = float(np.min(f[1:] / n))
    out = np.array([[a, 0.0], [a, 0.0]])
    if f.size > 2:
        a2 = float(np.min((f[2:] - f[1]) / (n[1:] - 1.0)))
        b2 = float(f[1]) - a2
        if a2 >= 0 and b2 >= 0:
            out[1] = (a2, b2)
    return out


def time_replica_quota(
    counts: IntArray,
    token_replica_quota: IntArray,
    placement: SlotLayout,
    cost: SlotCostModel,
    *,
    base_load: IntArray | None = None,
    certificate: npt.NDArray[np.bool_] | None = None,
    max_steps: int | None = None,
    token_slack: float | None = TOKEN_SLACK,
) -> TimedReplicaQuota:
    """Improve a token-optimal quota for predicted time.

    Args:
        counts: int64 [G, E] >= 0, validated by the caller (the micro-batch's routing counts).
        token_replica_quota: int64 [R]; a quota that places every token (the exact token plan's).
        placement: the layout (G GPUs, E experts).
        cost: the cost model (checked by `cost_tables` when its tables are first built).
        base_load: int64 [G]; rows a GPU already runs in a separate group (costed as f(base)).
        certificate: bool [G]; the token plan's Hall set, used for a tighter lower bound.
        token_slack: no GPU's tokens grow above max((1 + token_slack) x the mean load, the token
            plan's max load): tokens are also all-to-all volume, which the model does not cost.
            None: no token limit (time alone).
        max_steps: cap on the steps of each local search (default 32 + G // 2); the second search
            runs only when the first ends in a local optimum before the cap.

    Returns:
        `TimedReplicaQuota`: the token quota itself unless another quota has a strictly lower predicted
        slowest-GPU time (so local tokens move only when that helps), plus a valid lower bound.
    """
    if token_slack is not None and not 0.0 <= token_slack <= 1.0:
        raise ValueError(
            f"token_slack must be None or in [0, 1] (0.01 = within 1% of the mean), got {token_slack}"
        )
    p = placement
    load = counts.sum(axis=0)  # int64 [E]: one pass over counts for the table size and the total
    max_rows = int(load.max()) if load.size else 0  # no slot takes more than its expert's load
    if base_load is not None and np.size(base_load):
        max_rows = max(max_rows, int(np.max(base_load)))  # f(base) is read from the same table
    tables = cost_tables(cost, max_rows)
    x = np.array(token_replica_quota, dtype=np.int64)
    if base_load is None:
        off_us, off_int = _zero_offsets(p.num_gpus)
    else:
        off_us = tables.f_us[np.asarray(base_load)]
        off_int = tables.f_int[np.asarray(base_load)]
    cert = _all_gpus(p.num_gpus) if certificate is None else np.asarray(certificate, np.bool_)
    base = _zero_offsets(p.num_gpus)[1] if base_load is None else np.asarray(base_load, dtype=np.int64)
    total = int(load.sum()) + int(base.sum())
    if token_slack is None:
        mean_cap = total  # no GPU can exceed every token
    else:
        pm = int(round(token_slack * 1000))
        mean_cap = -(-(total * (1000 + pm)) // (p.num_gpus * 1000))  # exact: Python integers
    steps_cap = 32 + p.num_gpus // 2 if max_steps is None else int(max_steps)
    x, predicted, token_us, bound, steps = timed_plan(
        counts,
        x,
        off_int,
        off_us,
        tables.f_int,
        tables.f_us,
        tables.m_int,
        tables.m_us,
        base,
        mean_cap,
        tables.lin,
        tables.convex_us,
        tables.subadditive,
        cert,
        p.graph,
        steps_cap,
    )
    fixed = gpu_constant_us(cost, p.slots_per_gpu)
    predicted += fixed
    token_us += fixed
    # the bound never exceeds a plan's time (it could only by rounding of the float sums)
    bound = min(fixed + bound, float(predicted.max()))
    for a in (x, predicted, token_us):
        a.setflags(write=False)
    return TimedReplicaQuota(x, predicted, bound, token_us, int(steps))


@lru_cache(maxsize=64)
def _zero_offsets(num_gpus: int) -> tuple[FloatArray, IntArray]:
    us, units = np.zeros(num_gpus), np.zeros(num_gpus, dtype=np.int64)
    us.setflags(write=False)
    units.setflags(write=False)
    return us, units


@lru_cache(maxsize=64)
def _all_gpus(num_gpus: int) -> npt.NDArray[np.bool_]:
    out = np.ones(num_gpus, dtype=np.bool_)
    out.setflags(write=False)
    return out


def rows_per_slot(replica_quota: npt.ArrayLike, placement: SlotLayout) -> IntArray:
    """int64 [G, S]: rows of each local slot from a per-replica quota [R] (empty slots 0)."""
    p = placement
    out = np.zeros((p.num_gpus, p.slots_per_gpu), dtype=np.int64)
    out[p.host_gpu, p.replica_slot] = np.asarray(replica_quota, dtype=np.int64)
    return out


def predict_replica_quota_us(
    replica_quota: npt.ArrayLike, placement: SlotLayout, cost: SlotCostModel
) -> FloatArray:
    """float64 [G]: predicted expert time of each GPU for a per-replica quota [R]."""
    q = np.asarray(replica_quota, dtype=np.int64)
    tables = cost_tables(cost, int(q.max()) if q.size else 0)
    p = placement
    times = predict_times(q, np.zeros(p.num_gpus), tables.f_us, tables.m_us, p.gpu_ptr, p.gpu_replica)
    return times + gpu_constant_us(cost, p.slots_per_gpu)


def gpu_constant_us(cost: SlotCostModel, slots_per_gpu: int) -> float:
    """The part of every GPU's predicted time that no plan changes: fixed_us, plus c_slot per
    local slot (used or not) where the model has that term."""
    return float(cost.fixed_us) + float(getattr(cost, "c_slot", 0.0)) * slots_per_gpu
