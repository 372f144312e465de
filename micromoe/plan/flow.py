"""Compiled kernels of the exact min-max scheduler (arrays and scalars only; no validation).

The problem: experts supply `load[e]` tokens, expert e may send tokens to the GPUs holding its
replicas, GPU g accepts at most `T - offset[g]`. Feasibility for a given T is a bipartite max-flow;
when it fails, the GPUs reached from unsaturated experts in the residual graph form a Hall set S
with L(S) + offset(S) > T * |S|, which gives the next valid lower bound (discrete Newton /
Dinkelbach). The last Hall set certifies optimality.

Legend: E experts, G GPUs, R replicas. `x[r]` is the flow (tokens) on replica r; `assigned[g]` the
tokens given to GPU g; `cap[g]` what GPU g may take in total. `preferred[r]` (int64 [R]) is the
number of tokens replica r should take first: the tokens of its expert already on its GPU, plus,
when the caller has a node map, a share of the same-node tokens (`kernel.preferred_with_nodes`).
The solver places those first and moves them only when the max load needs it.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit, njit_inline


@njit_inline
def _ceil_div(a, b):
    return -((-a) // b)


@njit_inline
def _water_fill(e, rem, assigned, level_offset, limit, host_ptr, host_gpu, x):
    """Pour rem[e] into e's hosts, raising the lowest GPU levels first (level = offset + assigned)."""
    lo = host_ptr[e]
    hi = host_ptr[e + 1]
    while rem[e] > 0:
        m = limit
        for r in range(lo, hi):
            lv = level_offset[host_gpu[r]] + assigned[host_gpu[r]]
            if lv < m:
                m = lv
        if m >= limit:
            return
        k = 0
        nxt = limit
        for r in range(lo, hi):
            lv = level_offset[host_gpu[r]] + assigned[host_gpu[r]]
            if lv == m:
                k += 1
            elif m < lv < nxt:
                nxt = lv
        room = k * (nxt - m)
        if rem[e] >= room:
            step = nxt - m
            extra = 0
        else:
            step = rem[e] // k
            extra = rem[e] - step * k
        for r in range(lo, hi):
            g = host_gpu[r]
            if level_offset[g] + assigned[g] == m:
                give = step
                if extra > 0:
                    give += 1
                    extra -= 1
                x[r] += give
                assigned[g] += give
                rem[e] -= give


@njit_inline
def _movable(x, preferred, spare_preferred, r):
    """Flow on replica r that a path may move away (tier 1 spares the replica's preferred tokens)."""
    if spare_preferred:
        return x[r] - preferred[r]
    return x[r]


@njit
def _bfs_levels(rem, assigned, cap, x, preferred, spare_preferred, graph, dist_e, dist_g, queue):
    """BFS levels of the residual graph from all unsaturated experts (level 0).

    GPUs with spare capacity end paths and are not expanded. Returns how many were reached;
    dist_g >= 0 marks every GPU reached (the Hall set when that count is 0).
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_e = rem.size
    dist_e[:] = -1
    dist_g[:] = -1
    tail = 0
    for e in range(num_e):
        if rem[e] > 0:
            dist_e[e] = 0
            queue[tail] = e
            tail += 1
    head = 0
    n_targets = 0
    while head < tail:
        node = queue[head]
        head += 1
        if node < num_e:
            for r in range(host_ptr[node], host_ptr[node + 1]):
                g = host_gpu[r]
                if dist_g[g] >= 0:
                    continue
                dist_g[g] = dist_e[node] + 1
                if assigned[g] < cap[g]:
                    n_targets += 1
                else:
                    queue[tail] = num_e + g
                    tail += 1
        else:
            g = node - num_e
            for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
                r = gpu_replica[k]
                e2 = replica_expert[r]
                if dist_e[e2] >= 0 or _movable(x, preferred, spare_preferred, r) <= 0:
                    continue
                dist_e[e2] = dist_g[g] + 1
                queue[tail] = e2
                tail += 1
    return n_targets


@njit
def _blocking_flow(e0, rem, assigned, cap, x, preferred, spare_preferred, graph, level):
    """Dinic's phase for one source expert: push its load along level-graph paths (depth-first,
    with current-arc pointers) until it is placed or no level path remains. level: the phase's
    work arrays (dist_e, dist_g, arc_e, arc_g, stack, stack_arc) of `_augment`."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    dist_e, dist_g, arc_e, arc_g, stack, stack_arc = level
    num_e = rem.size
    while rem[e0] > 0:
        top = 0
        stack[0] = e0
        target = -1
        while top >= 0:
            u = stack[top]
            advanced = False
            if u < num_e:
                while arc_e[u] < host_ptr[u + 1]:
                    r = arc_e[u]
                    g = host_gpu[r]
                    if dist_g[g] == dist_e[u] + 1:
                        top += 1
                        stack[top] = num_e + g
                        stack_arc[top] = r
                        advanced = True
                        break
                    arc_e[u] += 1
                if not advanced:
                    dist_e[u] = -2  # dead end for this phase
                    top -= 1
            else:
                g = u - num_e
                if assigned[g] < cap[g]:
                    target = g
                    break
                while arc_g[g] < gpu_ptr[g + 1]:
                    r = gpu_replica[arc_g[g]]
                    e2 = replica_expert[r]
                    if dist_e[e2] == dist_g[g] + 1 and _movable(x, preferred, spare_preferred, r) > 0:
                        top += 1
                        stack[top] = e2
                        stack_arc[top] = r
                        advanced = True
                        break
                    arc_g[g] += 1
                if not advanced:
                    dist_g[g] = -2
                    top -= 1
        if target < 0:
            return
        b = min(rem[e0], cap[target] - assigned[target])
        for i in range(2, top + 1, 2):  # backward arcs: GPU -> expert
            b = min(b, _movable(x, preferred, spare_preferred, stack_arc[i]))
        for i in range(1, top + 1):
            if i % 2 == 1:
                x[stack_arc[i]] += b
            else:
                x[stack_arc[i]] -= b
        assigned[target] += b
        rem[e0] -= b


