"""Independent LP references for the planner tests, written directly against highspy.

Kept separate from `micromoe.plan.highs` on purpose: the tests must not trust the code they check.
"""

from __future__ import annotations

import highspy
import numpy as np


def _new() -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    return h


def lp_min_max(load, host_lists, base) -> float:
    """min T s.t. each expert's load is split over its hosts and every GPU carries <= T."""
    h = _new()
    inf = highspy.kHighsInf
    pairs = [(e, g) for e, hosts in enumerate(host_lists) for g in hosts]
    n = len(pairs)
    h.addVars(n + 1, np.zeros(n + 1), np.full(n + 1, inf))
    h.changeColCost(n, 1.0)
    for e in range(len(host_lists)):
        idx = np.array([i for i, (ee, _) in enumerate(pairs) if ee == e], dtype=np.int32)
        h.addRow(float(load[e]), float(load[e]), idx.size, idx, np.ones(idx.size))
    for g in range(len(base)):
        idx = [i for i, (_, gg) in enumerate(pairs) if gg == g]
        h.addRow(
            -inf,
            -float(base[g]),
            len(idx) + 1,
            np.array(idx + [n], dtype=np.int32),
            np.array([1.0] * len(idx) + [-1.0]),
        )
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value


def lp_max_local(counts, host_lists, cap) -> float:
    """Most tokens that can stay on their source GPU when GPU g may take at most cap[g] tokens."""
    h = _new()
    inf = highspy.kHighsInf
    num_g, num_e = counts.shape
    pairs = [(e, g) for e in range(num_e) for g in host_lists[e]]
    n = len(pairs)
    # x[i]: quota of replica i; y[i]: local tokens it keeps (y <= x, y <= counts[g, e])
    h.addVars(2 * n, np.zeros(2 * n), np.array([inf] * n + [float(counts[g, e]) for e, g in pairs]))
    h.changeColsCost(n, np.arange(n, 2 * n, dtype=np.int32), -np.ones(n))
    for e in range(num_e):
        idx = np.array([i for i, (ee, _) in enumerate(pairs) if ee == e], dtype=np.int32)
        load = float(counts[:, e].sum())
        h.addRow(load, load, idx.size, idx, np.ones(idx.size))
    for g in range(num_g):
        idx = np.array([i for i, (_, gg) in enumerate(pairs) if gg == g], dtype=np.int32)
        h.addRow(-inf, float(cap[g]), idx.size, idx, np.ones(idx.size))
    for i in range(n):
        h.addRow(-inf, 0.0, 2, np.array([n + i, i], dtype=np.int32), np.array([1.0, -1.0]))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return -h.getInfo().objective_function_value
