"""Even out each expert's split over its replicas after the time-aware search, where the model
allows it for free.

Legend: G GPUs, E experts, R replicas (see `placement.py`); times as in `timed_kernel.py`
(integer fixed-point units, t[g] = off[g] + sum_{r on g} f(x[r]) + m * max_{r on g} x[r]).

The local search only works on the slowest GPU, and the token plan it starts from splits an expert
over its replicas however the flow found it: a hot expert can end as [2922, 657, 719, 788, 673]
rows. Measured on one H200, the cost model prices such uneven slots 1-3% too cheaply against even
ones (a perfectly even split runs 2-3% faster than predicted, uneven plans 0-1.5%). So after the
search, `smooth_splits` moves rows from an expert's largest replica to its smallest one with
token room whenever the two GPUs' predicted times both end no higher than the higher of the two
was and their sum falls strictly: no GPU's predicted time rises above the pair's old maximum, so the
slowest GPU's predicted time never grows and tokens stay within the cap. The move tries half the
difference, then halves it (at most 8 tries). Experts go by decreasing load (ties: lower id); all
integer, so every rank makes the same moves.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit

MAX_HALVINGS = 8


@njit
def smooth_splits(x, load, off, f, m, base, tok_cap, graph, passes):
    """Even out replica splits in place (see the module docstring).

    Args: x int64 [R] quota (modified in place); load int64 [E] per-expert rows; off int64 [G];
    f int64 [N+1] (N >= max load); m int64; base int64 [G] tokens a GPU already has; tok_cap: no
    receiver ends above it; graph (host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert);
    passes: sweeps over the experts. Returns the number of moves made.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g = off.size
    tok = base.copy()
    for r in range(x.size):
        tok[host_gpu[r]] += x[r]
    t = np.empty(num_g, dtype=np.int64)
    for g in range(num_g):
        t[g] = _time(g, x, off, f, m, gpu_ptr, gpu_replica)
    order = np.argsort(-load, kind="mergesort")
    moves = 0
    for _ in range(passes):
        moved = 0
        for i in range(order.size):
            e = order[i]
            if host_ptr[e + 1] - host_ptr[e] < 2 or load[e] == 0:
                continue
            ra = host_ptr[e]
            for r in range(host_ptr[e] + 1, host_ptr[e + 1]):
                if x[r] > x[ra]:
                    ra = r
            rb, rc, rd, d = _best_swap(e, ra, x, graph)
            if rb >= 0 and _try(ra, rb, rc, rd, d, x, t, tok, tok_cap, off, f, m, graph):
                moved += 1
                continue
            rb = -1  # a single shift to the smallest replica with token room
            for r in range(host_ptr[e], host_ptr[e + 1]):
                if r != ra and tok[host_gpu[r]] < tok_cap and (rb < 0 or x[r] < x[rb]):
                    rb = r
            if rb >= 0:
                d = min((x[ra] - x[rb]) // 2, tok_cap - tok[host_gpu[rb]])
                if _try(ra, rb, -1, -1, d, x, t, tok, tok_cap, off, f, m, graph):
                    moved += 1
        moves += moved
        if moved == 0:
            break
    return moves


@njit
def _best_swap(e, ra, x, graph):
    """The token-neutral exchange that evens out most: expert e gives d rows from ra (on ga) to
    its replica rb (on gb) while another expert gives d rows from rc on gb to rd on ga, with
    d = half the smaller of the two differences. Returns (rb, rc, rd, d); rb = -1 if none."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    ga = host_gpu[ra]
    best_rb, best_rc, best_rd, best = -1, -1, -1, 1
    for rb in range(host_ptr[e], host_ptr[e + 1]):
        gap_e = x[ra] - x[rb]
        if rb == ra or gap_e <= 2 * best:
            continue
        gb = host_gpu[rb]
        for k in range(gpu_ptr[gb], gpu_ptr[gb + 1]):
            rc = gpu_replica[k]
            e2 = replica_expert[rc]
            if e2 == e:
                continue
            for rd in range(host_ptr[e2], host_ptr[e2 + 1]):
                if host_gpu[rd] != ga:
                    continue
                d = min(gap_e, x[rc] - x[rd]) // 2
                if d > best:
                    best_rb, best_rc, best_rd, best = rb, rc, rd, d
    return best_rb, best_rc, best_rd, best


@njit
def _try(ra, rb, rc, rd, d, x, t, tok, tok_cap, off, f, m, graph):
    """Shift d rows ra -> rb (and rc -> rd, the way back, when rc >= 0), halving d until both
    GPUs' times end <= their old maximum with a strictly lower sum; True if a shift was kept."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    ga, gb = host_gpu[ra], host_gpu[rb]
    old_max = t[ga] if t[ga] > t[gb] else t[gb]
    old_sum = t[ga] + t[gb]
    for _ in range(MAX_HALVINGS):
        if d < 1:
            return False
        x[ra] -= d
        x[rb] += d
        if rc >= 0:
            x[rc] -= d
            x[rd] += d
        na = _time(ga, x, off, f, m, gpu_ptr, gpu_replica)
        nb = _time(gb, x, off, f, m, gpu_ptr, gpu_replica)
        if na <= old_max and nb <= old_max and na + nb < old_sum:
            t[ga], t[gb] = na, nb
            if rc < 0:
                tok[ga] -= d
                tok[gb] += d
            return True
        x[ra] += d
        x[rb] -= d
        if rc >= 0:
            x[rc] += d
            x[rd] -= d
        d //= 2
    return False


@njit
def _time(g, x, off, f, m, gpu_ptr, gpu_replica):
    total = off[g]
    top = 0
    for k in range(gpu_ptr[g], gpu_ptr[g + 1]):
        v = x[gpu_replica[k]]
        total += f[v]
        if v > top:
            top = v
    return total + m * top