@njit
def _augment(rem, assigned, cap, x, preferred, graph, vis_g):
    """Augment until every expert is placed (True) or no path exists (False; vis_g = Hall set).

    Phases of Dinic's algorithm: BFS levels, then blocking flow from every unsaturated expert.
    Paths first try to move only flow above `preferred` (tokens that would leave their source GPU or
    node), so preferred tokens are displaced only when the max load needs it.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_e = rem.size
    num_g = cap.size
    dist_e = np.empty(num_e, dtype=np.int64)
    dist_g = np.empty(num_g, dtype=np.int64)
    queue = np.empty(num_e + num_g, dtype=np.int64)
    arc_e = np.empty(num_e, dtype=np.int64)
    arc_g = np.empty(num_g, dtype=np.int64)
    stack = np.empty(num_e + num_g + 1, dtype=np.int64)
    stack_arc = np.empty(num_e + num_g + 1, dtype=np.int64)
    level = (dist_e, dist_g, arc_e, arc_g, stack, stack_arc)
    first_tier = 0
    while True:
        if rem.max() <= 0:
            return True
        found = False
        for tier in range(first_tier, 2):
            spare_preferred = tier == 0
            n = _bfs_levels(rem, assigned, cap, x, preferred, spare_preferred, graph, dist_e, dist_g, queue)
            if n > 0:
                arc_e[:] = host_ptr[:-1]
                arc_g[:] = gpu_ptr[:-1]
                for e0 in range(num_e):
                    if rem[e0] > 0 and dist_e[e0] == 0:
                        _blocking_flow(e0, rem, assigned, cap, x, preferred, spare_preferred, graph, level)
                found = True
                break
            first_tier = 1  # preferred-sparing paths ran out: stop trying them first
        if not found:
            for g in range(num_g):
                vis_g[g] = dist_g[g] >= 0
            return False


@njit_inline
def _inside_load(load, host_ptr, host_gpu, in_set):
    """Sum of load over experts whose replicas all lie in the GPU set."""
    total = 0
    for e in range(load.size):
        inside = True
        for r in range(host_ptr[e], host_ptr[e + 1]):
            if not in_set[host_gpu[r]]:
                inside = False
                break
        if inside:
            total += load[e]
    return total


@njit_inline
def _ratio_greater(a, b, c, d):
    """a / b > c / d for a, c >= 0 and b, d >= 1, exactly and without overflow (a, c < 2**53)."""
    qa = a // b
    qc = c // d
    if qa != qc:
        return qa > qc
    return (a - qa * b) * d > (c - qc * d) * b


@njit
def ratio_bound(load, base, host_ptr, host_gpu):
    """The best of three cheap lower bounds on T*, exactly, with the GPU set that proves it.

    The bounds: the mean (all GPUs), the largest base load (that GPU), and each expert's load plus
    its hosts' base loads over its number of hosts (those hosts). Returns (num, den, cert bool [G])
    with T* >= num / den. The one statement of the lower bound: the integer solver starts at its
    ceiling (`lower_bound`), the density lemma's exact search at the fraction itself.
    (A greedy densest-set bound over the hottest experts was tight more often, but on the H200 host
    it cost more than the raises it saved: benchmarks/results/scheduler_ab_h200host.json.)
    """
    num_g = base.size
    cert = np.ones(num_g, dtype=np.bool_)
    num = load.sum() + base.sum()
    den = num_g
    gmax = np.argmax(base)
    if _ratio_greater(base[gmax], 1, num, den):
        num = base[gmax]
        den = 1
        cert[:] = False
        cert[gmax] = True
    for e in range(load.size):
        lo = host_ptr[e]
        hi = host_ptr[e + 1]
        s = load[e]
        for r in range(lo, hi):
            s += base[host_gpu[r]]
        if _ratio_greater(s, hi - lo, num, den):
            num = s
            den = hi - lo
            cert[:] = False
            for r in range(lo, hi):
                cert[host_gpu[r]] = True
    return num, den, cert


@njit
def lower_bound(load, base, host_ptr, host_gpu):
    """ceil of `ratio_bound`: the integer max load the solver starts from, with its GPU set."""
    num, den, cert = ratio_bound(load, base, host_ptr, host_gpu)
    return _ceil_div(num, den), cert


@njit
def solve_min_max(load, base, preferred, graph):
    """Integer min-max assignment.

    Args: load int64 [E]; base int64 [G] (tokens a GPU already has); preferred int64 [R] (tokens
    replica r takes first, see the module legend).
    Returns (x [R], max_load, cert bool [G]) with every GPU at <= max_load, max_load optimal, and
    ceil((L_inside(cert) + base(cert)) / |cert|) == max_load.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = base.size
    t, cert = lower_bound(load, base, host_ptr, host_gpu)
    cap = t - base
    x = np.zeros(host_gpu.size, dtype=np.int64)
    assigned = np.zeros(num_g, dtype=np.int64)
    rem = load.copy()
    for r in range(host_gpu.size):
        g = host_gpu[r]
        e = replica_expert[r]
        take = min(preferred[r], rem[e], cap[g] - assigned[g])
        if take > 0:
            x[r] += take
            assigned[g] += take
            rem[e] -= take
    for e in range(load.size):
        _water_fill(e, rem, assigned, base, t, host_ptr, host_gpu, x)
    return _raise_until_feasible(x, assigned, rem, cap, t, cert, load, base, preferred, graph)


