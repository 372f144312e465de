"""Compiled route fill: given per-replica quotas, decide which source sends how many tokens where.

The rule, fixed so every rank computes the same routes:
(1) every source keeps its own tokens on its local replica, up to that replica's quota;
(2) with a node map, remaining tokens fill the quotas of replicas on the source's node;
(3) the rest fills the remaining quotas, sources ascending, replicas ascending.
For a fixed quota, (1) and (2) maximize same-GPU and then same-node tokens of every expert (each
node's sources only meet that node's replicas in step 2), and every token is routed exactly once.

Legend: G GPUs, E experts, R replicas. `counts` int64 [G, E]: tokens on GPU src for expert e;
`replica_quota` int64 [R]: tokens replica r processes (a replica's "quota"; the per-GPU view
`Plan.quota` is [E, G]).

Output is a COO list (src, expert, dst, count) sorted by (src, expert); the entries of one
(src, expert) are in the order the source's contiguous tokens for that expert are cut: local,
same node, then the rest. So one source's entries tile its expert-sorted token buffer in order.
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.jit import njit, njit_inline


@njit_inline
def _emit(buf, n, s, e, d, t):
    buf[0, n] = s
    buf[1, n] = e
    buf[2, n] = d
    buf[3, n] = t
    return n + 1


@njit
def _nonzeros(counts):
    n = 0
    for s in range(counts.shape[0]):
        for e in range(counts.shape[1]):
            if counts[s, e] > 0:
                n += 1
    return n


@njit
def fill_routes(counts, replica_quota, graph, has_nodes, node_of):
    """counts int64 [G, E], replica_quota int64 [R], node_of int64 [G] (read only if has_nodes).

    Returns int64 [4, N]: rows (src, expert, dst, count), zero counts omitted.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_r = host_gpu.size
    kept = np.empty(num_r, dtype=np.int64)  # (1) tokens a replica takes from its own GPU
    dem = np.empty(num_r, dtype=np.int64)  # quota still open after step (1)
    for r in range(num_r):
        kept[r] = min(counts[host_gpu[r], replica_expert[r]], replica_quota[r])
        dem[r] = replica_quota[r] - kept[r]
    if not has_nodes:
        return _fill_source_major(counts, kept, dem, graph)
    return _fill_by_node(counts, kept, dem, host_ptr, host_gpu, replica_expert, node_of)


@njit_inline
def _fill_rest(buf, n, s, e, a, nxt, dem, host_gpu):
    """Step (3) for one (src, expert): a tokens into the expert's next replicas with open quota."""
    while a > 0:
        r = nxt[e]
        while dem[r] == 0:
            r += 1
        nxt[e] = r
        t = min(a, dem[r])
        n = _emit(buf, n, s, e, host_gpu[r], t)
        a -= t
        dem[r] -= t
    return n


@njit
def _fill_source_major(counts, kept, dem, graph):
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g, num_e = counts.shape
    buf = np.empty((4, _nonzeros(counts) + host_gpu.size), dtype=np.int64)
    nxt = host_ptr[:-1].copy()  # first replica of each expert that may still have open quota
    local_r = np.full(num_e, -1, dtype=np.int64)  # replica of e on the current source, or -1
    n = 0
    for s in range(num_g):
        for k in range(gpu_ptr[s], gpu_ptr[s + 1]):
            local_r[replica_expert[gpu_replica[k]]] = gpu_replica[k]
        for e in range(num_e):
            a = counts[s, e]
            if a == 0:
                continue
            r_loc = local_r[e]
            if r_loc >= 0 and kept[r_loc] > 0:
                n = _emit(buf, n, s, e, s, kept[r_loc])
                a -= kept[r_loc]
            n = _fill_rest(buf, n, s, e, a, nxt, dem, host_gpu)
        for k in range(gpu_ptr[s], gpu_ptr[s + 1]):
            local_r[replica_expert[gpu_replica[k]]] = -1
    return buf[:, :n]


@njit
def _fill_by_node(counts, kept, dem, host_ptr, host_gpu, replica_expert, node_of):
    num_g, num_e = counts.shape
    num_r = host_gpu.size
    buf = np.empty((4, 2 * _nonzeros(counts) + 3 * num_r), dtype=np.int64)
    left = counts.copy()
    n = 0
    for r in range(num_r):  # (1)
        g = host_gpu[r]
        e = replica_expert[r]
        left[g, e] -= kept[r]
        if kept[r] > 0:
            n = _emit(buf, n, g, e, g, kept[r])
    for s in range(num_g):  # (2) only the source's own node: no node takes another's quota first
        for e in range(num_e):
            a = left[s, e]
            r = host_ptr[e]
            while a > 0 and r < host_ptr[e + 1]:
                g = host_gpu[r]
                if node_of[g] == node_of[s] and dem[r] > 0:
                    t = min(a, dem[r])
                    n = _emit(buf, n, s, e, g, t)
                    a -= t
                    dem[r] -= t
                r += 1
            left[s, e] = a
    nxt = host_ptr[:-1].copy()
    for s in range(num_g):  # (3)
        for e in range(num_e):
            if left[s, e] > 0:
                n = _fill_rest(buf, n, s, e, left[s, e], nxt, dem, host_gpu)
    order = np.argsort(buf[0, :n] * num_e + buf[1, :n], kind="mergesort")  # stable: keeps cut order
    out = np.empty((4, n), dtype=np.int64)
    for k in range(4):
        out[k] = buf[k, :n][order]
    return out


