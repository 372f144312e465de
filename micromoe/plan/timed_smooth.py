"""Even out each expert's split over its replicas after the time-aware search, where the model
allows it for free.

Legend: G GPUs, E experts, R replicas (see `placement.py`); times as in `timed_kernel.py`
(integer fixed-point units, t[g] = off[g] + sum_{r on g} f(x[r]) + m * max_{r on g} x[r]).

The local search only works on the slowest GPU, and the token plan it starts from splits an expert
over its replicas however the flow found it: a hot expert can end as [2922, 657, 719, 788, 673]
rows. Measured on one H200, the cost model prices such uneven slots 1-3% too cheaply against even
ones (a perfectly even split runs 2-3% faster than predicted, uneven plans 0-1.5%). So after the
search, `smooth_splits` moves rows from an expert's largest replica to a smaller one whenever the
two GPUs' predicted times both end no higher than the higher of the two was and their sum falls
strictly: no GPU's predicted time rises above the pair's old maximum, so the slowest GPU's
predicted time never grows. First choice is a token-neutral exchange (another expert hosted on
both GPUs moves as many rows the other way, `_best_swap`), else a single shift to the smallest
replica with token room below the cap. A move tries half the difference, then halves it (at most
`MAX_HALVINGS` tries); experts within 1 / `MIN_SPREAD` of even are left. Experts go by
decreasing load (ties: lower id); all integer, so every rank makes the same moves. Cost: about
+5 us at 32x8x2 and +80 us at 256x64x4 per plan (one pass, loaded 2-core VM).
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit, njit_inline
from micromoe.plan.kernel import gpu_tokens
from micromoe.plan.timed_bound import gpu_time, largest_slot

MAX_HALVINGS = 4
MIN_SPREAD = 8  # experts whose replicas differ by less than 1/8 of the largest are left


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
    tok = gpu_tokens(x, base, host_gpu)
    t = np.empty(num_g, dtype=np.int64)
    mx = np.empty(num_g, dtype=np.int64)
    for g in range(num_g):
        t[g] = gpu_time(g, x, off, f, m, gpu_ptr, gpu_replica)
        mx[g] = largest_slot(g, x, gpu_ptr, gpu_replica)
    order = np.argsort(-load, kind="mergesort")
    on_ga = np.full(load.size, -1, dtype=np.int64)
    moves = 0
    for _ in range(passes):
        moved = 0
        for i in range(order.size):
            e = order[i]
            if host_ptr[e + 1] - host_ptr[e] < 2 or load[e] == 0:
                continue
            ra = host_ptr[e]
            low = x[ra]
            for r in range(host_ptr[e] + 1, host_ptr[e + 1]):
                if x[r] > x[ra]:
                    ra = r
                low = min(low, x[r])
            if (x[ra] - low) * MIN_SPREAD <= x[ra]:
                continue  # already within 1 / MIN_SPREAD of even
            rb, rc, rd, d = _best_swap(e, ra, x, graph, on_ga)
            if rb >= 0 and _try(ra, rb, rc, rd, d, x, t, mx, tok, f, m, graph):
                moved += 1
                continue
            rb = -1  # a single shift to the smallest replica with token room
            for r in range(host_ptr[e], host_ptr[e + 1]):
                if r != ra and tok[host_gpu[r]] < tok_cap and (rb < 0 or x[r] < x[rb]):
                    rb = r
            if rb >= 0:
                d = min((x[ra] - x[rb]) // 2, tok_cap - tok[host_gpu[rb]])
                if _try(ra, rb, -1, -1, d, x, t, mx, tok, f, m, graph):
                    moved += 1
        moves += moved
        if moved == 0:
            break
    return moves


@njit_inline
def _best_swap(e, ra, x, graph, on_ga):
    """The token-neutral exchange that evens out most: expert e gives d rows from ra (on ga) to
    its replica rb (on gb) while another expert gives d rows from rc on gb to rd on ga, with
    d = half the smaller of the two differences. on_ga: int64 [E] scratch, all -1 (left so).
    Returns (rb, rc, rd, d); rb = -1 if none."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    ga = host_gpu[ra]
    for k in range(gpu_ptr[ga], gpu_ptr[ga + 1]):
        on_ga[replica_expert[gpu_replica[k]]] = gpu_replica[k]
    best_rb, best_rc, best_rd, best = -1, -1, -1, 1
    for rb in range(host_ptr[e], host_ptr[e + 1]):
        gap_e = x[ra] - x[rb]
        if rb == ra or gap_e <= 2 * best:
            continue
        gb = host_gpu[rb]
        for k in range(gpu_ptr[gb], gpu_ptr[gb + 1]):
            rc = gpu_replica[k]
            rd = on_ga[replica_expert[rc]]
            if rd < 0 or rc == rb:
                continue
            d = min(gap_e, x[rc] - x[rd]) // 2
            if d > best:
                best_rb, best_rc, best_rd, best = rb, rc, rd, d
    for k in range(gpu_ptr[ga], gpu_ptr[ga + 1]):
        on_ga[replica_expert[gpu_replica[k]]] = -1
    return best_rb, best_rc, best_rd, best


@njit_inline
def _try(ra, rb, rc, rd, d, x, t, mx, tok, f, m, graph):
    """Shift d rows ra -> rb (and rc -> rd, the way back, when rc >= 0), halving d until both
    GPUs' times end <= their old maximum with a strictly lower sum; True if a shift was kept.
    Times are updated from the changed slots (4 table reads) and each GPU's largest slot."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    ga, gb = host_gpu[ra], host_gpu[rb]
    old_max = t[ga] if t[ga] > t[gb] else t[gb]
    old_sum = t[ga] + t[gb]
    xa, xb = x[ra], x[rb]
    xc = x[rc] if rc >= 0 else 0
    xd = x[rd] if rc >= 0 else 0
    for _ in range(MAX_HALVINGS):
        if d < 1:
            return False
        x[ra] = xa - d
        x[rb] = xb + d
        na = t[ga] + f[xa - d] - f[xa]
        nb = t[gb] + f[xb + d] - f[xb]
        if rc >= 0:
            x[rc] = xc - d
            x[rd] = xd + d
            na += f[xd + d] - f[xd]
            nb += f[xc - d] - f[xc]
        top_a = largest_slot(ga, x, gpu_ptr, gpu_replica)
        top_b = largest_slot(gb, x, gpu_ptr, gpu_replica)
        na += m * (top_a - mx[ga])
        nb += m * (top_b - mx[gb])
        if na <= old_max and nb <= old_max and na + nb < old_sum:
            t[ga], t[gb], mx[ga], mx[gb] = na, nb, top_a, top_b
            if rc < 0:
                tok[ga] -= d
                tok[gb] += d
            return True
        x[ra], x[rb] = xa, xb
        if rc >= 0:
            x[rc], x[rd] = xc, xd
        d //= 2
    return False
