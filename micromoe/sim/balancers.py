"""The balancers a simulation compares; each turns one layer's routing counts into expert quotas.

Legend: G GPUs in the group, E experts, d replicas per expert, S = E * d / G slots per GPU.

Every replicating balancer gets the same G * S = E * d expert slots (LPLB, at most 2 copies per
expert, uses 2 * E of them). A balancer sees one (layer, micro-batch) at a time and returns
quota_EG int64 [E, G]: tokens of expert e processed on GPU g (rows sum to the expert's load). The
runner times every `decide` call the same way, so scheduling times compare across balancers.
Adaptive balancers then `observe` the loads, so they only ever use earlier micro-batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from micromoe.plan import Placement, schedule
from micromoe.plan.checks import IntArray, positive_int
from micromoe.plan.cost import CostModel
from micromoe.plan.forecast import ReplacementPolicy
from micromoe.plan.slot_layout import SlotLayout
from micromoe.plan.timed import check_cost_model
from micromoe.plan.timed_layouts import ideal_time_us
from micromoe.sim.eplb import eplb_slots, even_quota
from micromoe.sim.lplb import (
    LplbIpmSolver,
    LplbSolver,
    Topology,
    default_topology,
    lplb_layout,
    topology_neighbours,
)
from micromoe.sim.workload import Workload

BALANCERS = ("ep", "eplb", "lplb", "microep", "microep-ar", "bound")


@dataclass(frozen=True)
class GroupConfig:
    """The group every balancer runs on; validated as a whole when built (ValueError naming the
    option). What depends on a workload's expert count is checked when a balancer is set up.

    Attributes:
        num_gpus: G, GPUs in the MicroEP group.
        replicas: d, replicas per expert (1 <= d <= G, d divides G): E * d slots in all.
        gpus_per_node: GPUs per node (divides G) for node-aware plans and off-node traffic, or None.
        lplb_topology: the graph LPLB copies along (None: its default for G).
        lplb_solver: "exact" (HiGHS, LPLB's layout at its best) or "ipm" (LPLB's own 5-step
            interior-point method, `LplbIpmSolver`).
        ar_interval: microep-ar re-checks a layer's placement every this many micro-batches.
        seed: non-negative seed of the replacement search.
        cost_model: expert-GEMM cost model; when given, microep and microep-ar plan for predicted
            GPU time (`schedule(..., cost=)`) and microep-ar replaces by predicted time
            (`plan.forecast.ReplacementPolicy`: starts from the history, realized trigger, hysteresis).
    """

    num_gpus: int
    replicas: int
    gpus_per_node: int | None = None
    lplb_topology: Topology | None = None
    lplb_solver: str = "exact"
    ar_interval: int = 4
    seed: int = 0
    cost_model: CostModel | None = None

    def __post_init__(self) -> None:
        g = positive_int(self.num_gpus, "--gpus")
        d = positive_int(self.replicas, "--replicas")
        if d > g:
            raise ValueError(f"--replicas {d} must be between 1 and --gpus {g}")
        gpn = self.gpus_per_node
        if gpn is not None and g % positive_int(gpn, "--gpus-per-node"):
            raise ValueError(f"--gpus-per-node {gpn} must be positive and divide the {g} GPUs")
        if self.lplb_solver not in ("exact", "ipm"):
            raise ValueError(f"--lplb-solver must be 'exact' or 'ipm', got {self.lplb_solver!r}")
        if self.lplb_topology is not None:
            topology_neighbours(g, self.lplb_topology, gpn)  # ValueError if the graph does not fit G
        positive_int(self.ar_interval, "--ar-interval")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.cost_model is not None:
            check_cost_model(self.cost_model)


class Balancer(ABC):
    """One strategy. `setup` per workload (placements from its history), then `decide` per layer."""

    name: str

    def __init__(self, cfg: GroupConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def setup(self, workload: Workload) -> None: ...

    @abstractmethod
    def decide(self, layer: int, counts: IntArray) -> IntArray:
        """quota_EG int64 [E, G] for counts int64 [G, E] of one micro-batch of `layer` (timed by
        the runner: put per-workload preparation in `setup`, not here)."""

    def observe(self, layer: int, loads: IntArray) -> None:
        """Called with the per-expert loads [E] after each decision; static balancers ignore it."""
        del layer, loads

    def info(self) -> dict[str, Any]:
        """Extra facts for the report (slots used, replacements made, ...)."""
        return {}

    def placement(self, layer: int) -> SlotLayout | None:
        """The replica layout behind `layer`'s decisions, for the report's "own opt" (the LP optimum
        of the balancer's own placement); None when every decision already is that optimum (plain
        EP has no choice, MicroEP schedules exactly)."""
        del layer
        return None

    def local_slots(self, layer: int) -> IntArray | None:
        """int64 [E, G]: local slots expert e has on GPU g in `layer`, where one expert can hold
        several on one GPU (each a weight copy and GEMM group); None when it holds at most one."""
        del layer
        return None


class ExpertParallel(Balancer):
    """Plain EP: `Placement.expert_parallel`, GPU g holds experts g*E/G .. (g+1)*E/G - 1, no replicas."""

    name = "ep"

    def setup(self, workload: Workload) -> None:
        p = Placement.expert_parallel(self.cfg.num_gpus, workload.num_experts)
        self._owner = p.host_gpu  # one replica per expert: the GPU of expert e

    def decide(self, layer: int, counts: IntArray) -> IntArray:
        loads = counts.sum(axis=0)
        quota = np.zeros((loads.size, self.cfg.num_gpus), dtype=np.int64)
        quota[np.arange(loads.size), self._owner] = loads
        return quota

    def info(self) -> dict[str, Any]:
        return {"slots": int(self._owner.size)}


class Eplb(Balancer):
    """DeepSeek EPLB: placement per layer from the history, tokens split evenly over replicas."""

    name = "eplb"

    def setup(self, workload: Workload) -> None:
        g, e = self.cfg.num_gpus, workload.num_experts
        slots_per_gpu = _slots_per_gpu(e, g, self.cfg.replicas)
        self._slots = [eplb_slots(workload.history[l], g, slots_per_gpu) for l in range(workload.num_layers)]
        self._num_experts = e
        self._layouts: dict[int, SlotLayout] = {}
        self._local_slots = [_slot_multiplicity(s, e) for s in self._slots]

    def decide(self, layer: int, counts: IntArray) -> IntArray:
        return even_quota(counts.sum(axis=0), self._slots[layer])

    def local_slots(self, layer: int) -> IntArray:
        return self._local_slots[layer]

    def placement(self, layer: int) -> SlotLayout:
        if layer not in self._layouts:  # built once per layer, outside the timed decision
            hosts = np.zeros((self.cfg.num_gpus, self._num_experts), dtype=bool)
            hosts[np.arange(self.cfg.num_gpus)[:, None], self._slots[layer]] = True
            self._layouts[layer] = _host_layout(hosts)
        return self._layouts[layer]

    def info(self) -> dict[str, Any]:
        return {"slots": int(self._slots[0].size)}


class Lplb(Balancer):
    """LPLB-style: one copy per expert along LPLB's directed topology, per-micro-batch LP (`lplb.py`)."""

    name = "lplb"

    def setup(self, workload: Workload) -> None:
        g = self.cfg.num_gpus
        self.topology = self.cfg.lplb_topology or default_topology(g, self.cfg.gpus_per_node)
        self._solvers = []
        for l in range(workload.num_layers):
            orig, copy = lplb_layout(workload.history[l], g, self.topology, self.cfg.gpus_per_node)
            solver = LplbIpmSolver if self.cfg.lplb_solver == "ipm" else LplbSolver
            self._solvers.append(solver(orig, copy, g))
        self._slots = 2 * workload.num_experts
        self._layouts: dict[int, SlotLayout] = {}

    def decide(self, layer: int, counts: IntArray) -> IntArray:
        return self._solvers[layer].quota(counts.sum(axis=0))

    def placement(self, layer: int) -> SlotLayout:
        if layer not in self._layouts:  # built once per layer, outside the timed decision
            solver = self._solvers[layer]
            hosts = np.zeros((self.cfg.num_gpus, solver.orig_gpu.size), dtype=bool)
            experts = np.arange(solver.orig_gpu.size)
            hosts[solver.orig_gpu, experts] = hosts[solver.copy_gpu, experts] = True
            self._layouts[layer] = _host_layout(hosts)
        return self._layouts[layer]

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slots": self._slots,
            "topology": self.topology,
            "solver": self.cfg.lplb_solver,
        }
        if self.cfg.lplb_solver == "ipm":  # micro-batches where LPLB's check rejected the IPM result
            out["ipm_fallbacks"] = sum(s.fallbacks for s in self._solvers)
        return out


