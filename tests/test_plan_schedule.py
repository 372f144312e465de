"""schedule(): exact against an independent HiGHS LP, conservation, locality, certificates,
determinism across processes, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
from _layouts import any_slot_layout
from _lp import lp_min_max
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement, certificate_bound, lp_optimum_fraction, schedule

# ------------------------------------------------------------------------------------------------
# instance generators


def _placement(kind: str, g: int, e: int, r: int, seed: int) -> Placement:
    if kind == "symmetric":
        return Placement.symmetric(g, e, r)
    if kind == "random":
        return Placement.random(g, e, r, seed=seed)
    if kind == "ep":
        return Placement.expert_parallel(g, e, r)
    rng = np.random.default_rng(seed)
    return Placement.asymmetric(rng.pareto(1.0, e) + 0.01, g, e * r // g, seed=seed, num_samples=4)


def _counts(rng: np.random.Generator, g: int, e: int, kind: str) -> np.ndarray:
    if kind == "zero":
        return np.zeros((g, e), dtype=np.int64)
    if kind == "one_expert":  # every token on one expert
        c = np.zeros((g, e), dtype=np.int64)
        c[:, rng.integers(e)] = rng.integers(0, 1000, g)
        return c
    if kind == "one_source":  # every token on one GPU
        c = np.zeros((g, e), dtype=np.int64)
        c[rng.integers(g)] = rng.integers(0, 100, e)
        return c
    s = {"uniform": 0.0, "zipf1": 1.0, "zipf2": 2.0}[kind]
    w = (np.arange(1, e + 1, dtype=np.float64) ** -s)[rng.permutation(e)]
    return np.stack([rng.multinomial(int(rng.integers(0, 3000)), w / w.sum()) for _ in range(g)]).astype(
        np.int64
    )


def _check_plan(plan, counts, placement, base):
    """Everything a plan must satisfy, independent of how it was found."""
    g, e = counts.shape
    route = plan.route
    assert route.shape == (g, e, g) and route.min() >= 0
    np.testing.assert_array_equal(route.sum(axis=2), counts)  # nothing lost or duplicated
    np.testing.assert_array_equal(route.sum(axis=0), plan.quota)  # replicas get their quota
    hosts_mask = np.zeros((e, g), dtype=bool)
    hosts_mask[placement.replica_expert, placement.host_gpu] = True
    assert not plan.quota[~hosts_mask].any() and not route[:, ~hosts_mask].any(), "only to replicas"
    gpu_load = base + plan.quota.sum(axis=0)
    np.testing.assert_array_equal(gpu_load, plan.gpu_load)
    assert gpu_load.max() == plan.max_load
    assert certificate_bound(plan, counts, base) == plan.max_load, "certificate proves optimality"
    # locality: every replica keeps as many of its own GPU's tokens as its quota allows
    for r in range(placement.num_replicas_total):
        gg, ee = placement.host_gpu[r], placement.replica_expert[r]
        assert route[gg, ee, gg] == min(counts[gg, ee], plan.quota[ee, gg])
    # one rank's share equals its rows of the whole list, in the same order
    coo = np.stack([plan.route_src, plan.route_expert, plan.route_dst, plan.route_count])
    key = coo[0] * e + coo[1]
    assert np.all(key[1:] >= key[:-1]), "sorted by (src, expert)"
    for r in range(g):
        mine = coo[:, coo[0] == r]
        np.testing.assert_array_equal(plan.routes_from(r), mine[1:])
        np.testing.assert_array_equal(plan.routes_to(r), coo[:, coo[2] == r][[0, 1, 3]])


CASES = [
    ("symmetric", 8, 8, 2),
    ("symmetric", 8, 16, 2),
    ("symmetric", 16, 32, 2),
    ("symmetric", 8, 32, 2),
    ("symmetric", 12, 24, 3),
    ("symmetric", 16, 64, 4),
    ("random", 8, 16, 2),
    ("random", 16, 32, 4),
    ("random", 6, 6, 1),
    ("ep", 8, 16, 2),
    ("ep", 4, 8, 1),
    ("asymmetric", 8, 16, 2),
    ("asymmetric", 16, 32, 3),
]
COUNT_KINDS = ["uniform", "zipf1", "zipf2", "zero", "one_expert", "one_source"]


@pytest.mark.parametrize("kind, g, e, r", CASES)
def test_schedule_matches_independent_lp(kind, g, e, r):
    """max_load == ceil(HiGHS optimum) on many instances of every kind, with and without base load."""
    rng = np.random.default_rng(hash((kind, g, e, r)) % 2**32)
    hosts = None
    for i in range(150):
        p = _placement(kind, g, e, r, seed=i % 5)
        hosts = [p.hosts(x) for x in range(e)]
        counts = _counts(rng, g, e, COUNT_KINDS[i % len(COUNT_KINDS)])
        base = rng.integers(0, 2000, g) * (i % 3 == 0) if i % 2 else np.zeros(g, dtype=np.int64)
        plan = schedule(counts, p, base_load=base)
        t_lp = lp_min_max(counts.sum(axis=0), hosts, base)
        assert plan.max_load == math.ceil(t_lp - 1e-7), (i, plan.max_load, t_lp)
        assert plan.max_load == math.ceil(lp_optimum_fraction(counts.sum(axis=0), p, base))
        _check_plan(plan, counts, p, base)


@pytest.mark.parametrize("kind, g, e, r", CASES[::3])
def test_highs_backend_agrees(kind, g, e, r):
    rng = np.random.default_rng(7)
    p = _placement(kind, g, e, r, seed=1)
    for i in range(25):  # consecutive solves reuse (warm-start) one model
        counts = _counts(rng, g, e, COUNT_KINDS[i % len(COUNT_KINDS)])
        base = rng.integers(0, 500, g) if i % 2 else None
        a = schedule(counts, p, base_load=base)
        b = schedule(counts, p, base_load=base, solver="highs")
        assert a.max_load == b.max_load
        _check_plan(b, counts, p, np.zeros(g, np.int64) if base is None else base)


@st.composite
def _instances(draw):
    g = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    r = draw(st.sampled_from([d for d in (1, 2, 3, 4) if g % d == 0]))
    per_slot = g // r
    e = per_slot * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    p = Placement.random(g, e, r, seed=seed)
    hi = draw(st.sampled_from([0, 1, 5, 1000, 10**9]))
    counts = np.array(draw(st.lists(st.integers(0, hi), min_size=g * e, max_size=g * e)), dtype=np.int64)
    base = np.array(draw(st.lists(st.integers(0, hi), min_size=g, max_size=g)), dtype=np.int64)
    use_base = draw(st.booleans())
    return p, counts.reshape(g, e), base if use_base else np.zeros(g, dtype=np.int64)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instances())
def test_property_optimal_and_conserving(inst):
    p, counts, base = inst
    plan = schedule(counts, p, base_load=base)
    _check_plan(plan, counts, p, base)
    assert plan.max_load == math.ceil(lp_optimum_fraction(counts.sum(axis=0), p, base))
    t_lp = lp_min_max(counts.sum(axis=0), [p.hosts(x) for x in range(p.num_experts)], base)
    assert abs(plan.max_load - t_lp) < 1 + 1e-6 * max(1.0, t_lp)


@st.composite
def _any_layout(draw):
    """Arbitrary layouts that obey the slot rule: uneven replica counts, empty slots."""
    g = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    p = any_slot_layout(rng, g, draw(st.integers(1, 4)), fill=0.8)
    e = p.num_experts
    hi = draw(st.sampled_from([1, 50, 10**6]))
    counts = rng.integers(0, hi + 1, size=(g, e)) * (rng.random((g, e)) < draw(st.floats(0.0, 1.0)))
    base = rng.integers(0, hi + 1, size=g) * draw(st.booleans())
    return p, counts.astype(np.int64), base.astype(np.int64)


@settings(max_examples=300, deadline=None)
@given(_any_layout(), st.sampled_from([None, 1, 2]))
def test_property_any_layout(inst, gpus_per_node):
    p, counts, base = inst
    if gpus_per_node and p.num_gpus % gpus_per_node:
        gpus_per_node = None
    plan = schedule(counts, p, base_load=base, gpus_per_node=gpus_per_node)
    _check_plan(plan, counts, p, base)
    assert plan.max_load == math.ceil(lp_optimum_fraction(counts.sum(axis=0), p, base))


@settings(max_examples=100, deadline=None)
@given(_instances(), st.sampled_from([1, 2]))
def test_property_node_aware_routes(inst, gpus_per_node):
    """With nodes: the same optimal max load; per expert the same-node tokens are the most any
    routing of the plan's quota can keep on-node (sum over nodes of min(node supply, node quota))."""
    p, counts, base = inst
    if p.num_gpus % gpus_per_node:
        return
    plain = schedule(counts, p, base_load=base)
    plan = schedule(counts, p, base_load=base, gpus_per_node=gpus_per_node)
    _check_plan(plan, counts, p, base)
    assert plan.max_load == plain.max_load
    node = np.arange(p.num_gpus) // gpus_per_node
    same = node[:, None] == node[None, :]
    for e in range(p.num_experts):
        on_node = plan.route[:, e, :][same].sum()
        best = 0
        for n in np.unique(node):
            sup, dem = counts[node == n, e].sum(), plan.quota[e, node == n].sum()
            best += min(sup, dem)
        assert on_node == best


