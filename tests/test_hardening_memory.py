"""Streamed workloads: the simulator holds one micro-batch, not the whole [M, L, G, E] array, and
gets exactly the numbers of the eager (held) workload."""

from __future__ import annotations

import tracemalloc

import numpy as np

from micromoe.cli import build_parser
from micromoe.sim.balancers import GroupConfig
from micromoe.sim.command_workloads import build_workloads
from micromoe.sim.runner import simulate
from micromoe.sim.traces import AggregateTrace
from micromoe.sim.workload import workload_from_aggregate, workload_from_zipf

SAMPLING = dict(num_micro_batches=5, num_gpus=4, tokens_per_gpu=64, top_k=2, noise=0.2, drift=0.2, seed=3)


def test_streamed_zipf_equals_eager() -> None:
    eager = workload_from_zipf(1.1, num_experts=8, num_layers=3, **SAMPLING)
    streamed = workload_from_zipf(1.1, num_experts=8, num_layers=3, stream=True, **SAMPLING)
    assert streamed.counts is None and streamed.shape == eager.counts.shape
    for _ in range(2):  # every pass regenerates the same micro-batches
        np.testing.assert_array_equal(np.stack(list(streamed.micro_batches())), eager.counts)
    np.testing.assert_array_equal(streamed.history, eager.history)


def test_streamed_aggregate_equals_eager() -> None:
    trace = AggregateTrace("t", np.array([[5.0, 3, 2, 1, 0, 1, 1, 7], [1, 1, 1, 1, 9, 9, 1, 1]]), top_k=2)
    eager = workload_from_aggregate(trace, **SAMPLING)
    streamed = workload_from_aggregate(trace, stream=True, **SAMPLING)
    np.testing.assert_array_equal(np.stack(list(streamed.micro_batches())), eager.counts)


def test_simulation_results_do_not_depend_on_streaming() -> None:
    cfg = GroupConfig(num_gpus=4, replicas=2)
    names = ["ep", "eplb", "lplb", "microep", "microep-ar", "bound"]
    kw = dict(num_experts=8, num_layers=2, **SAMPLING)
    (a,) = simulate([workload_from_zipf(1.0, **kw)], names, cfg, warmup=1, progress=False)
    (b,) = simulate([workload_from_zipf(1.0, stream=True, **kw)], names, cfg, warmup=1, progress=False)
    for n in names:
        for field in ("max_load", "total", "remote", "own_opt"):
            np.testing.assert_array_equal(
                getattr(a.samples[n], field), getattr(b.samples[n], field), err_msg=n
            )


def test_streamed_run_holds_one_micro_batch() -> None:
    """64 micro-batches x 2 layers x 64 GPUs x 256 experts = 16.8 MB as int64; the run's peak
    allocation must stay far below that (one micro-batch is 262 kB)."""
    shape = dict(num_micro_batches=64, num_gpus=64, tokens_per_gpu=64, top_k=2, noise=0.1, drift=0.1, seed=0)
    w = workload_from_zipf(1.0, num_experts=256, num_layers=2, stream=True, **shape)
    full_bytes = 64 * 2 * 64 * 256 * 8
    tracemalloc.start()
    try:
        (r,) = simulate([w], ["bound"], GroupConfig(num_gpus=64, replicas=2), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.samples["bound"].total.shape == (64, 2) and r.samples["bound"].total.min() == 64 * 2 * 64
    assert peak < full_bytes / 4, f"peak {peak / 1e6:.1f} MB for a {full_bytes / 1e6:.1f} MB workload"


def test_the_command_streams_sampled_workloads() -> None:
    args = build_parser().parse_args(["simulate", "--zipf", "1", "--experts", "16", "--micro-batches", "2"])
    workloads, _ = build_workloads(args)
    assert all(w.counts is None for w in workloads)
