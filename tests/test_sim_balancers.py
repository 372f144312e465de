"""Balancer invariants on random inputs, each against an independent reference.

Legend: M micro-batches, L layers, G GPUs, E experts, d replicas.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import highspy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement, lp_optimum_brute_force, schedule
from micromoe.sim.balancers import GroupConfig
from micromoe.sim.eplb import balanced_packing, eplb_slots, even_quota, replicate_experts
from micromoe.sim.lplb import LplbSolver, lplb_layout, topology_neighbours
from micromoe.sim.metrics import traffic
from micromoe.sim.runner import simulate
from micromoe.sim.workload import Workload

ALL = ["ep", "eplb", "lplb", "microep", "microep-ar", "bound"]


@st.composite
def workloads(draw, max_gpus: int = 8) -> tuple[Workload, GroupConfig]:
    """Small random skewed workloads on a valid group (E divisible by G, d dividing G)."""
    g = draw(st.sampled_from([g for g in (2, 4, 8) if g <= max_gpus]))
    d = draw(st.sampled_from([d for d in (1, 2, 4) if d <= g]))
    e = g * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    m, layers = draw(st.integers(2, 6)), draw(st.integers(1, 2))
    hot = rng.pareto(draw(st.sampled_from([0.7, 1.5, 5.0])), size=(layers, e)) + 1e-3
    counts = rng.poisson(hot[None, :, None, :] * rng.uniform(1, 60), size=(m, layers, g, e))
    w = Workload("random", counts.astype(np.int64), hot, top_k=1)
    return w, GroupConfig(num_gpus=g, replicas=d, ar_interval=draw(st.integers(1, 3)), seed=seed % 100)


def _max_loads(w: Workload, cfg: GroupConfig, names: list[str]) -> dict[str, np.ndarray]:
    (res,) = simulate([w], names, cfg, progress=False)
    return {n: s.max_load for n, s in res.samples.items()}


@settings(max_examples=25, deadline=None)
@given(workloads())
def test_no_balancer_beats_the_bound(case) -> None:
    w, cfg = case
    loads = _max_loads(w, cfg, ALL)
    bound = -(-w.counts.sum(axis=(2, 3)) // cfg.num_gpus)
    np.testing.assert_array_equal(loads["bound"], bound)
    for name in ALL:
        assert np.all(loads[name] >= bound), name


@settings(max_examples=25, deadline=None)
@given(workloads())
def test_ep_equals_direct_computation(case) -> None:
    w, cfg = case
    per_gpu = w.num_experts // cfg.num_gpus
    expected = np.zeros((w.num_micro_batches, w.num_layers), dtype=np.int64)
    for m, l in itertools.product(range(w.num_micro_batches), range(w.num_layers)):
        totals = [int(w.counts[m, l, :, g * per_gpu : (g + 1) * per_gpu].sum()) for g in range(cfg.num_gpus)]
        expected[m, l] = max(totals)
    np.testing.assert_array_equal(_max_loads(w, cfg, ["ep"])["ep"], expected)


@settings(max_examples=20, deadline=None)
@given(workloads())
def test_microep_equals_ceil_of_brute_force_lp(case) -> None:
    w, cfg = case
    p = Placement.symmetric(cfg.num_gpus, w.num_experts, cfg.replicas)
    got = _max_loads(w, cfg, ["microep"])["microep"]
    for m, l in itertools.product(range(w.num_micro_batches), range(w.num_layers)):
        t = lp_optimum_brute_force(w.counts[m, l].sum(axis=0), p)
        assert got[m, l] == -((-t.numerator) // t.denominator)


def _highs_min_max(loads: np.ndarray, hosts: list[list[int]], num_gpus: int) -> float:
    """The paper's LP built here from scratch: min T s.t. sum_g x[e,g] = L_e, sum_e x[e,g] <= T."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    cols = [(e, g) for e in range(len(hosts)) for g in hosts[e]]
    n = len(cols)
    h.addVars(n + 1, np.zeros(n + 1), np.full(n + 1, highspy.kHighsInf))
    h.changeColsCost(1, np.array([n], dtype=np.int32), np.array([1.0]))
    for e in range(len(hosts)):
        idx = np.array([i for i, c in enumerate(cols) if c[0] == e], dtype=np.int32)
        h.addRow(float(loads[e]), float(loads[e]), idx.size, idx, np.ones(idx.size))
    for g in range(num_gpus):
        idx = np.array([i for i, c in enumerate(cols) if c[1] == g] + [n], dtype=np.int32)
        val = np.array([1.0] * (idx.size - 1) + [-1.0])
        h.addRow(-highspy.kHighsInf, 0.0, idx.size, idx, val)
    h.run()
    return h.getInfo().objective_function_value