class MicroEP(Balancer):
    """Our planner on the static symmetric placement: the exact optimum every micro-batch."""

    name = "microep"

    def setup(self, workload: Workload) -> None:
        g, e = self.cfg.num_gpus, workload.num_experts
        _slots_per_gpu(e, g, self.cfg.replicas)
        base = Placement.symmetric(g, e, self.cfg.replicas)
        self.placements = [base] * workload.num_layers
        _warm_up(base)

    def decide(self, layer: int, counts: IntArray) -> IntArray:
        plan = schedule(
            counts, self.placements[layer], gpus_per_node=self.cfg.gpus_per_node, cost=self.cfg.cost_model
        )
        self.last_plan = plan
        return plan.quota

    def info(self) -> dict[str, Any]:
        p = self.placements[0]  # slots are memory: a time-aware placement may leave some empty
        return {"slots": int(p.slot_expert.size), "replicas": int(p.num_replicas_total)}


class MicroEPAdaptive(MicroEP):
    """MicroEP with adaptive replacement, as `micromoe train` runs it: `ReplacementPolicy` starts
    every layer load-aware from its history (the one EPLB and LPLB get; scaled to the rows of a
    micro-batch, known in advance as batch size x top-k), then re-places it on the realized-
    imbalance trigger and every `ar_interval` micro-batches, with hysteresis. Scores are tokens
    (T*/mean), or predicted time with a cost model; a new placement serves from the next
    micro-batch on (migration cost not modelled)."""

    name = "microep-ar"

    def setup(self, workload: Workload) -> None:
        super().setup(workload)
        self.placements = list(self.placements)
        self._policy = ReplacementPolicy(
            workload.num_layers,
            workload.num_experts,
            cost=self.cfg.cost_model,
            interval=self.cfg.ar_interval,
            seed=self.cfg.seed,
        )
        first = workload.first_micro_batch() if workload.num_micro_batches else None
        for l in range(workload.num_layers):
            hist = workload.history[l]
            rows = float(first[l].sum()) if first is not None else 0.0
            scaled = hist * (rows / hist.sum()) if hist.sum() > 0 and rows > 0 else None
            self.placements[l] = self._policy.start(l, self.placements[l], history=scaled)

    def observe(self, layer: int, loads: IntArray) -> None:
        realized = None  # tokens: the policy scores the placement on these loads (= the exact plan's)
        cost = self.cfg.cost_model
        if cost is not None:
            p = self.placements[layer]
            ideal = ideal_time_us(np.asarray(loads, dtype=np.int64), p.num_gpus, p.slots_per_gpu, cost)
            realized = float(self.last_plan.predicted_us.max()) / ideal
        r = self._policy.observe(layer, loads, realized=realized)
        if r.replace:
            self.placements[layer] = r.placement

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "replacements": sum(e.rule != "history" for e in self._policy.events),  # the start is no move
            "ar_interval": self.cfg.ar_interval,
            "replacement_log": [
                {"layer": e.layer, "micro_batch": e.micro_batch, "rule": e.rule, "reason": e.reason}
                for e in self._policy.events
            ],
        }


