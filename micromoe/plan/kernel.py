"""The compiled body of `schedule`: one call from counts to quota, max load and certificate.

One entry point keeps the per-micro-batch path to a single dispatch into compiled code; it also
does the sign check in the same pass that copies the counts.

Legend: G GPUs, E experts, R replicas; `counts` int64 [G, E] (tokens on GPU src for expert e),
`load` int64 [E], `base` int64 [G], `preferred` int64 [R] (tokens replica r takes first, see
`flow.py`), `node_of` int64 [G] (node of each GPU; read only when `has_nodes`).
"""

from __future__ import annotations

import numpy as np

from micromoe.plan.checks import MAX_TOTAL
from micromoe.plan.flow import solve_min_max
from micromoe.plan.jit import njit, njit_inline


@njit
def check_copy_sum(counts):
    """counts int64 [G, E] -> (a C-contiguous copy, load [E], ok), in one row-major pass.

    ok is False on a negative entry or a total of 2**53 tokens or more (the caller then explains).
    """
    num_g, num_e = counts.shape
    copy = np.empty((num_g, num_e), dtype=np.int64)
    load = np.zeros(num_e, dtype=np.int64)
    total = 0
    for s in range(num_g):
        for e in range(num_e):
            c = counts[s, e]
            if c < 0 or c >= MAX_TOTAL:
                return copy, load, False
            copy[s, e] = c
            total += c
            load[e] += c
        if total >= MAX_TOTAL:
            return copy, load, False
    return copy, load, True


@njit
def gpu_tokens(x, base, host_gpu):
    """int64 [G]: each GPU's tokens, base [G] plus the quota x [R] of its replicas."""
    tok = base.copy()
    for r in range(x.size):
        tok[host_gpu[r]] += x[r]
    return tok


@njit_inline
def own_gpu_tokens(counts, graph):
    """int64 [R]: the tokens of replica r's expert that already sit on replica r's GPU."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    out = np.empty(host_gpu.size, dtype=np.int64)
    for r in range(host_gpu.size):
        out[r] = counts[host_gpu[r], replica_expert[r]]
    return out


@njit
def preferred_with_nodes(counts, own_gpu, graph, node_of):
    """Tokens each replica should take first: `own_gpu` (its own GPU's, int64 [R]), plus an even
    share of the tokens of same-node GPUs that hold no replica of the expert (so quotas lean
    towards on-node traffic)."""
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    num_g, num_e = counts.shape
    num_nodes = node_of[num_g - 1] + 1
    node_supply = np.zeros((num_e, num_nodes), dtype=np.int64)
    hosted = np.zeros(num_e, dtype=np.bool_)
    for s in range(num_g):  # row by row: sequential reads of counts
        for k in range(gpu_ptr[s], gpu_ptr[s + 1]):
            hosted[replica_expert[gpu_replica[k]]] = True
        n = node_of[s]
        for e in range(num_e):
            if not hosted[e]:
                node_supply[e, n] += counts[s, e]
        for k in range(gpu_ptr[s], gpu_ptr[s + 1]):
            hosted[replica_expert[gpu_replica[k]]] = False
    pref = own_gpu.copy()
    node_reps = np.zeros(num_nodes, dtype=np.int64)
    for e in range(num_e):
        for r in range(host_ptr[e], host_ptr[e + 1]):
            node_reps[node_of[host_gpu[r]]] += 1
        for r in range(host_ptr[e], host_ptr[e + 1]):
            n = node_of[host_gpu[r]]
            share = node_supply[e, n] // node_reps[n]
            pref[r] += share
            node_supply[e, n] -= share
            node_reps[n] -= 1
    return pref


@njit
def plan_kernel(counts, base, has_nodes, node_of, graph):
    """Returns (ok, counts copy [G, E], replica_quota [R], max_load, certificate [G], gpu_load [G]).

    Routes follow from (counts, replica_quota) by the fixed rule in `route.py`, built when asked for.
    """
    host_ptr, host_gpu, gpu_ptr, gpu_replica, replica_expert = graph
    counts, load, ok = check_copy_sum(counts)
    if not ok:
        z = np.zeros(0, dtype=np.int64)
        return False, counts, z, 0, np.zeros(0, dtype=np.bool_), z
    preferred = own_gpu_tokens(counts, graph)
    if has_nodes:
        preferred = preferred_with_nodes(counts, preferred, graph, node_of)
    x, t, cert = solve_min_max(load, base, preferred, graph)
    return True, counts, x, t, cert, gpu_tokens(x, base, host_gpu)
