"""Expert ownership and gather tables: against a max-flow reference (networkx) and by simulating
the gather on every GPU of random placements."""

from __future__ import annotations

import networkx as nx
import numpy as np
from _layouts import any_slot_layout
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement
from micromoe.plan.ownership import expert_owners, gather_table


def _max_hosted(p: Placement) -> int:
    """The most experts that can be owned by one of their hosts with ceil(E/G) per GPU (max flow)."""
    cap = -(-p.num_experts // p.num_gpus)
    g = nx.DiGraph()
    for e in range(p.num_experts):
        g.add_edge("s", ("e", e), capacity=1)
        for h in p.hosts(e):
            g.add_edge(("e", e), ("g", int(h)), capacity=1)
    for q in range(p.num_gpus):
        g.add_edge(("g", q), "t", capacity=cap)
    return int(nx.maximum_flow_value(g, "s", "t"))


def _check(p: Placement) -> None:
    owners = expert_owners(p)
    g, e = p.num_gpus, p.num_experts
    assert owners.shape == (e,) and owners.min() >= 0 and owners.max() < g
    np.testing.assert_array_equal(owners, expert_owners(p))  # deterministic
    hosted = sum(int(owners[x]) in p.hosts(x).tolist() for x in range(e))
    assert hosted == _max_hosted(p)  # as many local owners as any assignment can have
    if hosted == e:
        assert np.bincount(owners, minlength=g).max() <= -(-e // g)
    tables = [gather_table(p, owners, q) for q in range(g)]
    for q, t in enumerate(tables):
        np.testing.assert_array_equal(t.owned, np.flatnonzero(owners == q))
        for src in range(g):  # the two ends of every pair agree on the row count
            assert tables[src].send_splits[q] == t.recv_splits[src]
    # simulate: every GPU sends rows of its masters (one number per expert: its id), received
    # rows land in slots, which must then equal the placement
    masters = {q: tables[q].owned for q in range(g)}
    for q, t in enumerate(tables):
        got = np.full(p.slots_per_gpu, -1)
        start = 0
        received = []
        for src in range(g):
            sent = masters[src][tables[src].send_index]
            offset = tables[src].send_splits[:q].sum()
            received.extend(sent[offset : offset + tables[src].send_splits[q]].tolist())
        got[t.recv_slot] = received
        start += len(received)
        np.testing.assert_array_equal(got, p.slot_expert[q])
        assert t.local_only == (
            not np.delete(t.send_splits, q).any() and not np.delete(t.recv_splits, q).any()
        )


def test_symmetric_and_plain_ep_owners_are_hosts():
    for p in (
        Placement.symmetric(8, 32, 2),
        Placement.symmetric(8, 16, 4),
        Placement.expert_parallel(4, 8, 1),
    ):
        owners = expert_owners(p)
        assert all(owners[x] in p.hosts(x) for x in range(p.num_experts))
        assert (
            np.bincount(owners, minlength=p.num_gpus).tolist() == [p.num_experts // p.num_gpus] * p.num_gpus
        )
        _check(p)


def test_plain_ep_gathers_nothing_remote():
    p = Placement.expert_parallel(4, 8, 1)
    owners = expert_owners(p)
    assert all(gather_table(p, owners, q).local_only for q in range(4))


def test_fewer_experts_than_gpus():
    p = Placement.symmetric(16, 8, 2)  # one slot per GPU, half the GPUs own nothing
    owners = expert_owners(p)
    assert np.bincount(owners, minlength=16).max() == 1
    _check(p)


def test_owners_from_an_old_placement_still_fill_a_new_one():
    old = Placement.symmetric(8, 32, 2)
    new = Placement.asymmetric(1.0 / np.arange(1, 33) ** 1.5, 8, 8, seed=0)
    owners = expert_owners(old)
    for q in range(8):
        t = gather_table(new, owners, q)
        assert t.recv_splits.sum() == (new.slot_expert[q] >= 0).sum()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 6), st.floats(0.3, 1.0))
def test_random_layouts(seed, gpus, slots, fill):
    p = any_slot_layout(np.random.default_rng(seed), gpus, slots, fill)
    _check(p)