def _plan_digest(seed: int) -> str:
    code = (
        "import hashlib, numpy as np\n"
        "from micromoe.plan import Placement, schedule\n"
        f"rng = np.random.default_rng({seed})\n"
        "p = Placement.symmetric(16, 64, 4)\n"
        "h = hashlib.sha256()\n"
        "for _ in range(20):\n"
        "    w = rng.pareto(1.0, 64) + 0.01\n"
        "    c = np.stack([rng.multinomial(4096, w / w.sum()) for _ in range(16)])\n"
        "    plan = schedule(c, p, gpus_per_node=4)\n"
        "    for a in (plan.replica_quota, plan.route_src, plan.route_expert, plan.route_dst, plan.route_count):\n"
        "        h.update(np.ascontiguousarray(a).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_identical_plans_across_processes():
    a, b = _plan_digest(3), _plan_digest(3)
    assert a == b and len(a) == 64
    assert hashlib.sha256(b"").hexdigest() != a


def test_accepts_lists_and_other_int_dtypes():
    p = Placement.symmetric(8, 8)
    c = np.random.default_rng(0).integers(0, 50, (8, 8))
    ref = schedule(c.astype(np.int64), p)
    for variant in (c.tolist(), c.astype(np.int32), c.astype(np.float64), np.asfortranarray(c)):
        assert np.array_equal(schedule(variant, p).replica_quota, ref.replica_quota)


@pytest.mark.parametrize(
    "counts, kwargs, match",
    [
        (np.zeros((4, 8), np.int64), {}, r"counts must have shape \(8, 8\)"),
        (-np.ones((8, 8), np.int64), {}, "must be >= 0"),
        (np.full((8, 8), 0.5), {}, "whole token counts"),
        (np.full((8, 8), np.nan), {}, "non-finite"),
        (np.full((8, 8), 2**52, np.int64), {}, "largest supported total is 2\\*\\*53 - 1"),
        (np.ones((8, 8), bool), {}, "integer array"),
        (np.ones((8, 8), np.int64), {"base_load": [1, 2]}, "base_load must have shape"),
        (np.ones((8, 8), np.int64), {"base_load": -np.ones(8)}, "must be >= 0"),
        (np.ones((8, 8), np.int64), {"gpus_per_node": 3}, "does not divide"),
        (np.ones((8, 8), np.int64), {"gpus_per_node": 0}, "positive integer"),
        (np.ones((8, 8), np.int64), {"solver": "cplex"}, "unknown solver"),
    ],
)
def test_bad_input_raises_clear_error(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule(counts, Placement.symmetric(8, 8), **kwargs)


def test_highs_refuses_gpus_per_node():
    """The LP backend has no same-node preference: it refuses a node map instead of ignoring it,
    and without one it gives the flow solver's optimal max load."""
    p = Placement.symmetric(8, 16)
    c = np.random.default_rng(1).integers(0, 50, (8, 16))
    with pytest.raises(ValueError, match=r"solver='highs'.*gpus_per_node=4"):
        schedule(c, p, gpus_per_node=4, solver="highs")
    assert schedule(c, p, solver="highs").max_load == schedule(c, p, gpus_per_node=4).max_load


@pytest.mark.parametrize("gpn", [4, np.int64(4), np.int32(2)])
def test_gpus_per_node_accepts_numpy_integers(gpn):
    p = Placement.symmetric(8, 16)
    c = np.random.default_rng(2).integers(0, 50, (8, 16))
    plan = schedule(c, p, gpus_per_node=gpn)
    assert plan.gpus_per_node == int(gpn) and type(plan.gpus_per_node) is int
    np.testing.assert_array_equal(plan.node_of, np.arange(8) // int(gpn))


@pytest.mark.parametrize("gpn", [True, 2.0, "2", -4])
def test_gpus_per_node_rejects_non_integers(gpn):
    with pytest.raises(ValueError, match=r"gpus_per_node must be a positive integer, got"):
        schedule(np.ones((8, 16), np.int64), Placement.symmetric(8, 16), gpus_per_node=gpn)


def test_negative_entry_in_fast_path_is_reported():
    c = np.ones((8, 8), np.int64)
    c[3, 5] = -2
    with pytest.raises(ValueError, match=r"counts\[3, 5\] = -2"):
        schedule(c, Placement.symmetric(8, 8))


def test_placement_type_checked():
    with pytest.raises(ValueError, match="Placement"):
        schedule(np.ones((2, 2), np.int64), [[0, 1], [1, 0]])


def test_plan_arrays_are_read_only():
    plan = schedule(np.ones((8, 8), np.int64), Placement.symmetric(8, 8))
    with pytest.raises(ValueError):
        plan.replica_quota[0] = 1