# ------------------------------------------------------------------------------------------------
# One rank's share of the routes, without building the whole list (no node map). Each rank of a
# MicroEP group needs only what it sends and what it receives; both follow from the same rule as
# `fill_routes`: a source's remote tokens of expert e occupy the interval [P, P + a) of e's remote
# token sequence (sources ascending), replica r's open quota the interval [Q_r, Q_r + open_r)
# (replicas ascending), and an entry is the overlap of the two.


@njit
def routes_from_source(counts, replica_quota, src, graph):
    """The route entries of source `src`, in `fill_routes` order: int64 [3, n] (expert, dst, count)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g, num_e = counts.shape
    offset = np.zeros(num_e, dtype=np.int64)  # P: remote tokens of earlier sources, per expert
    for s in range(src):
        for e in range(num_e):
            offset[e] += counts[s, e]
    for r in range(host_gpu.size):
        g = host_gpu[r]
        if g < src:
            offset[replica_expert[r]] -= min(counts[g, replica_expert[r]], replica_quota[r])
    local_r = np.full(num_e, -1, dtype=np.int64)
    for k in range(gpu_ptr[src], gpu_ptr[src + 1]):
        local_r[replica_expert[gpu_replica[k]]] = gpu_replica[k]
    out = np.empty((3, num_e + host_gpu.size), dtype=np.int64)
    n = 0
    for e in range(num_e):
        a = counts[src, e]
        if a == 0:
            continue
        if local_r[e] >= 0:
            kept = min(a, replica_quota[local_r[e]])
            if kept > 0:
                out[0, n] = e
                out[1, n] = src
                out[2, n] = kept
                n += 1
                a -= kept
        lo = offset[e]
        q = 0
        for r in range(host_ptr[e], host_ptr[e + 1]):
            if a == 0:
                break
            g = host_gpu[r]
            open_r = replica_quota[r] - min(counts[g, e], replica_quota[r])
            t = min(lo + a, q + open_r) - max(lo, q)
            if t > 0:
                out[0, n] = e
                out[1, n] = g
                out[2, n] = t
                n += 1
                lo += t
                a -= t
            q += open_r
    return out[:, :n]


@njit
def routes_to_gpu(counts, replica_quota, dst, graph):
    """The route entries into GPU `dst`, sorted by (src, expert) as in `fill_routes`:
    int64 [3, n] (src, expert, count)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g, num_e = counts.shape
    lo_k, hi_k = gpu_ptr[dst], gpu_ptr[dst + 1]
    num_local = hi_k - lo_k
    got = np.zeros((num_g, num_local), dtype=np.int64)  # tokens from src for the k-th local replica
    experts = np.empty(num_local, dtype=np.int64)
    for i in range(num_local):
        r = gpu_replica[lo_k + i]
        e = replica_expert[r]
        experts[i] = e
        got[dst, i] = min(counts[dst, e], replica_quota[r])  # the replica's own GPU's tokens
        q_lo = 0  # Q_r: open quota of e's replicas before r
        for r2 in range(host_ptr[e], r):
            g2 = host_gpu[r2]
            q_lo += replica_quota[r2] - min(counts[g2, e], replica_quota[r2])
        q_hi = q_lo + replica_quota[r] - got[dst, i]
        p = 0  # P: remote tokens of e from sources before s
        for s in range(num_g):
            if p >= q_hi:
                break
            a = counts[s, e]
            for r2 in range(host_ptr[e], host_ptr[e + 1]):
                if host_gpu[r2] == s:
                    a -= min(counts[s, e], replica_quota[r2])
            t = min(p + a, q_hi) - max(p, q_lo)
            if t > 0:
                got[s, i] += t
            p += a
    order = np.argsort(experts)
    out = np.empty((3, num_g * num_local), dtype=np.int64)
    n = 0
    for s in range(num_g):
        for j in range(num_local):
            i = order[j]
            if got[s, i] > 0:
                out[0, n] = s
                out[1, n] = experts[i]
                out[2, n] = got[s, i]
                n += 1
    return out[:, :n]
