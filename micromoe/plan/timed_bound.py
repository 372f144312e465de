"""Compiled evaluation side of the time-aware planner: predicted GPU times of a quota and a valid
lower bound on the slowest GPU's time of any plan (float microseconds; they never steer the
search, which runs on the integer copy in `timed_kernel.py`). `gpu_time` and `expert_bound`
work on either table; the search and the split smoothing use them on the integer copy.

Legend: G GPUs, E experts, R replicas (see `slot_layout.py`).
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit, njit_inline


@njit_inline
def gpu_time(g, x, off, f, m, gpu_ptr, gpu_replica):
    """GPU g's time off[g] + sum f[x] + m * max x over its replicas (the float table in us, or the
    search's integer copy)."""
    total = off[g]
    top = 0
    for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
        v = x[gpu_replica[k]]
        total += f[v]
        if v > top:
            top = v
    return total + m * top


@njit_inline
def largest_slot(g, x, gpu_ptr, gpu_replica):
    """Rows of GPU g's largest slot (0 when all are empty)."""
    top = 0
    for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
        if x[gpu_replica[k]] > top:
            top = x[gpu_replica[k]]
    return top


@njit
def expert_bound(load, off, f, m, graph):
    """Some replica of every expert gets >= ceil(load / replicas) rows: a lower bound on the
    slowest GPU's time of any plan (in the units of `off` and `f`)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    best = 0
    for e in range(load.size):
        k = host_ptr[e + 1] - host_ptr[e]
        share = (load[e] + k - 1) // k
        low = off[host_gpu[host_ptr[e]]]
        for r in range(host_ptr[e], host_ptr[e + 1]):
            if off[host_gpu[r]] < low:
                low = off[host_gpu[r]]
        v = low + f[share] + m * share
        if v > best:
            best = v
    return best


@njit
def predict_times(x, off_us, f_us, m_us, gpu_ptr, gpu_replica):
    """Predicted time of every GPU (float64 [G], us) from the float table: off + sum f + m * max."""
    num_g = off_us.size
    out = np.empty(num_g, dtype=np.float64)
    for g in range(num_g):
        out[g] = gpu_time(g, x, off_us, f_us, m_us, gpu_ptr, gpu_replica)
    return out


@njit
def lower_bound_us(load, off_us, f_us, conv_us, m_us, lin, subadditive, cert, graph):
    """A valid lower bound (us, fixed term excluded) on the slowest GPU's time of any plan.

    Args: load int64 [E]; off_us float64 [G]; f_us float64 [N+1] (N >= max load); m_us float;
    lin float64 [2, 2]: rows (a, b) with f(n) >= a * n + b for every n >= 1; conv_us float64
    [N+1]: a convex part c of f with c(0) = 0 (zeros if none); subadditive: f - c is subadditive
    (true of the cost model's form), so no split of an expert's load over its k replicas costs
    less than (f - c)(load) + c at the most even split into k pieces (convexity); cert bool [G]: a
    GPU set (the token plan's Hall set). The best of:
      - every GPU set S in {all GPUs, cert}: the experts with all replicas in S run there, each
        costs >= a * load + b (>= the split bound above when subadditive); S's GPUs hold at most max
        replicas-per-GPU slots each, so their largest slots sum to >= load / that; the slowest
        GPU of S is >= the mean;
      - every GPU alone: the experts that have only this replica (their whole load, f exact);
      - every expert: one replica gets >= ceil(load / replicas) rows.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = off_us.size
    num_e = load.size
    best = 0.0
    in_set = np.empty(num_g, dtype=np.bool_)
    for which in range(2):
        for g in range(num_g):
            in_set[g] = True if which == 0 else cert[g]
        size = 0
        off_sum = 0.0
        max_slots = 1
        for g in range(num_g):
            if in_set[g]:
                size += 1
                off_sum += off_us[g]
                if gpu_ptr[g + 1] - gpu_ptr[g] > max_slots:
                    max_slots = gpu_ptr[g + 1] - gpu_ptr[g]
        if size == 0:
            continue
        inside = 0
        active = 0
        whole = 0.0  # sum of f(load) over the inside experts
        for e in range(num_e):
            ok = True
            for r in range(host_ptr[e], host_ptr[e + 1]):
                if not in_set[host_gpu[r]]:
                    ok = False
                    break
            if ok and load[e] > 0:
                inside += load[e]
                active += 1
                k = host_ptr[e + 1] - host_ptr[e]
                q, rem = load[e] // k, load[e] % k
                whole += f_us[load[e]] - conv_us[load[e]] + (k - rem) * conv_us[q]
                if rem > 0:
                    whole += rem * conv_us[q + 1]
        for i in range(lin.shape[0] + 1):
            if i < lin.shape[0]:
                work = lin[i, 0] * inside + lin[i, 1] * active
            elif subadditive:
                work = whole
            else:
                continue
            v = off_sum + work + m_us * inside / max_slots
            if v / size > best:
                best = v / size
    for g in range(num_g):
        v = off_us[g]
        top = 0
        for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
            e = replica_expert[gpu_replica[k]]
            if host_ptr[e + 1] - host_ptr[e] == 1:
                v += f_us[load[e]]
                if load[e] > top:
                    top = load[e]
        v += m_us * top
        if v > best:
            best = v
    v = expert_bound(load, off_us, f_us, m_us, graph)
    if v > best:
        best = v
    return best
