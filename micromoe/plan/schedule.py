"""Per-micro-batch token scheduling over expert replicas (the MicroEP planner's entry point).

Legend: G GPUs in the MicroEP group, E experts, R replicas (see `slot_layout.py`). Shape suffixes
name the axes: `counts_GE[src, e]` is the number of (token, expert) selections on GPU src for
expert e (each top-k choice counts once), `base_G` the work a GPU already has. The plan says how
many tokens each replica processes (`replica_quota`, [R]; its per-GPU view `quota` is [E, G]) and
who sends what to whom (`route`). Integers throughout: no token is rounded away or duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import BoolArray, IntArray, as_int_array, positive_int
from micromoe.plan.flow import inside_load
from micromoe.plan.highs import highs_replica_quota
from micromoe.plan.kernel import check_copy_sum, gpu_tokens, own_gpu_tokens, plan_kernel
from micromoe.plan.placement import Placement
from micromoe.plan.route import fill_routes, routes_from_source, routes_to_gpu
from micromoe.plan.timed import SlotCostModel, time_replica_quota

Solver = Literal["flow", "highs"]


@dataclass(frozen=True, eq=False)
class Plan:
    """The schedule of one layer for one micro-batch; identical on every rank for the same input.

    Attributes:
        placement: the layout the plan is for.
        counts: int64 [G, E]; the scheduled counts (a read-only copy).
        replica_quota: int64 [R]; tokens processed by each replica (placement's replica order).
        max_load: the largest per-GPU load, base load included; equals ceil(T*) (optimal) unless
            the plan was made for a cost model (then it is the time plan's, >= ceil(T*)).
        gpu_load: int64 [G]; per-GPU load, base load included.
        certificate: bool [G]; a GPU set S with ceil((L_inside(S) + base(S)) / |S|) == max_load,
            which proves no plan has a smaller max load (L_inside: load of experts whose replicas
            all lie in S).
        gpus_per_node: GPUs per node the routes prefer (consecutive ids), None without nodes.
        predicted_us: float64 [G]; with `schedule(..., cost=model)`, the model's predicted expert
            time of each GPU under this plan; None for a token plan.
        time_lower_bound_us: with a cost model, a valid lower bound on the slowest GPU's predicted
            time of any plan (so max(predicted_us) / it bounds the gap to the time optimum).

    Routes follow from (counts, replica_quota) by the fixed rule of `route.py` and are built on
    first use: `route_src/route_expert/route_dst/route_count` (the whole COO list), `route`
    (dense), or one rank's share with `routes_from(src)` / `routes_to(dst)`, which is what a rank
    of the MicroEP group needs per micro-batch and costs a fraction of the whole list.
    """

    placement: Placement
    counts: IntArray
    replica_quota: IntArray
    max_load: int
    gpu_load: IntArray
    certificate: BoolArray
    gpus_per_node: int | None
    predicted_us: npt.NDArray[np.float64] | None = None
    time_lower_bound_us: float | None = None

    @property
    def has_nodes(self) -> bool:
        return self.gpus_per_node is not None

    @property
    def node_of(self) -> IntArray:
        """int64 [G]: the node of each GPU (all 0 without a node map)."""
        return _node_map(self.placement.num_gpus, self.gpus_per_node)

    @cached_property
    def quota(self) -> IntArray:
        """int64 [E, G]: tokens of expert e processed on GPU g."""
        p = self.placement
        q = np.zeros((p.num_experts, p.num_gpus), dtype=np.int64)
        q[p.replica_expert, p.host_gpu] = self.replica_quota
        return q

    @cached_property
    def _routes(self) -> IntArray:
        p = self.placement
        out = fill_routes(self.counts, self.replica_quota, p.graph, self.has_nodes, self.node_of)
        out.setflags(write=False)
        return out

    @property
    def route_src(self) -> IntArray:
        """int64 [N]: source GPU of each route entry. Entries are sorted by (src, expert); those
        of one (src, expert) come in the order the source's contiguous tokens of that expert are
        cut (local, same node, rest), so a source's entries tile its expert-sorted tokens."""
        return self._routes[0]

    @property
    def route_expert(self) -> IntArray:
        return self._routes[1]

    @property
    def route_dst(self) -> IntArray:
        return self._routes[2]

    @property
    def route_count(self) -> IntArray:
        return self._routes[3]

    @cached_property
    def route(self) -> IntArray:
        """int64 [G, E, G]: tokens sent from src to the replica of e on dst."""
        p = self.placement
        r = np.zeros((p.num_gpus, p.num_experts, p.num_gpus), dtype=np.int64)
        np.add.at(r, (self.route_src, self.route_expert, self.route_dst), self.route_count)
        return r

    def routes_from(self, src: int) -> IntArray:
        """int64 [3, n]: (expert, dst, count) of every entry with this source, in route order."""
        self._check_gpu(src)
        if self.has_nodes:  # node-aware routes have a second phase: read the whole list
            rows = self.route_src == src
            return np.stack([self.route_expert[rows], self.route_dst[rows], self.route_count[rows]])
        p = self.placement
        return routes_from_source(self.counts, self.replica_quota, src, p.graph)

    def routes_to(self, dst: int) -> IntArray:
        """int64 [3, n]: (src, expert, count) of every entry into `dst`, in route order."""
        self._check_gpu(dst)
        if self.has_nodes:
            rows = self.route_dst == dst
            return np.stack([self.route_src[rows], self.route_expert[rows], self.route_count[rows]])
        p = self.placement
        return routes_to_gpu(self.counts, self.replica_quota, dst, p.graph)

    def _check_gpu(self, gpu: int) -> None:
        if not 0 <= gpu < self.placement.num_gpus:
            raise ValueError(f"GPU {gpu} is outside the group's range [0, {self.placement.num_gpus})")


def schedule(
    counts: npt.ArrayLike,
    placement: Placement,
    *,
    base_load: npt.ArrayLike | None = None,
    gpus_per_node: int | None = None,
    solver: Solver = "flow",
    cost: SlotCostModel | None = None,
) -> Plan:
    """Optimal integer schedule of one micro-batch's tokens over the placement's replicas.

    Args:
        counts: int [G, E]; tokens on GPU src routed to expert e (>= 0).
        placement: the replica layout of the MicroEP group (G GPUs, E experts).
        base_load: int [G] >= 0; work a GPU already has (e.g. the first half of a split batch).
        gpus_per_node: GPUs per node (consecutive ids); the route then prefers same-node replicas.
        solver: "flow" (exact combinatorial solver, default) or "highs" (the paper's LP,
            warm-started HiGHS; needs `highspy`). The LP has no locality objective, so "highs"
            refuses `gpus_per_node` rather than silently ignore it.
        cost: a cost model (`micromoe.plan.cost.CostModel`): minimize the predicted slowest-GPU
            expert time instead of the max token load (`timed.py`: local search from the token
            optimum; the plan reports `predicted_us` and `time_lower_bound_us`). Base load is
            costed as one extra group of that many rows.

    Returns:
        A `Plan` with max_load == ceil(T*), the LP optimum; tokens stay on their source GPU
        wherever that GPU holds a replica with room at that max load.
    """
    counts_GE, base_G, gpus_per_node = _validate(counts, placement, base_load, gpus_per_node, solver)
    p = placement
    has_nodes = gpus_per_node is not None
    if solver == "flow":
        node_of = _node_map(p.num_gpus, gpus_per_node)
        ok, counts_copy, quota_R, max_load, cert, gpu_load = plan_kernel(
            counts_GE, base_G, has_nodes, node_of, p.graph
        )
    else:
        ok, counts_copy, quota_R, max_load, cert, gpu_load = _highs_plan(counts_GE, base_G, p)
    if not ok:  # the compiled pass found a negative entry or an oversized total: explain it
        as_int_array(counts_GE, "counts", counts_GE.shape)
        raise AssertionError("counts failed the compiled check but passed the slow one")
    timed = None
    if cost is not None:
        base = None if base_load is None else base_G
        timed = time_replica_quota(counts_copy, quota_R, p, cost, base_load=base, certificate=cert)
        quota_R = timed.replica_quota
        gpu_load = gpu_tokens(quota_R, base_G, p.host_gpu)
        max_load = gpu_load.max()
    for a in (counts_copy, quota_R, gpu_load, cert):
        a.setflags(write=False)
    if timed is None:
        return Plan(p, counts_copy, quota_R, int(max_load), gpu_load, cert, gpus_per_node)
    bound = timed.lower_bound_us
    return Plan(
        p, counts_copy, quota_R, int(max_load), gpu_load, cert, gpus_per_node, timed.predicted_us, bound
    )


def _highs_plan(counts_GE: IntArray, base_G: IntArray, p: Placement):
    counts_GE, load_E, ok = check_copy_sum(counts_GE)
    if not ok:
        return (False, counts_GE) + (None,) * 4
    quota_R, max_load, cert = highs_replica_quota(load_E, base_G, own_gpu_tokens(counts_GE, p.graph), p)
    return True, counts_GE, quota_R, max_load, cert, gpu_tokens(quota_R, base_G, p.host_gpu)


def certificate_bound(plan: Plan, counts: npt.ArrayLike, base_load: npt.ArrayLike | None = None) -> int:
    """ceil((L_inside(S) + base(S)) / |S|) for the plan's certificate S: a lower bound on any max load."""
    p = plan.placement
    load = np.asarray(counts, dtype=np.int64).sum(axis=0)
    base = np.zeros(p.num_gpus, np.int64) if base_load is None else np.asarray(base_load, np.int64)
    s = np.asarray(plan.certificate, dtype=np.bool_)
    num = int(inside_load(load, p.host_ptr, p.host_gpu, s)) + int(base[s].sum())
    return -(-num // int(s.sum()))


@lru_cache(maxsize=64)
def _node_map(num_gpus: int, gpus_per_node: int | None) -> IntArray:
    """int64 [G]: node of each GPU (consecutive ids); all 0 (one node) without a node map."""
    out = np.arange(num_gpus, dtype=np.int64) // (gpus_per_node or num_gpus)
    out.setflags(write=False)
    return out


def _validate(
    counts: npt.ArrayLike,
    placement: Placement,
    base_load: npt.ArrayLike | None,
    gpus_per_node: int | None,
    solver: str,
) -> tuple[IntArray, IntArray, int | None]:
    if not isinstance(placement, Placement):
        raise ValueError(f"placement must be a micromoe.plan.Placement, got {type(placement).__name__}")
    if solver not in ("flow", "highs"):
        raise ValueError(f"unknown solver {solver!r}; use 'flow' or 'highs'")
    g, e = placement.num_gpus, placement.num_experts
    if isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.shape == (g, e):
        counts_GE = counts  # hot path: the compiled kernel checks signs and totals in its first pass
    else:
        counts_GE = as_int_array(counts, "counts", (g, e))
    if base_load is None:
        base_G = np.zeros(g, dtype=np.int64)
    else:
        base_G = as_int_array(base_load, "base_load", (g,))
    if gpus_per_node is not None:
        gpus_per_node = positive_int(gpus_per_node, "gpus_per_node")
        if g % gpus_per_node:
            raise ValueError(f"gpus_per_node={gpus_per_node} does not divide the group's {g} GPUs")
        if solver == "highs":
            raise ValueError(
                "solver='highs' solves the paper's LP, which has no same-node preference, so it cannot "
                f"honour gpus_per_node={gpus_per_node}; use solver='flow' or leave gpus_per_node out"
            )
    return counts_GE, base_G, gpus_per_node
