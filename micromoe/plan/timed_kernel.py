"""Compiled body of the time-aware planner: a deterministic local search over replica quotas.

Legend: G GPUs, E experts, R replicas (see `placement.py`). A GPU's predicted expert time is

    t[g] = off[g] + sum_{r on g} f(x[r]) + m * max_{r on g} x[r]

with f the cost model's per-slot cost (f(0) = 0, non-decreasing; given as a table f[0..N]) and m
its max-slot coefficient. The search works on integer copies of f and m (fixed point, see
`timed.py`), so every comparison is exact and every rank takes the same steps.

One step: on the slowest GPU (lowest id among ties), take its non-empty slots in slot order; for
a slot r and every other replica r2 of the same expert on a GPU g2, find the shift d in [1, x[r]]
that minimizes max(t[g] after giving d away, t[g2] after receiving d). t[g] falls and t[g2] rises
with d, so the best d is where the two cross: a binary search. The first slot with a shift whose
pair maximum is below t[g] gives the step (its best partner; ties: fewer local tokens displaced,
then the lower replica index). Scanning every slot for the steepest step found plans within a
fraction of a percent of these at several times the cost per step. Each applied step lowers the
sorted vector of GPU times lexicographically, so the search ends; `max_steps` caps it for
latency. It removes fragments that cost a whole tile or a group, aligns splits to tiles and trims
the largest slot when that lowers the slowest GPU.

Moves of one pair cannot leave a plateau where every GPU holds two fragments that one GPU alone
should run (each single move makes its receiver the slowest). So when the search from the token
quota ends in a local optimum, a second search starts from every expert on one replica
(`consolidated_start`) and the better plan is kept: on random small instances against an exact
MILP, the pair is at the optimum in the median and within 5% at worst (tests/test_plan_timed.py).
When the search made the slowest GPU faster, `timed_smooth.smooth_splits` then evens out each
expert's split where no GPU's predicted time rises above its pair's maximum.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit, njit_inline
from micromoe.plan.kernel import gpu_tokens, own_gpu_tokens
from micromoe.plan.timed_bound import expert_bound, gpu_time, largest_slot, lower_bound_us, predict_times
from micromoe.plan.timed_smooth import smooth_splits

SMOOTH_PASSES = 1


@njit_inline
def _max_time(x, off, f, m, gpu_ptr, gpu_replica):
    best = off[0]
    for g in range(off.size):
        v = gpu_time(g, x, off, f, m, gpu_ptr, gpu_replica)
        if v > best:
            best = v
    return best


@njit_inline
def _other_max(g, r, x, gpu_ptr, gpu_replica):
    """Largest slot of GPU g other than replica r."""
    top = 0
    for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
        r2 = gpu_replica[k]
        if r2 != r and x[r2] > top:
            top = x[r2]
    return top


@njit_inline
def _pair(d, xa, xb, ta, tb, sum_a, rest_a, mx_b, f, m):
    """(time of the giving GPU, time of the receiving GPU) after shifting d rows a -> b.

    sum_a: the giver's time without its slot a and without its max term; rest_a: its largest
    other slot; mx_b: the receiver's largest slot."""
    na = xa - d
    top_a = na if na > rest_a else rest_a
    new_a = sum_a + f[na] + m * top_a
    nb = xb + d
    top_b = nb if nb > mx_b else mx_b
    new_b = tb - f[xb] + f[nb] + m * (top_b - mx_b)
    return new_a, new_b


@njit_inline
def _best_shift(xa, dmin, dmax, xb, ta, tb, sum_a, rest_a, mx_b, f, m):
    """(d, pair max) minimizing max(new_a, new_b) over d in [dmin, dmax], 1 <= dmin <= dmax <= xa."""
    new_a, new_b = _pair(dmax, xa, xb, ta, tb, sum_a, rest_a, mx_b, f, m)
    if new_a > new_b:  # even the largest shift leaves the giver the slower one
        return dmax, new_a
    lo = dmin
    hi = dmax  # invariant: new_a(hi) <= new_b(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        na, nb = _pair(mid, xa, xb, ta, tb, sum_a, rest_a, mx_b, f, m)
        if na <= nb:
            hi = mid
        else:
            lo = mid + 1
    na, nb = _pair(lo, xa, xb, ta, tb, sum_a, rest_a, mx_b, f, m)
    best_d = lo
    best = nb if nb > na else na
    if lo > dmin:
        na, nb = _pair(lo - 1, xa, xb, ta, tb, sum_a, rest_a, mx_b, f, m)
        v = nb if nb > na else na
        if v < best:
            best = v
            best_d = lo - 1
    return best_d, best


