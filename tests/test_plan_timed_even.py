"""Even slots: EPLB-style candidates of the time-aware replacement, the tie margin towards more
replicas (`timed_layouts.prefer_even`) and the planner's split smoothing (`timed_smooth.py`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement, schedule
from micromoe.plan.cost import CostModel
from micromoe.plan.forecast import ReplacementPolicy
from micromoe.plan.timed import cost_tables, predict_replica_quota_us
from micromoe.plan.timed_layouts import assign_gpus, prefer_even, replica_columns, time_aware_slots
from micromoe.plan.timed_smooth import smooth_splits

# even slots strictly cheaper: a strongly convex slot cost and a large max-slot term, no per-group cost
CONVEX = CostModel(fixed_us=5.0, max_row_us=0.05, tile=1, c_row=0.01, c_nlogn=0.01)


def _greedy_counts(loads: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Independent reference: EPLB's replicate step (largest load per replica, ties to the lower
    id) with at most `cap` replicas per expert, by a full scan per replica."""
    reps = [1] * loads.size
    for _ in range(total - loads.size):
        best, best_v = -1, -1.0
        for e in range(loads.size):
            if reps[e] < cap and loads[e] / reps[e] > best_v:
                best, best_v = e, loads[e] / reps[e]
        if best < 0:
            break
        reps[best] += 1
    return np.array(reps)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_gpus=st.sampled_from([2, 4, 8]),
    slots=st.integers(2, 6),
    frac=st.floats(0.0, 1.0),
    balanced=st.booleans(),
)
def test_eplb_candidates_counts_and_slot_rule(seed, num_gpus, slots, frac, balanced):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(1, num_gpus * slots + 1))
    loads = rng.pareto(1.0, num_experts) * 100 + rng.integers(0, 2, num_experts)
    total = num_experts + round(frac * (num_gpus * slots - num_experts))
    columns = replica_columns(loads, num_gpus, slots, total)
    table = assign_gpus(columns, loads, num_gpus, slots, None if balanced else rng)
    p = Placement.from_slots(table, num_experts)  # validates the local-slot rule, every expert present
    reps = np.bincount(table[table >= 0], minlength=num_experts)
    for g in range(num_gpus):  # one replica of an expert per GPU at most
        row = table[g][table[g] >= 0]
        assert row.size == np.unique(row).size
    if total == num_gpus * slots and num_experts >= slots:
        assert (table >= 0).all()  # every slot used, as EPLB does
    ref = _greedy_counts(loads, total, num_gpus)
    if reps.sum() == total and total < num_gpus * slots:  # the packing kept every replica
        np.testing.assert_array_equal(reps, ref)
    assert p.num_experts == num_experts


def test_balanced_assignment_matches_eplb_packing_on_a_simple_case():
    """8 experts, one replica each, 4 GPUs x 2 slots: LPT onto the least loaded free GPU pairs
    the heaviest with the lightest, as EPLB's balanced packing does."""
    loads = np.array([80.0, 70, 60, 50, 40, 30, 20, 10])
    table = assign_gpus(replica_columns(loads, 4, 2, 8), loads, 4, 2, None)
    gpu_load = np.array([loads[row].sum() for row in table])
    np.testing.assert_array_equal(np.sort(gpu_load), [90, 90, 90, 90])


def test_prefer_even_rule():
    a, b, c = np.zeros((1, 1)), np.ones((1, 1)), np.full((1, 1), 2)
    cands = [(100.0, 10, a), (101.5, 16, b), (103.0, 32, c)]
    assert prefer_even(cands, 0.02)[2] is b  # 32 replicas are 3% slower: outside the margin
    assert prefer_even(cands, 0.05)[2] is c
    assert prefer_even(cands, 0.0)[2] is a
    with pytest.raises(ValueError, match="even_margin"):
        prefer_even(cands, 1.5)
    with pytest.raises(ValueError, match="no candidates"):
        prefer_even([], 0.02)


def test_convex_model_picks_the_evenest_candidate():
    loads = np.arange(1, 33, dtype=np.float64) ** -1.0
    loads *= 32 * 1000 / loads.sum()
    slots, score, reps = time_aware_slots(loads, 8, 8, CONVEX, num_samples=2)
    assert reps == 64 and (slots >= 0).all() and score >= 1.0 - 1e-9
    policy = ReplacementPolicy(1, 32, cost=CONVEX)
    start = policy.start(0, Placement.symmetric(8, 32, 2), history=loads)
    assert start.num_replicas_total == 64
    with pytest.raises(ValueError, match="even_margin"):
        ReplacementPolicy(1, 32, cost=CONVEX, even_margin=-0.1)


def _smooth(x, counts, p, cm, tok_cap):
    tables = cost_tables(cm, int(counts.sum()))
    zeros = np.zeros(p.num_gpus, dtype=np.int64)
    load = counts.sum(axis=0)
    return smooth_splits(x, load, zeros, tables.f_int, tables.m_int, zeros, tok_cap, p.graph, 2)


def test_smoothing_swaps_to_even_splits():
    """Two GPUs hold both experts: [90 | 10] and [10 | 90] rows keep each GPU at 100 tokens; the
    token-neutral exchange gives every slot 50 rows."""
    p = Placement.from_slots(np.array([[0, 1], [0, 1]]))
    counts = np.array([[100, 0], [0, 100]], dtype=np.int64)
    x = np.array([90, 10, 10, 90], dtype=np.int64)  # e0@0, e0@1, e1@0, e1@1
    assert _smooth(x, counts, p, CONVEX, 100) >= 1
    np.testing.assert_array_equal(x, [50, 50, 50, 50])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), skew=st.floats(0.2, 3.0), tokens=st.integers(1, 4000))
def test_smoothing_conserves_and_never_slows_the_slowest_gpu(seed, skew, tokens):
    rng = np.random.default_rng(seed)
    p = Placement.symmetric(8, 32, 2)
    w = rng.dirichlet(np.full(32, skew))
    counts = np.stack([rng.multinomial(tokens, w) for _ in range(8)]).astype(np.int64)
    x = schedule(counts, p).replica_quota.copy()
    before = predict_replica_quota_us(x, p, CONVEX)
    tok0 = np.bincount(p.host_gpu, weights=x, minlength=8)
    cap = int(max(tok0.max(), np.ceil(counts.sum() * 1.01 / 8)))
    x2 = x.copy()
    _smooth(x2, counts, p, CONVEX, cap)
    np.testing.assert_array_equal(np.bincount(p.replica_expert, weights=x2, minlength=32), counts.sum(axis=0))
    assert (x2 >= 0).all()
    assert np.bincount(p.host_gpu, weights=x2, minlength=8).max() <= cap
    after = predict_replica_quota_us(x2, p, CONVEX)
    assert after.max() <= before.max() + 1e-9
    assert after.sum() <= before.sum() + 1e-9
    x3 = x.copy()
    _smooth(x3, counts, p, CONVEX, cap)
    np.testing.assert_array_equal(x3, x2)  # deterministic