def make_balancers(names: list[str], cfg: GroupConfig) -> list[Balancer]:
    """Balancer objects for `names` (order kept); 'bound' is computed by the runner, not here."""
    classes = {c.name: c for c in (ExpertParallel, Eplb, Lplb, MicroEP, MicroEPAdaptive)}
    out = []
    for n in names:
        if n == "bound":
            continue
        if n not in classes:
            raise ValueError(f"unknown balancer {n!r}; choose from {', '.join(BALANCERS)}")
        out.append(classes[n](cfg))
    return out


def _slots_per_gpu(num_experts: int, num_gpus: int, replicas: int) -> int:
    """Slots per GPU for E experts x d replicas on G GPUs (GroupConfig already checked d and G)."""
    if (num_experts * replicas) % num_gpus:
        raise ValueError(
            f"{num_experts} experts x {replicas} replicas = {num_experts * replicas} slots do not split "
            f"evenly over {num_gpus} GPUs; any --replicas d with experts x d divisible by --gpus works"
        )
    return num_experts * replicas // num_gpus


def _slot_multiplicity(slot_expert: IntArray, num_experts: int) -> IntArray:
    """int64 [E, G]: how many of GPU g's slots hold expert e (slot_expert int [G, S], -1 empty)."""
    g_idx = np.repeat(np.arange(slot_expert.shape[0]), slot_expert.shape[1])
    flat = slot_expert.ravel()
    mult = np.zeros((num_experts, slot_expert.shape[0]), dtype=np.int64)
    np.add.at(mult, (flat[flat >= 0], g_idx[flat >= 0]), 1)
    return mult


def _host_layout(hosts_GE: np.ndarray) -> SlotLayout:
    """A slot layout with the given host sets (bool [G, E]): expert e sits in slot e of every GPU
    that hosts it, so any host sets obey the local-slot rule and the planner's density lemma gives
    their LP optimum (which depends only on the host sets)."""
    num_experts = hosts_GE.shape[1]
    return SlotLayout.from_slots(np.where(hosts_GE, np.arange(num_experts), -1), num_experts=num_experts)


def _warm_up(p: Placement) -> None:
    """Compile the planner's kernels before anything is timed (numba caches them on disk)."""
    schedule(np.ones((p.num_gpus, p.num_experts), dtype=np.int64), p)