@njit
def solve_from(x0, t0, load, base, preferred, graph):
    """Like `solve_min_max`, but start from flow `x0` (x0 <= final quota) at max load >= t0.

    Used to round an LP solution: x0 = floor(LP x), t0 = ceil(LP T*). The returned certificate is
    only meaningful when the bound was raised here; callers recompute it otherwise.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = base.size
    t, cert = lower_bound(load, base, host_ptr, host_gpu)
    t = max(t, t0)
    cap = t - base
    x = x0.copy()
    assigned = np.zeros(num_g, dtype=np.int64)
    rem = load.copy()
    for r in range(host_gpu.size):
        assigned[host_gpu[r]] += x[r]
        rem[replica_expert[r]] -= x[r]
    return _raise_until_feasible(x, assigned, rem, cap, t, cert, load, base, preferred, graph)


@njit
def _raise_until_feasible(x, assigned, rem, cap, t, cert, load, base, preferred, graph):
    """Augment; on a Hall set raise T to its ratio and keep going (discrete Newton)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    vis_g = np.empty(base.size, dtype=np.bool_)
    while not _augment(rem, assigned, cap, x, preferred, graph, vis_g):
        n_s = vis_g.sum()
        t_new = _ceil_div(_inside_load(load, host_ptr, host_gpu, vis_g) + base[vis_g].sum(), n_s)
        assert t_new > t
        cap += t_new - t
        t = t_new
        cert = vis_g.copy()
    return x, t, cert


@njit
def feasible_scaled(supply, cap, offset, limit, graph):
    """Can `supply` be placed with GPU g taking at most cap[g]? Returns (ok, Hall set if not ok)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = cap.size
    x = np.zeros(host_gpu.size, dtype=np.int64)
    assigned = np.zeros(num_g, dtype=np.int64)
    rem = supply.copy()
    for e in range(supply.size):
        _water_fill(e, rem, assigned, offset, limit, host_ptr, host_gpu, x)
    preferred = np.zeros(host_gpu.size, dtype=np.int64)
    vis_g = np.zeros(num_g, dtype=np.bool_)
    ok = _augment(rem, assigned, cap, x, preferred, graph, vis_g)
    return ok, vis_g


@njit
def inside_load(load, host_ptr, host_gpu, in_set):
    """Public wrapper of the inside-load sum (used by the density oracle and the tests)."""
    return _inside_load(load, host_ptr, host_gpu, in_set)