@pytest.mark.parametrize(("g", "e", "d"), [(16, 32, 2), (8, 32, 2), (12, 24, 3)])
def test_microep_equals_ceil_of_highs_lp(g: int, e: int, d: int) -> None:
    rng = np.random.default_rng(g * e * d)
    counts = rng.poisson(rng.pareto(1.0, size=e) * 40, size=(6, 1, g, e)).astype(np.int64)
    w = Workload("skewed", counts, np.ones((1, e)), top_k=1)
    got = _max_loads(w, GroupConfig(num_gpus=g, replicas=d), ["microep"])["microep"][:, 0]
    p = Placement.symmetric(g, e, d)
    hosts = [p.hosts(x).tolist() for x in range(e)]
    for m in range(counts.shape[0]):
        t = _highs_min_max(counts[m, 0].sum(axis=0), hosts, g)
        assert got[m] == int(np.ceil(t - 1e-6))


def test_microep_traffic_matches_planner_routes() -> None:
    """The locality-first traffic count equals what the planner's own routes keep local."""
    rng = np.random.default_rng(7)
    p = Placement.symmetric(8, 32, 2)
    for _ in range(10):
        counts = rng.poisson(rng.pareto(1.2, size=32) * 30, size=(8, 32)).astype(np.int64)
        plan = schedule(counts, p, gpus_per_node=4)
        route = plan.route  # [src, e, dst]
        stay = sum(int(route[g, :, g].sum()) for g in range(8))
        same_node = sum(int(route[a, :, b].sum()) for a in range(8) for b in range(8) if a // 4 == b // 4)
        remote, off_node = traffic(counts, plan.quota, 4)
        assert remote == counts.sum() - stay
        assert off_node == counts.sum() - same_node


# ------------------------------------------------------------------------------------------------
# EPLB


def test_eplb_replicates_hottest_per_replica() -> None:
    # loads 10, 1, 1, 1 and 7 slots: 10 -> 10/2=5 -> 10/3=3.3 -> then 10/4=2.5 still beats 1
    phy2log = replicate_experts([10.0, 1.0, 1.0, 1.0], 7)
    assert phy2log.tolist() == [0, 1, 2, 3, 0, 0, 0]
    # a tie goes to the lower expert id
    assert replicate_experts([4.0, 4.0], 3).tolist() == [0, 1, 0]


def test_eplb_balanced_packing_by_hand() -> None:
    # heaviest first to the lightest open pack: 9->p0, 7->p1, 5->p1(7<9), 3->p0, 2 packs x 2 items
    assert balanced_packing([3.0, 9.0, 5.0, 7.0], 2).tolist() == [0, 0, 1, 1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(4, 8, 2), (8, 16, 2), (8, 8, 3), (2, 6, 4)]))
