"""Traffic of a plan's routes and the least traffic any routing can reach (a benchmark reference).

Used by `bench_scheduler.py` only: it rates the planner's fixed route fill against the paper's
communication-aware LP at the same (optimal) max load. Not part of the package: the planner never
solves this LP.

Legend: G GPUs, E experts, R replicas; counts int64 [G, E]; node_of int64 [G].
"""

from __future__ import annotations

import highspy
import numpy as np

from micromoe.plan import IntArray, Placement, new_highs


def traffic_cost(src, dst, count, node_of: IntArray, weights: tuple[float, float, float]) -> float:
    """Weighted traffic of a route list: weights = (same GPU, same node, other node)."""
    src, dst, count = (np.asarray(a) for a in (src, dst, count))
    same_gpu = src == dst
    same_node = (node_of[src] == node_of[dst]) & ~same_gpu
    w = np.where(same_gpu, weights[0], np.where(same_node, weights[1], weights[2]))
    return float((w * count).sum())


def min_traffic_lp(
    counts: IntArray,
    p: Placement,
    max_load: int,
    node_of: IntArray,
    weights: tuple[float, float, float] = (0.0, 1.0, 4.0),
    base: IntArray | None = None,
) -> float:
    """The least weighted traffic of any routing whose per-GPU load stays <= max_load (the paper's
    communication-aware LP variant at a fixed compute optimum). A reference for the route fill."""
    num_g, num_e = counts.shape
    base = np.zeros(num_g, dtype=np.int64) if base is None else base
    h = new_highs()
    inf = highspy.kHighsInf
    # one variable per (source with tokens, replica of that expert)
    var_src, var_rep = [], []
    for e in range(num_e):
        for s in np.flatnonzero(counts[:, e]):
            for r in range(p.host_ptr[e], p.host_ptr[e + 1]):
                var_src.append(s)
                var_rep.append(r)
    var_src = np.array(var_src, dtype=np.int64)
    var_rep = np.array(var_rep, dtype=np.int64)
    dst = p.host_gpu[var_rep]
    cost = np.where(
        var_src == dst, weights[0], np.where(node_of[var_src] == node_of[dst], weights[1], weights[2])
    )
    n = var_src.size
    h.addVars(n, np.zeros(n), np.full(n, inf))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), cost.astype(np.float64))
    key = var_src * num_e + p.replica_expert[var_rep]
    for k in np.unique(key):  # every (source, expert) sends all its tokens
        idx = np.flatnonzero(key == k).astype(np.int32)
        c = float(counts[k // num_e, k % num_e])
        h.addRow(c, c, idx.size, idx, np.ones(idx.size))
    for g in range(num_g):  # no GPU above the optimal max load
        idx = np.flatnonzero(dst == g).astype(np.int32)
        if idx.size:
            h.addRow(-inf, float(max_load - base[g]), idx.size, idx, np.ones(idx.size))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise AssertionError(f"traffic LP not optimal: {h.modelStatusToString(h.getModelStatus())}")
    return float(h.getInfo().objective_function_value)
