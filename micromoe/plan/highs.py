"""The paper's LP on HiGHS (dual simplex, one thread, warm-started), as a selectable backend.

Variables: x[r] >= 0 per replica and T. Minimize T subject to sum_{r of e} x[r] = load[e] and
sum_{r on g} x[r] - T <= -base[g]. Only right-hand sides change between micro-batches, so one model
per placement is kept and re-solved from the previous basis. The fractional optimum is rounded to
an integral quota at ceil(T*) by the exact flow kernel, started from floor(x).

Legend: E experts, G GPUs, R replicas; x [R] is the tokens each replica processes.
`highspy` is a dependency of the package but optional at run time (a GPU host may lack it):
without it, `new_highs` raises a clear error and only solver="highs" and the simulator's LP
balancer are unavailable.
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import numpy as np

from micromoe.plan.checks import BoolArray, FloatArray, IntArray
from micromoe.plan.flow import feasible_scaled, solve_from
from micromoe.plan.slot_layout import SlotLayout

try:
    import highspy
except ImportError:  # optional at run time; see the module docstring
    highspy = None

_MODELS: OrderedDict[bytes, HighsMinMax] = OrderedDict()
_MAX_MODELS = 32


def new_highs():
    """A silent single-threaded HiGHS instance (its banner goes to fd 1 on creation: muted)."""
    if highspy is None:
        raise ImportError("the HiGHS LP backend needs the highspy package: pip install highspy")
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    return h


class HighsMinMax:
    """A warm-startable HiGHS model of the min-max LP for one placement."""

    def __init__(self, placement: SlotLayout) -> None:
        self.placement = p = placement
        h = new_highs()
        h.setOptionValue("solver", "simplex")
        h.setOptionValue("simplex_strategy", 1)  # dual simplex, as in the paper
        inf = highspy.kHighsInf
        num_r = p.num_replicas_total
        t_col = num_r
        h.addVars(num_r + 1, np.zeros(num_r + 1), np.full(num_r + 1, inf))
        h.changeColsCost(1, np.array([t_col], dtype=np.int32), np.array([1.0]))
        for e in range(p.num_experts):
            idx = np.arange(p.host_ptr[e], p.host_ptr[e + 1], dtype=np.int32)
            h.addRow(0.0, 0.0, idx.size, idx, np.ones(idx.size))
        for g in range(p.num_gpus):
            reps = p.gpu_replica[p.gpu_ptr[g] : p.gpu_ptr[g + 1]].astype(np.int32)
            idx = np.append(reps, np.int32(t_col))
            val = np.append(np.ones(reps.size), -1.0)
            h.addRow(-inf, 0.0, idx.size, idx, val)
        self._h = h
        self._inf = inf
        self._expert_rows = np.arange(p.num_experts, dtype=np.int32)
        self._gpu_rows = np.arange(p.num_experts, p.num_experts + p.num_gpus, dtype=np.int32)

    def solve(self, load: IntArray, base: IntArray) -> tuple[FloatArray, float]:
        """Fractional optimum: (x [R], T*)."""
        h = self._h
        lf = load.astype(np.float64)
        h.changeRowsBounds(self._expert_rows.size, self._expert_rows, lf, lf)
        h.changeRowsBounds(
            self._gpu_rows.size,
            self._gpu_rows,
            np.full(self._gpu_rows.size, -self._inf),
            -base.astype(np.float64),
        )
        h.run()
        sol = h.getSolution().col_value
        x = np.asarray(sol, dtype=np.float64)
        return x[:-1], float(h.getInfo().objective_function_value)


def model_for(placement: SlotLayout) -> HighsMinMax:
    """The cached model of a placement (a small LRU: one per layer layout in use)."""
    key = placement.key()
    m = _MODELS.get(key)
    if m is None:
        m = _MODELS[key] = HighsMinMax(placement)
        if len(_MODELS) > _MAX_MODELS:
            _MODELS.popitem(last=False)
    else:
        _MODELS.move_to_end(key)
    return m


def highs_replica_quota(
    load: IntArray, base: IntArray, preferred: IntArray, p: SlotLayout
) -> tuple[IntArray, int, BoolArray]:
    """Integral per-replica quota from the warm-started LP: (x [R], max_load, certificate [G]).

    load int64 [E], base int64 [G]; preferred int64 [R]: tokens the rounding pass moves last.
    """
    x_lp, t_lp = model_for(p).solve(load, base)
    x0 = np.floor(np.maximum(x_lp, 0.0) + 1e-9).astype(np.int64)
    # floor may overshoot an expert's load by float error: trim to keep x0 <= load per expert
    per_e = np.add.reduceat(x0, p.host_ptr[:-1])
    for e in np.flatnonzero(per_e > load):
        over = per_e[e] - load[e]
        for r in range(p.host_ptr[e], p.host_ptr[e + 1]):
            cut = min(over, x0[r])
            x0[r] -= cut
            over -= cut
    # a start below ceil(T*) is safe (the flow raises it); one above would not be optimal
    t0 = math.ceil(t_lp - 1e-6 * max(1.0, abs(t_lp)))
    t0 = max(t0, int((base + np.bincount(p.host_gpu, weights=x0, minlength=p.num_gpus)).max()))
    x, t, _ = solve_from(x0, t0, load, base, preferred, p.graph)
    if t == 0:
        return x, 0, np.ones(p.num_gpus, dtype=np.bool_)
    return x, int(t), _certificate_at(t, load, base, p)


def _certificate_at(t: int, load: IntArray, base: IntArray, p: SlotLayout) -> BoolArray:
    """A GPU set proving max load t - 1 is infeasible (the Hall set of the failed flow)."""
    if base.max() >= t:
        cert = np.zeros(p.num_gpus, dtype=np.bool_)
        cert[int(np.argmax(base))] = True
        return cert
    ok, hall = feasible_scaled(load, (t - 1) - base, base, t - 1, p.graph)
    if ok:
        raise AssertionError("HiGHS rounding produced a non-optimal max load")
    return hall
