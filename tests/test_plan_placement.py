"""Placement: validation, the local-slot rule, and the builders' structure."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest

from micromoe.plan import Placement


def _slot_rule_holds(p: Placement) -> bool:
    for e in range(p.num_experts):
        cols = {int(np.flatnonzero(p.slot_expert[g] == e)[0]) for g in p.hosts(e)}
        if len(cols) != 1:
            return False
    return True


def _graph(p: Placement) -> nx.MultiGraph:
    """2-replica layout as a multigraph: GPUs are vertices, experts are edges."""
    g = nx.MultiGraph()
    g.add_nodes_from(range(p.num_gpus))
    for e in range(p.num_experts):
        u, v = p.hosts(e)
        g.add_edge(int(u), int(v))
    return g


@pytest.mark.parametrize(
    "slots, match",
    [
        ([[0, 1], [1, 0]], "local-slot rule"),
        ([[0, 0], [1, 2]], "twice on GPU 0"),
        ([[0, -2]], "expert ids are >= 0"),
        ([[0, 5]], "out of range"),
        ([[0, 1.5]], "integer expert ids"),
        ([0, 1], "2-D"),
        ([[-1, -1]], "no expert"),
    ],
)
def test_bad_slots_raise(slots, match):
    with pytest.raises(ValueError, match=match):
        Placement.from_slots(slots, 3 if match == "out of range" else None)


def test_missing_expert_is_named():
    with pytest.raises(ValueError, match="expert 2 has no replica"):
        Placement.from_slots([[0, 1], [0, 1]], num_experts=3)


def test_csr_and_queries_agree_with_slots():
    p = Placement.from_slots([[0, 2, -1], [1, 2, 3], [0, -1, 3]])
    assert p.num_gpus == 3 and p.num_experts == 4 and p.slots_per_gpu == 3
    assert p.hosts(0).tolist() == [0, 2] and p.hosts(2).tolist() == [0, 1]
    assert p.replica_counts.tolist() == [2, 1, 2, 2]
    assert p.experts_on(1).tolist() == [1, 2, 3]
    assert p.expert_slot.tolist() == [0, 0, 1, 2]
    for r in range(p.num_replicas_total):
        assert p.slot_expert[p.host_gpu[r], p.replica_slot[r]] == p.replica_expert[r]
    order = [e for e, _ in p.replica_groups()]
    assert order == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        p.hosts(4)


def test_placement_is_read_only_and_hashable():
    p = Placement.symmetric(8, 16)
    with pytest.raises(ValueError):
        p.slot_expert[0, 0] = 3
    assert p == Placement.symmetric(8, 16) and hash(p) == hash(Placement.symmetric(8, 16))


@pytest.mark.parametrize("g, e, r", [(4, 8, 1), (8, 16, 2), (8, 32, 4), (6, 12, 3)])
def test_expert_parallel_repeats_plain_ep(g, e, r):
    p = Placement.expert_parallel(g, e, r)
    ep = g // r
    assert _slot_rule_holds(p)
    for x in range(e):
        hosts = p.hosts(x)
        assert len(hosts) == r and len({int(h) % ep for h in hosts}) == 1
        assert int(hosts[0]) == x // (e // ep)


@pytest.mark.parametrize(
    "g, e, r",
    [(8, 8, 2), (8, 16, 2), (16, 32, 2), (8, 32, 2), (8, 24, 2), (12, 24, 3), (16, 64, 4), (32, 128, 3)],
)
def test_symmetric_is_full_and_obeys_slot_rule(g, e, r):
    p = Placement.symmetric(g, e, r)
    assert _slot_rule_holds(p)
    assert np.all(p.slot_expert >= 0), "every slot is used"
    assert p.replica_counts.sum() == e * r
    if g % r == 0:
        assert np.all(p.replica_counts == r)
    assert np.array_equal(p.slot_expert, Placement.symmetric(g, e, r).slot_expert), "deterministic"


def test_symmetric_paper_cayley_graphs():
    c8 = _graph(Placement.symmetric(8, 8))
    assert nx.is_isomorphic(nx.Graph(c8), nx.cycle_graph(8))
    k44 = _graph(Placement.symmetric(8, 16))
    assert nx.is_isomorphic(nx.Graph(k44), nx.complete_bipartite_graph(4, 4))
    torus = _graph(Placement.symmetric(16, 32))
    assert nx.is_isomorphic(nx.Graph(torus), nx.grid_2d_graph(4, 4, periodic=True))
    k8pm = _graph(Placement.symmetric(8, 32))
    simple = nx.Graph(k8pm)
    assert nx.is_isomorphic(simple, nx.complete_graph(8))
    assert k8pm.number_of_edges() == 32  # the extra perfect matching doubles 4 disjoint edges
    doubled = [(u, v) for u, v in simple.edges if k8pm.number_of_edges(u, v) == 2]
    assert len(doubled) == 4 and len(set(itertools.chain(*doubled))) == 8


def test_random_is_seeded():
    a = Placement.random(8, 16, 2, seed=3)
    assert a == Placement.random(8, 16, 2, seed=3)
    assert a != Placement.random(8, 16, 2, seed=4)
    assert _slot_rule_holds(a) and np.all(a.replica_counts == 2)


@pytest.mark.parametrize(
    "args, match",
    [
        ((8, 16, 3), "must divide num_gpus"),
        ((8, 10, 2), "multiple of num_gpus"),
        ((4, 8, 5), "exceeds num_gpus"),
        ((0, 8, 1), "positive integer"),
    ],
)
def test_builder_size_errors(args, match):
    with pytest.raises(ValueError, match=match):
        Placement.random(*args)


@pytest.mark.parametrize("bad", [True, 2.0, "8", 0, -1])
def test_sizes_must_be_positive_integers(bad):
    """One positive-integer rule for every size: NumPy integers pass, bool/float/str do not."""
    with pytest.raises(ValueError, match=r"num_gpus must be a positive integer, got"):
        Placement.symmetric(bad, 8)
    with pytest.raises(ValueError, match=r"slots_per_gpu must be a positive integer, got"):
        Placement.asymmetric(np.ones(8), 4, bad)
    with pytest.raises(ValueError, match=r"num_experts must be a positive integer, got"):
        Placement.from_slots([[0]], bad)


def test_builders_accept_numpy_integers():
    a = Placement.symmetric(np.int64(8), np.int32(16), np.int64(2))
    assert a == Placement.symmetric(8, 16, 2)
    b = Placement.asymmetric(np.arange(8) + 1.0, np.int64(4), np.int64(4), num_samples=np.int64(2))
    assert b == Placement.asymmetric(np.arange(8) + 1.0, 4, 4, num_samples=2)


def test_asymmetric_gives_hot_experts_more_replicas():
    loads = np.array([100.0, 50, 10, 10, 5, 5, 5, 5, 2, 2, 2, 2, 1, 1, 1, 1])
    p = Placement.asymmetric(loads, num_gpus=8, slots_per_gpu=4, seed=0, num_samples=8)
    assert _slot_rule_holds(p)
    assert np.all(p.replica_counts >= 1) and p.replica_counts.sum() == 32
    assert p.replica_counts[0] >= p.replica_counts[1] >= p.replica_counts[-1]
    assert p == Placement.asymmetric(loads, num_gpus=8, slots_per_gpu=4, seed=0, num_samples=8)


def test_asymmetric_errors():
    with pytest.raises(ValueError, match="cannot hold"):
        Placement.asymmetric(np.ones(40), num_gpus=8, slots_per_gpu=4)
    with pytest.raises(ValueError, match="finite"):
        Placement.asymmetric([1.0, np.nan], num_gpus=2, slots_per_gpu=1)