@njit_inline
def _kept(x, local):
    return x if x < local else local


@njit
def local_search(x, local, off, f, m, base, tok_cap, graph, max_steps):
    """Lower the slowest GPU's integer time by shifting rows between replicas of one expert.

    Args: x int64 [R] (quota, modified in place); local int64 [R] (tokens of the replica's expert
    on its own GPU, for tie-breaks); off int64 [G]; f int64 [N+1] with N >= max x; m int64;
    base int64 [G] and tok_cap: a shift never lifts a GPU's tokens (base + its quota) above
    tok_cap (GPUs above it may only give); graph (host_ptr, host_gpu, gpu_ptr, gpu_replica,
    replica_expert); max_steps int. Returns (t int64 [G] final times, steps taken).
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = off.size
    t = np.empty(num_g, dtype=np.int64)
    mx = np.empty(num_g, dtype=np.int64)
    tok = gpu_tokens(x, base, host_gpu)
    for g in range(num_g):
        _refresh(g, t, mx, x, off, f, m, gpu_ptr, gpu_replica)
    steps = 0
    while steps < max_steps:
        ga = 0
        for g in range(1, num_g):
            if t[g] > t[ga]:
                ga = g
        best = t[ga]
        best_loss = 0
        best_r = -1
        best_r2 = -1
        best_d = 0
        for k in range(gpu_ptr[ga], gpu_ptr[ga + 1]):
            r = gpu_replica[k]
            xa = x[r]
            if xa == 0:
                continue
            rest_a = _other_max(ga, r, x, gpu_ptr, gpu_replica)
            sum_a = t[ga] - f[xa] - m * mx[ga]
            e = replica_expert[r]
            for r2 in range(host_ptr[e], host_ptr[e + 1]):
                gb = host_gpu[r2]
                room = tok_cap - tok[gb]
                if r2 == r or t[gb] >= best or room <= 0:
                    continue
                dmax = xa if xa < room else room
                # max(giver, receiver) >= max(giver after giving all, receiver after taking 1)
                lo_a, _ = _pair(xa, xa, x[r2], t[ga], t[gb], sum_a, rest_a, mx[gb], f, m)
                _, lo_b = _pair(1, xa, x[r2], t[ga], t[gb], sum_a, rest_a, mx[gb], f, m)
                if (dmax == xa and lo_a > best) or lo_b > best:
                    continue
                d, v = _best_shift(xa, 1, dmax, x[r2], t[ga], t[gb], sum_a, rest_a, mx[gb], f, m)
                if v > best:
                    continue
                # local tokens the shift displaces (net of those it lets the receiver keep)
                loss = _kept(xa, local[r]) - _kept(xa - d, local[r])
                loss -= _kept(x[r2] + d, local[r2]) - _kept(x[r2], local[r2])
                if v < best or (best_r >= 0 and loss < best_loss):
                    best, best_loss, best_r, best_r2, best_d = v, loss, r, r2, d
            if best_r >= 0:
                break
        if best_r < 0:
            r, r2, d, r3, r4, d2 = _exchange(ga, t, mx, tok, tok_cap, x, f, m, graph)
            if r < 0:
                break
            x[r] -= d
            x[r2] += d
            x[r3] -= d2
            x[r4] += d2
            gb, gc = host_gpu[r2], host_gpu[r4]
            tok[ga] -= d
            tok[gb] += d - d2
            tok[gc] += d2
            for g in (ga, gb, gc):
                _refresh(g, t, mx, x, off, f, m, gpu_ptr, gpu_replica)
            steps += 1
            continue
        gb = host_gpu[best_r2]
        x[best_r] -= best_d
        x[best_r2] += best_d
        tok[ga] -= best_d
        tok[gb] += best_d
        for g in (ga, gb):
            _refresh(g, t, mx, x, off, f, m, gpu_ptr, gpu_replica)
        steps += 1
    return t, steps


@njit
def _exchange(ga, t, mx, tok, tok_cap, x, f, m, graph):
    """Two shifts for when no single one helps the slowest GPU ga (the token limit, or a plateau
    of equally slow GPUs, blocks them): ga gives d rows of slot r to replica r2 on gb (the pair's
    best d, or the whole slot), and gb passes at least what puts it over tok_cap (>= 1 row) of
    one of its slots r3 on to a replica r4 on a GPU gc with room (gc may be ga: a swap). Taken
    when ga, gb and gc all end below t[ga]; the lowest of those maxima wins (ties: the first in
    slot order). Returns (r, r2, d, r3, r4, d2), r = -1 when there is none; `x` is restored."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    best = t[ga]
    out = (-1, -1, 0, -1, -1, 0)
    for k in range(gpu_ptr[ga], gpu_ptr[ga + 1]):
        r = gpu_replica[k]
        xa = x[r]
        if xa == 0:
            continue
        rest_a = _other_max(ga, r, x, gpu_ptr, gpu_replica)
        sum_a = t[ga] - f[xa] - m * mx[ga]
        e = replica_expert[r]
        for r2 in range(host_ptr[e], host_ptr[e + 1]):
            if r2 == r:
                continue
            gb = host_gpu[r2]
            d_pair, _ = _best_shift(xa, 1, xa, x[r2], t[ga], t[gb], sum_a, rest_a, mx[gb], f, m)
            for which in range(2):
                d = d_pair if which == 0 else xa  # the pair's best shift, or the whole slot
                if which == 1 and d == d_pair:
                    continue
                best, out = _second_shift(
                    ga, r, r2, d, xa, sum_a, rest_a, best, out, t, mx, tok, tok_cap, x, f, m, graph
                )
    return out