def test_eplb_layout_and_even_split(seed: int, shape: tuple[int, int, int]) -> None:
    g, e, s = shape
    rng = np.random.default_rng(seed)
    history = rng.pareto(1.0, size=e) + 0.01
    slots = eplb_slots(history, g, s)
    assert slots.shape == (g, s)
    assert set(slots.ravel().tolist()) == set(range(e))  # every expert has a replica
    loads = rng.integers(0, 100, size=e)
    quota = even_quota(loads, slots)
    for x in range(e):  # reference: each replica gets floor or ceil of load / replicas
        per_replica = [quota[x, gg] / np.count_nonzero(slots[gg] == x) for gg in range(g) if x in slots[gg]]
        reps = int(np.count_nonzero(slots == x))
        assert quota[x].sum() == loads[x]
        assert all(loads[x] // reps <= q <= -(-loads[x] // reps) for q in per_replica)
        assert np.all(quota[x][~np.isin(np.arange(g), np.flatnonzero((slots == x).any(axis=1)))] == 0)


# ------------------------------------------------------------------------------------------------
# LPLB


def _lplb_density(loads: np.ndarray, orig: np.ndarray, copy: np.ndarray, g: int) -> Fraction:
    """T* of LPLB's graph by enumerating GPU sets: experts inside S are those with both copies in S."""
    best = Fraction(0)
    for k in range(1, g + 1):
        for subset in itertools.combinations(range(g), k):
            s = set(subset)
            inside = sum(int(loads[x]) for x in range(loads.size) if orig[x] in s and copy[x] in s)
            best = max(best, Fraction(inside, k))
    return best


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**31),
    st.sampled_from([(8, 16, "cube"), (8, 24, "ring"), (4, 8, "torus"), (6, 12, "ring")]),
)
def test_lplb_is_near_its_lp_optimum(seed: int, shape: tuple[int, int, str]) -> None:
    g, e, topo = shape
    rng = np.random.default_rng(seed)
    history = rng.pareto(1.0, size=e) + 0.01
    orig, copy = lplb_layout(history, g, topo)
    nbrs = topology_neighbours(g, topo)
    assert np.bincount(orig, minlength=g).tolist() == [e // g] * g
    assert all(copy[x] in nbrs[orig[x]] for x in range(e))
    solver = LplbSolver(orig, copy, g)
    loads = rng.poisson(history * 50)
    quota = solver.quota(loads)
    np.testing.assert_array_equal(quota.sum(axis=1), loads)
    allowed = np.zeros((e, g), dtype=bool)
    allowed[np.arange(e), orig] = allowed[np.arange(e), copy] = True
    assert np.all(quota[~allowed] == 0)
    t = _lplb_density(loads, orig, copy, g)
    max_load = quota.sum(axis=0).max()
    touching = np.bincount(orig, minlength=g) + np.bincount(copy, minlength=g)
    # exact LP, then each copy's share rounded by at most 1/2 token
    assert -((-t.numerator) // t.denominator) <= max_load <= t + Fraction(int(touching.max()), 2)


def test_lplb_topology_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 8 GPUs"):
        topology_neighbours(6, "cube")
    with pytest.raises(ValueError, match="unknown LPLB topology"):
        topology_neighbours(8, "mesh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        lplb_layout(np.ones(10), 4, "ring")


# ------------------------------------------------------------------------------------------------
# adaptive replacement uses only the past


@settings(max_examples=10, deadline=None)
@given(workloads(max_gpus=4), st.integers(1, 5))
def test_results_do_not_depend_on_future_micro_batches(case, cut: int) -> None:
    """Running a prefix of the micro-batches gives the same numbers for that prefix: no balancer
    (microep-ar included) looks ahead. History-based placements use `history`, shared by both."""
    w, cfg = case
    cut = min(cut, w.num_micro_batches - 1)
    names = ["ep", "eplb", "lplb", "microep", "microep-ar"]
    full = _max_loads(w, cfg, names)
    prefix = Workload(w.name, w.counts[:cut], w.history, w.top_k)
    part = _max_loads(prefix, cfg, names)
    for n in names:
        np.testing.assert_array_equal(part[n], full[n][:cut], err_msg=n)


def _skewed_stationary(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g, e, m = 8, 32, 12
    probs = np.arange(1, e + 1, dtype=np.float64) ** -1.6
    probs = probs[rng.permutation(e)] / probs.sum()
    return probs, rng.multinomial(8192, probs, size=(m, 1, g)).astype(np.int64)


def test_adaptive_replacement_starts_from_the_history() -> None:
    """A strongly skewed, stationary load that the static symmetric placement cannot balance: given
    the load history EPLB gets, AR starts load-aware and is at the bound from the first micro-batch."""
    probs, counts = _skewed_stationary()
    w = Workload("zipf", counts, probs[None, :], top_k=2)
    (res,) = simulate([w], ["microep", "microep-ar", "bound"], GroupConfig(8, 2), progress=False)
    static, ar, bound = (res.samples[n].max_load[:, 0] for n in ("microep", "microep-ar", "bound"))
    assert np.all(static > bound)
    np.testing.assert_array_equal(ar, bound)
    log = res.info["microep-ar"]["replacement_log"]
    assert [r["rule"] for r in log] == ["history"] and log[0]["micro_batch"] == 0


def test_adaptive_replacement_learns_without_a_useful_history() -> None:
    """The same loads with a uniform history: AR starts on the symmetric placement, sees only the
    past, and re-places on the realized-imbalance trigger after `trigger_after` (3) micro-batches."""
    probs, counts = _skewed_stationary()
    w = Workload("zipf", counts, np.full((1, probs.size), 1.0 / probs.size), top_k=2)
    (res,) = simulate([w], ["microep", "microep-ar", "bound"], GroupConfig(8, 2), progress=False)
    static, ar, bound = (res.samples[n].max_load[:, 0] for n in ("microep", "microep-ar", "bound"))
    np.testing.assert_array_equal(ar[:3], static[:3])  # nothing learned yet: no peeking
    np.testing.assert_array_equal(ar[3:], bound[3:])
    log = res.info["microep-ar"]["replacement_log"]
    assert [(r["rule"], r["micro_batch"]) for r in log] == [("realized", 3)]
    assert res.info["microep-ar"]["replacements"] == 1


# ------------------------------------------------------------------------------------------------
# the group is validated when it is built


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_gpus": 0, "replicas": 1}, "--gpus must be a positive integer, got 0"),
        ({"num_gpus": 8.0, "replicas": 2}, "--gpus must be a positive integer, got 8.0"),
        ({"num_gpus": 8, "replicas": True}, "--replicas must be a positive integer, got True"),
        ({"num_gpus": 8, "replicas": 9}, "--replicas 9 must be between 1 and --gpus 8"),
        ({"num_gpus": 4, "replicas": 8}, "--replicas 8 must be between 1 and --gpus 4"),
        ({"num_gpus": 8, "replicas": 2, "gpus_per_node": 3}, "--gpus-per-node 3"),
        ({"num_gpus": 8, "replicas": 2, "gpus_per_node": 0}, "--gpus-per-node must be a positive integer"),
        ({"num_gpus": 6, "replicas": 2, "lplb_topology": "cube"}, "LPLB cube"),
        ({"num_gpus": 8, "replicas": 2, "ar_interval": 0}, "--ar-interval must be a positive integer"),
        ({"num_gpus": 8, "replicas": 2, "seed": -1}, "--seed must be an integer >= 0"),
    ],
)
def test_group_config_is_validated_when_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GroupConfig(**kwargs)


def test_group_config_accepts_numpy_integers() -> None:
    cfg = GroupConfig(num_gpus=np.int64(8), replicas=np.int32(2), gpus_per_node=np.int64(4), seed=np.int64(1))
    assert cfg.num_gpus == 8 and cfg.replicas == 2
