"""Adaptive replacement: load tracking, placement scoring, the replacement decision."""

from __future__ import annotations

import numpy as np
import pytest

from micromoe.plan import LoadTracker, Placement, balance_ratio, decide_replacement, placement_score


def test_tracker_moving_average():
    t = LoadTracker(num_layers=2, num_experts=3, decay=0.5)
    with pytest.raises(ValueError, match="no observed loads"):
        t.forecast(0)
    t.observe(0, [4, 0, 2])
    t.observe(0, [0, 4, 2])
    np.testing.assert_allclose(t.forecast(0), [2, 2, 2])
    assert t.observations(0) == 2 and t.observations(1) == 0
    with pytest.raises(ValueError, match="shape"):
        t.observe(1, [1, 2])
    with pytest.raises(ValueError, match="finite"):
        t.observe(1, [1, -2, 0])
    with pytest.raises(ValueError, match="decay"):
        LoadTracker(1, 1, decay=1.0)


def test_score_is_the_density_ratio():
    p = Placement.symmetric(8, 16)
    loads = np.random.default_rng(0).integers(1, 1000, 16)
    assert placement_score(loads, p) == pytest.approx(balance_ratio(loads, p), rel=1e-5)


def test_replacement_fixes_heavy_skew_and_keeps_good_layouts():
    p = Placement.symmetric(8, 32)
    skewed = np.arange(1, 33, dtype=np.float64) ** -2.0
    d = decide_replacement(skewed, p, threshold=1.02, seed=0, num_samples=16)
    assert d.replace and d.current_score > 1.5
    assert d.new_score < d.current_score and d.placement.num_gpus == 8 and d.placement.slots_per_gpu == 8
    assert d.new_score == pytest.approx(placement_score(skewed, d.placement))
    flat = np.ones(32)
    keep = decide_replacement(flat, p)
    assert not keep.replace and keep.placement is p and keep.current_score == 1.0
    with pytest.raises(ValueError, match="threshold"):
        decide_replacement(flat, p, threshold=0.5)