@njit_inline
def _second_shift(ga, r, r2, d, xa, sum_a, rest_a, best, out, t, mx, tok, tok_cap, x, f, m, graph):
    """The best second shift of `_exchange` after d rows moved r -> r2; returns (best, out)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    gb = host_gpu[r2]
    new_a, t_b = _pair(d, xa, x[r2], t[ga], t[gb], sum_a, rest_a, mx[gb], f, m)
    if new_a >= best:
        return best, out
    need = tok[gb] + d - tok_cap  # gb must pass on at least this many rows (>= 1)
    if need < 1:
        need = 1
    x[r] -= d
    x[r2] += d
    mx_a = xa - d if xa - d > rest_a else rest_a
    mx_b = x[r2] if x[r2] > mx[gb] else mx[gb]
    for k3 in range(gpu_ptr[gb], gpu_ptr[gb + 1]):
        r3 = gpu_replica[k3]
        x3 = x[r3]
        if x3 < need:
            continue
        rest_b = _other_max(gb, r3, x, gpu_ptr, gpu_replica)
        sum_b = t_b - f[x3] - m * mx_b
        e3 = replica_expert[r3]
        for r4 in range(host_ptr[e3], host_ptr[e3 + 1]):
            gc = host_gpu[r4]
            if r4 == r3 or r4 == r or gc == gb:
                continue
            t_c = new_a if gc == ga else t[gc]
            room = tok_cap - (tok[ga] - d if gc == ga else tok[gc])
            dmax = x3 if x3 < room else room
            if dmax < need or t_c >= best:
                continue
            mx_c = mx_a if gc == ga else mx[gc]
            d2, v2 = _best_shift(x3, need, dmax, x[r4], t_b, t_c, sum_b, rest_b, mx_c, f, m)
            v = v2 if gc == ga or v2 > new_a else new_a
            if v < best:
                best = v
                out = (r, r2, d, r3, r4, d2)
    x[r] += d
    x[r2] -= d
    return best, out


@njit_inline
def _refresh(g, t, mx, x, off, f, m, gpu_ptr, gpu_replica):
    t[g] = gpu_time(g, x, off, f, m, gpu_ptr, gpu_replica)
    mx[g] = largest_slot(g, x, gpu_ptr, gpu_replica)


@njit
def timed_plan(
    counts,
    x,
    off,
    off_us,
    f,
    f_us,
    m,
    m_us,
    base,
    mean_cap,
    lin,
    conv_us,
    subadditive,
    cert,
    graph,
    max_steps,
):
    """The whole time-aware pass in one compiled call (see `timed.time_replica_quota`).

    Args: counts int64 [G, E]; x int64 [R] the token quota (modified in place); off/off_us
    int64/float64 [G] per-GPU offsets; f/f_us int64/float64 [N+1] slot-cost tables; m/m_us the
    max-slot coefficient; base int64 [G] tokens a GPU already has; mean_cap: no GPU's tokens may
    grow above max(mean_cap, the token plan's max load); lin, conv_us, subadditive, cert as in
    `lower_bound_us`; max_steps per search. Returns (x [R], predicted_us [G], token_predicted_us [G], lower_bound_us, steps).
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g, num_e = counts.shape
    load = np.zeros(num_e, dtype=np.int64)
    for g in range(num_g):
        for e in range(num_e):
            load[e] += counts[g, e]
    local = own_gpu_tokens(counts, graph)
    token_us = predict_times(x, off_us, f_us, m_us, gpu_ptr, gpu_replica)
    x0 = x.copy()
    tok_cap = max(mean_cap, gpu_tokens(x, base, host_gpu).max())
    x, steps = two_start_search(x, load, local, off, f, m, base, tok_cap, graph, max_steps)
    if _max_time(x, off, f, m, gpu_ptr, gpu_replica) >= _max_time(x0, off, f, m, gpu_ptr, gpu_replica):
        x = x0  # the slowest GPU did not get faster: keep the token plan and its locality
        steps = 0
    else:  # even out the splits where the model allows it for free (timed_smooth.py)
        smooth_splits(x, load, off, f, m, base, tok_cap, graph, SMOOTH_PASSES)
    out_us = predict_times(x, off_us, f_us, m_us, gpu_ptr, gpu_replica)
    bound = lower_bound_us(load, off_us, f_us, conv_us, m_us, lin, subadditive, cert, graph)
    return x, out_us, token_us, bound, steps


@njit
def two_start_search(x, load, local, off, f, m, base, tok_cap, graph, max_steps):
    """Local search from the token quota `x`. When that ends in a local optimum (not stopped by
    `max_steps`) that the integer per-expert bound (`expert_bound`) does not prove optimal, a
    second search from `consolidated_start`; the lower slowest-GPU time is kept (ties: the token
    start, which keeps more tokens local); the second is kept only if no GPU ends above tok_cap
    tokens. Returns (x int64 [R], steps taken in all)."""
    t1, s1 = local_search(x, local, off, f, m, base, tok_cap, graph, max_steps)
    if s1 >= max_steps or t1.max() <= expert_bound(load, off, f, m, graph):
        return x, s1
    x2 = consolidated_start(load, off, f, m, base, tok_cap, graph)
    t2, s2 = local_search(x2, local, off, f, m, base, tok_cap, graph, max_steps)
    if t2.max() < t1.max():
        if gpu_tokens(x2, base, graph[1]).max() <= tok_cap:
            return x2, s1 + s2
    return x, s1 + s2


@njit
def consolidated_start(load, off, f, m, base, tok_cap, graph):
    """Each expert's whole load on one replica: experts by decreasing load (ties: lower id), each
    onto the host whose time grows least to the lowest value among those that stay within
    tok_cap tokens if any (ties: lower replica index). Returns x int64 [R]; the local search
    then splits the experts where that pays."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = off.size
    x = np.zeros(host_gpu.size, dtype=np.int64)
    t = off.copy()
    tok = base.copy()
    mx = np.zeros(num_g, dtype=np.int64)
    order = np.argsort(-load, kind="mergesort")
    for i in range(order.size):
        e = order[i]
        v = load[e]
        if v == 0:
            continue
        best_r = -1
        best_t = 0
        best_fits = False
        for r in range(host_ptr[e], host_ptr[e + 1]):
            g = host_gpu[r]
            top = v if v > mx[g] else mx[g]
            nt = t[g] + f[v] + m * (top - mx[g])
            fits = tok[g] + v <= tok_cap
            if best_r < 0 or (fits and not best_fits) or (fits == best_fits and nt < best_t):
                best_r = r
                best_t = nt
                best_fits = fits
        g = host_gpu[best_r]
        x[best_r] = v
        t[g] = best_t
        tok[g] += v
        if v > mx[g]:
            mx[g] = v
    return x
