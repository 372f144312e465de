"""Sampling micro-batches: shapes, token conservation, the Zipf law, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from micromoe.sim.traces import AggregateTrace, RoutingTrace
from micromoe.sim.workload import (
    sample_counts,
    workload_from_aggregate,
    workload_from_routing,
    workload_from_zipf,
    zipf_distribution,
)


def test_every_source_routes_tokens_times_top_k() -> None:
    probs = np.random.default_rng(0).random((3, 10))
    c = sample_counts(
        probs,
        num_micro_batches=4,
        num_gpus=5,
        tokens_per_gpu=100,
        top_k=3,
        noise=0.3,
        drift=0.2,
        rng=np.random.default_rng(1),
    )
    assert c.shape == (4, 3, 5, 10) and c.dtype == np.int64
    assert np.all(c.sum(axis=3) == 300)
    assert c.min() >= 0


def test_zipf_law_and_hot_set() -> None:
    p = zipf_distribution(1.5, 16, 3, np.random.default_rng(0))
    expected = np.arange(1, 17, dtype=np.float64) ** -1.5
    for row in p:
        np.testing.assert_allclose(np.sort(row)[::-1], expected / expected.sum())
    first = zipf_distribution(1.5, 16, 2, np.random.default_rng(0), shuffle=False)
    np.testing.assert_allclose(first, np.tile(expected / expected.sum(), (2, 1)))
    with pytest.raises(ValueError, match="Zipf exponent"):
        zipf_distribution(-1.0, 4, 1, np.random.default_rng(0))


def test_noiseless_sampling_matches_the_distribution() -> None:
    """With noise = drift = 0 the pooled counts follow p (binomial spread, 6 sigma)."""
    probs = np.array([[0.5, 0.25, 0.15, 0.1]])
    c = sample_counts(
        probs,
        num_micro_batches=50,
        num_gpus=4,
        tokens_per_gpu=500,
        top_k=1,
        noise=0.0,
        drift=0.0,
        rng=np.random.default_rng(2),
    )
    n = 50 * 4 * 500
    got = c.sum(axis=(0, 2))[0]
    sigma = np.sqrt(n * probs[0] * (1 - probs[0]))
    assert np.all(np.abs(got - n * probs[0]) < 6 * sigma)


def test_same_seed_same_workload_and_different_seed_differs() -> None:
    kw = dict(
        num_experts=8,
        num_layers=2,
        num_micro_batches=3,
        num_gpus=4,
        tokens_per_gpu=64,
        top_k=2,
        noise=0.1,
        drift=0.1,
    )
    a = workload_from_zipf(1.0, seed=5, **kw)
    b = workload_from_zipf(1.0, seed=5, **kw)
    c = workload_from_zipf(1.0, seed=6, **kw)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)


def test_aggregate_and_routing_workloads() -> None:
    trace = AggregateTrace("t", np.array([[4.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    w = workload_from_aggregate(
        trace, num_micro_batches=2, num_gpus=2, tokens_per_gpu=10, top_k=1, noise=0, drift=0, seed=0
    )
    assert w.counts.shape == (2, 2, 2, 3)
    assert np.all(w.counts[:, 0, :, 2] == 0)  # an expert the trace never used stays unused
    np.testing.assert_array_equal(w.history, trace.counts)
    counts = np.arange(2 * 1 * 3 * 2).reshape(2, 1, 3, 2)
    r = RoutingTrace("log", counts, [(0, 0), (1, 0)], [0])
    wr = workload_from_routing(r, num_gpus=None, top_k=0)
    np.testing.assert_array_equal(wr.counts, counts)
    np.testing.assert_array_equal(wr.history, counts.sum(axis=(0, 2)))
    with pytest.raises(ValueError, match="has 3 source GPUs but --gpus is 4"):
        workload_from_routing(r, num_gpus=4, top_k=0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(top_k=5), "--top-k 5 exceeds the 4 experts"),
        (dict(tokens_per_gpu=0), "--tokens-per-gpu must be a positive integer"),
        (dict(noise=-0.1), "--noise must be finite and >= 0"),
        (dict(drift=float("inf")), "--drift must be finite and >= 0"),
    ],
)
def test_sampling_errors(kw: dict, message: str) -> None:
    args = dict(
        num_micro_batches=1,
        num_gpus=2,
        tokens_per_gpu=8,
        top_k=1,
        noise=0.0,
        drift=0.0,
        rng=np.random.default_rng(0),
    )
    args.update(kw)
    with pytest.raises(ValueError) as info:
        sample_counts(np.ones((1, 4)), **args)
    assert message in str(info.value)
