"""Compiled route fill: given per-replica quotas, decide which source sends how many tokens where.

For each expert, in a fixed order: (1) every source keeps its own tokens on its local replica up to
that replica's quota; (2) with a node map, remaining tokens fill quotas on the same node; (3) the
rest fills remaining quotas, sources and replicas both ascending. For a fixed quota, steps (1)+(2)
maximize same-GPU and then same-node tokens per expert, and every token is routed exactly once.

Output is a COO list (src, expert, dst, count), expert-major; for one (src, expert) its entries come
in the order tokens are cut from the source's contiguous token range.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan._jit import njit


@njit
def fill_routes(counts, quota, host_ptr, host_gpu, node_of):
    """counts int64 [G, E], quota int64 [R] (per replica), node_of int64 [G] (all -1 = no nodes).

    Returns (src, expert, dst, count) int64 arrays of equal length, zero counts omitted.
    """
    num_g, num_e = counts.shape
    cap_entries = num_g * num_e + host_gpu.size
    out_src = np.empty(cap_entries, dtype=np.int64)
    out_exp = np.empty(cap_entries, dtype=np.int64)
    out_dst = np.empty(cap_entries, dtype=np.int64)
    out_cnt = np.empty(cap_entries, dtype=np.int64)
    use_nodes = node_of[0] >= 0
    sup = np.empty(num_g, dtype=np.int64)
    dem = np.empty(host_gpu.size, dtype=np.int64)
    n = 0
    for e in range(num_e):
        lo = host_ptr[e]
        hi = host_ptr[e + 1]
        for s in range(num_g):
            sup[s] = counts[s, e]
        for r in range(lo, hi):
            dem[r] = quota[r]
        for r in range(lo, hi):  # (1) same GPU
            g = host_gpu[r]
            t = min(sup[g], dem[r])
            if t > 0:
                out_src[n] = g
                out_exp[n] = e
                out_dst[n] = g
                out_cnt[n] = t
                n += 1
                sup[g] -= t
                dem[r] -= t
        if use_nodes:  # (2) same node
            for r in range(lo, hi):
                g = host_gpu[r]
                s = 0
                while dem[r] > 0 and s < num_g:
                    if sup[s] > 0 and node_of[s] == node_of[g]:
                        t = min(sup[s], dem[r])
                        out_src[n] = s
                        out_exp[n] = e
                        out_dst[n] = g
                        out_cnt[n] = t
                        n += 1
                        sup[s] -= t
                        dem[r] -= t
                    s += 1
        s = 0  # (3) the rest, two pointers
        r = lo
        while s < num_g and r < hi:
            if sup[s] == 0:
                s += 1
                continue
            if dem[r] == 0:
                r += 1
                continue
            t = min(sup[s], dem[r])
            out_src[n] = s
            out_exp[n] = e
            out_dst[n] = host_gpu[r]
            out_cnt[n] = t
            n += 1
            sup[s] -= t
            dem[r] -= t
    return out_src[:n].copy(), out_exp[:n].copy(), out_dst[:n].copy(), out_cnt[:n].copy()
