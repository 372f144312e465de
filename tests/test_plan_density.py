"""The density lemma: lp_optimum (Dinkelbach over max-flow) against brute force and HiGHS."""

from __future__ import annotations

import numpy as np
import pytest
from _layouts import any_slot_layout
from _lp import lp_min_max
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement, balance_ratio, lp_optimum, lp_optimum_brute_force, lp_optimum_fraction


@st.composite
def _small(draw):
    g = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    p = any_slot_layout(rng, g, draw(st.integers(1, 3)), fill=0.85)
    e = p.num_experts
    loads = np.array(draw(st.lists(st.integers(0, 500), min_size=e, max_size=e)), dtype=np.int64)
    base = np.array(draw(st.lists(st.integers(0, 300), min_size=g, max_size=g)), dtype=np.int64)
    return p, loads, base if draw(st.booleans()) else None


@settings(max_examples=300, deadline=None)
@given(_small())
def test_lp_optimum_equals_brute_force(inst):
    p, loads, base = inst
    exact = lp_optimum_fraction(loads, p, base)
    assert exact == lp_optimum_brute_force(loads, p, base)
    assert lp_optimum(loads, p, base) == float(exact)


@pytest.mark.parametrize("g, e, r", [(16, 64, 4), (32, 64, 2), (64, 256, 4)])
def test_lp_optimum_matches_highs_on_large_groups(g, e, r):
    rng = np.random.default_rng(g)
    p = Placement.random(g, e, r, seed=1)
    for s in (0.0, 0.8, 1.5):
        w = (np.arange(1, e + 1) ** -s)[rng.permutation(e)]
        loads = rng.multinomial(50_000, w / w.sum())
        base = rng.integers(0, 300, g)
        t = lp_optimum(loads, p, base)
        ref = lp_min_max(loads, [p.hosts(x) for x in range(e)], base)
        assert t == pytest.approx(ref, rel=1e-9, abs=1e-6)


def test_hand_worked_ring():
    # C4 ring: expert i on GPUs (i, i+1). All load on expert 0 -> its two GPUs share it.
    p = Placement.from_slots([[0, 3], [0, 1], [2, 1], [2, 3]])
    assert p.hosts(0).tolist() == [0, 1] and p.hosts(3).tolist() == [0, 3]
    assert lp_optimum_fraction([10, 0, 0, 0], p) == 5
    # experts 0 and 1 span GPUs {0, 1, 2}: 9 tokens over 3 GPUs
    assert lp_optimum_fraction([5, 4, 0, 0], p) == 3
    # a small base load outside that set changes nothing; a large one is a bound of its own;
    # one inside the set raises its ratio (12 / 3)
    assert lp_optimum_fraction([5, 4, 0, 0], p, [0, 0, 0, 2]) == 3
    assert lp_optimum_fraction([5, 4, 0, 0], p, [0, 0, 0, 7]) == 7  # one GPU alone
    assert lp_optimum_fraction([5, 4, 0, 0], p, [0, 3, 0, 0]) == 4


def test_balance_ratio():
    p = Placement.symmetric(8, 32)
    assert balance_ratio(np.full(32, 10), p) == 1.0
    assert balance_ratio(np.zeros(32, np.int64), p) == 1.0
    hot = np.zeros(32, np.int64)
    hot[0] = 80
    assert balance_ratio(hot, p) == pytest.approx(4.0)  # one expert, two replicas: 40 / (80 / 8)


def test_brute_force_refuses_large_groups():
    with pytest.raises(ValueError, match="too large"):
        lp_optimum_brute_force(np.ones(64), Placement.symmetric(32, 64))


def test_bad_loads():
    p = Placement.symmetric(8, 8)
    with pytest.raises(ValueError, match="shape"):
        lp_optimum(np.ones(7), p)
    with pytest.raises(ValueError, match=">= 0"):
        lp_optimum(-np.ones(8), p)
