"""Scheduler latency and quality: our exact flow solver against the paper's warm-started HiGHS LP.

For every size (experts x GPUs x replicas) and two micro-batch streams (independent: the hot
experts change every micro-batch; correlated: they drift slowly, as in training), it times full
`schedule` calls (counts in, quota and routes out) with both backends in the same run on one
thread, checks optimality against the exact density-lemma optimum, and compares the routes'
traffic with the min-cost LP at the same max load.

    python benchmarks/bench_scheduler.py [--quick] [--out benchmarks/results/scheduler_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _env  # benchmarks/ is on sys.path when run as a script
import numpy as np
from traffic_lp import min_traffic_lp, traffic_cost  # benchmarks/ is on sys.path when run as a script

from micromoe.allocator import allocator_settings, tune_allocator
from micromoe.plan import Placement, lp_optimum_fraction, schedule

SIZES = [(16, 8, 2), (32, 8, 2), (64, 8, 2), (64, 32, 2), (128, 32, 3), (256, 64, 4)]
TRAFFIC_WEIGHTS = (0.0, 1.0, 4.0)  # same GPU, same node, other node


@dataclass(frozen=True)
class Stream:
    """Zipf(s) expert popularity with per-source lognormal noise; `drift` < 1 keeps the hot set."""

    name: str
    skew: float
    noise: float
    independent: bool


STREAMS = [Stream("independent", 1.0, 0.3, True), Stream("correlated", 1.0, 0.3, False)]


def micro_batches(
    stream: Stream, num_gpus: int, num_experts: int, tokens: int, n: int, seed: int
) -> list[np.ndarray]:
    """n count matrices int64 [G, E] of `tokens` (token, expert) selections per GPU."""
    rng = np.random.default_rng(seed)
    zipf = np.arange(1, num_experts + 1, dtype=np.float64) ** -stream.skew
    popularity = zipf[rng.permutation(num_experts)]
    out = []
    for _ in range(n):
        if stream.independent:
            popularity = zipf[rng.permutation(num_experts)]
        else:  # slow multiplicative drift of the same hot set
            popularity = popularity * rng.lognormal(0.0, 0.05, num_experts)
        noisy = popularity[None, :] * rng.lognormal(0.0, stream.noise, (num_gpus, num_experts))
        probs = noisy / noisy.sum(axis=1, keepdims=True)
        out.append(np.stack([rng.multinomial(tokens, probs[g]) for g in range(num_gpus)]).astype(np.int64))
    return out


def time_calls(fn, batches: list[np.ndarray], repeats: int) -> tuple[list[float], list]:
    """Seconds per call (each batch `repeats` times, in stream order) and the last plans."""
    times, plans = [], []
    for counts in batches:
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = fn(counts)
            times.append(time.perf_counter() - t0)
        plans.append(plan)
    return times, plans


def bench_size(num_experts: int, num_gpus: int, replicas: int, args, stream: Stream) -> dict:
    placement = Placement.symmetric(num_gpus, num_experts, replicas)
    gpus_per_node = 8 if num_gpus > 8 else None
    node_of = np.arange(num_gpus) // (gpus_per_node or num_gpus)
    batches = micro_batches(stream, num_gpus, num_experts, args.tokens * args.top_k, args.batches, args.seed)

    def flow(c):
        return schedule(c, placement, gpus_per_node=gpus_per_node)

    def highs(c):  # the paper's LP has no node preference (schedule refuses gpus_per_node for it)
        return schedule(c, placement, solver="highs")

    flow(batches[0])  # compile and build caches outside the timing
    highs(batches[0])
    t_flow, plans = time_calls(flow, batches, args.repeats)
    n_highs = max(5, len(batches) // args.highs_every)
    t_highs, plans_h = time_calls(highs, batches[:n_highs], 1)
    optimal = all(
        p.max_load == math.ceil(lp_optimum_fraction(c.sum(axis=0), placement))
        for p, c in zip(plans, batches, strict=True)
    )
    optimal &= all(a.max_load == b.max_load for a, b in zip(plans_h, plans[: len(plans_h)], strict=True))
    traffic = []
    for p, c in list(zip(plans, batches, strict=True))[: args.traffic_checks]:
        ours = traffic_cost(p.route_src, p.route_dst, p.route_count, node_of, TRAFFIC_WEIGHTS)
        best = min_traffic_lp(c, placement, p.max_load, node_of, TRAFFIC_WEIGHTS)
        traffic.append(ours / best if best > 0 else 1.0)
    total = float(np.mean([c.sum() for c in batches]))
    return {
        "size": f"{num_experts}x{num_gpus}x{replicas}",
        "experts": num_experts,
        "gpus": num_gpus,
        "replicas": replicas,
        "gpus_per_node": gpus_per_node,
        "stream": stream.name,
        "flow_median_us": statistics.median(t_flow) * 1e6,
        "flow_p99_us": float(np.percentile(t_flow, 99)) * 1e6,
        "highs_median_us": statistics.median(t_highs) * 1e6,
        "highs_p99_us": float(np.percentile(t_highs, 99)) * 1e6,
        "speedup_vs_highs": statistics.median(t_highs) / statistics.median(t_flow),
        "optimal": bool(optimal),
        "mean_max_over_mean_load": float(np.mean([p.max_load * num_gpus / total for p in plans])),
        "traffic_over_lp_optimum_mean": float(np.mean(traffic)),
        "traffic_over_lp_optimum_max": float(np.max(traffic)),
        "flow_calls": len(t_flow),
        "highs_calls": len(t_highs),
    }


def environment() -> dict:
    return {
        "cpu": _env.cpu_name(),
        "cores": os.cpu_count(),
        **_env.versions("python", "numpy", "numba", "highspy"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "allocator": allocator_settings() or "glibc defaults",
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _env.git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200, help="micro-batches per size and stream")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per micro-batch (flow solver)")
    ap.add_argument("--highs-every", type=int, default=2, help="time HiGHS on 1/N of the micro-batches")
    ap.add_argument(
        "--traffic-checks", type=int, default=5, help="micro-batches compared with the traffic LP"
    )
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few micro-batches per size (smoke run)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduler_cpu.json"))
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's allocator defaults (by default tune_allocator() runs, as in the runtime)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    args = ap.parse_args(argv)
    if not args.default_malloc:
        tune_allocator()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):  # one thread: keep it on one core
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    if args.quick:
        args.batches, args.repeats, args.traffic_checks = 10, 1, 1
    rows = []
    for e, g, r in SIZES:
        for stream in STREAMS:
            rows.append(bench_size(e, g, r, args, stream))
            _print_row(rows[-1])
    result = {
        "benchmark": "scheduler",
        "environment": environment(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "streams": [s.__dict__ for s in STREAMS],
        "traffic_weights": TRAFFIC_WEIGHTS,
        "baseline": "highs (warm-started dual simplex, threads=1, same run)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["optimal"] for r in rows) else 1


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "header", False):
        print(
            f"{'size':>10} {'stream':>12} {'flow med':>9} {'flow p99':>9} {'HiGHS med':>10} "
            f"{'speedup':>8} {'optimal':>8} {'max/mean':>9} {'traffic/LP':>11}"
        )
        _print_row.header = True
    print(
        f"{r['size']:>10} {r['stream']:>12} {r['flow_median_us']:>7.1f}us {r['flow_p99_us']:>7.1f}us "
        f"{r['highs_median_us']:>8.1f}us {r['speedup_vs_highs']:>7.1f}x {str(r['optimal']):>8} "
        f"{r['mean_max_over_mean_load']:>9.4f} {r['traffic_over_lp_optimum_mean']:>11.4f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
