"""Time-aware planner: latency and predicted quality against the token planner, same run.

For every size (experts x GPUs x replicas) and micro-batch stream of `bench_scheduler.py`, it times
full `schedule` calls without and with a cost model (one thread, pinned to one CPU) and reports
the predicted slowest-GPU time of both plans, the time plan's gap to its lower bound and its token
max/mean.

    python benchmarks/bench_timed_planner.py [--cost-model h200-2048x768] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from bench_scheduler import STREAMS, Stream, environment, micro_batches, time_calls

from micromoe.allocator import tune_allocator
from micromoe.plan import Placement, schedule
from micromoe.plan import cost as cost_models
from micromoe.plan.timed import predict_replica_quota_us

SIZES = [(16, 8, 2), (32, 8, 2), (128, 8, 2), (64, 32, 2), (128, 32, 3), (256, 64, 4)]
# Used when no model is named: a 2048/768 H200 shape's order of magnitude (DESIGN.md section 9:
# 32,768 rows over 32 slots in 2.11 ms; a 56-row fragment costs ~13 us), not a measurement.
FALLBACK = cost_models.CostModel(
    fixed_us=40.0, max_row_us=0.004, tile=128, c_row=0.06, c_tile=5.0, c_active=4.0
)


def bench_size(e: int, g: int, r: int, args, stream: Stream, model) -> dict:
    p = Placement.symmetric(g, e, r)
    batches = micro_batches(stream, g, e, args.tokens * args.top_k, args.batches, args.seed)
    schedule(batches[0], p)
    schedule(batches[0], p, cost=model)  # compile outside the timing
    t_tok, tok_plans = time_calls(lambda c: schedule(c, p), batches, args.repeats)
    t_time, plans = time_calls(lambda c: schedule(c, p, cost=model), batches, args.repeats)
    tok_max = np.array([predict_replica_quota_us(q.replica_quota, p, model).max() for q in tok_plans])
    time_max = np.array([q.predicted_us.max() for q in plans])
    gap = time_max / np.array([q.time_lower_bound_us for q in plans])
    mean_load = np.array([c.sum() / g for c in batches])
    return {
        "size": f"{e}x{g}x{r}",
        "stream": stream.name,
        "token_median_us": statistics.median(t_tok) * 1e6,
        "timed_median_us": statistics.median(t_time) * 1e6,
        "timed_p99_us": float(np.percentile(t_time, 99)) * 1e6,
        "time_over_token_predicted_mean": float(np.mean(time_max / tok_max)),
        "time_over_token_predicted_min": float(np.min(time_max / tok_max)),
        "gap_to_lower_bound_mean": float(np.mean(gap)),
        "gap_to_lower_bound_max": float(np.max(gap)),
        "timed_token_max_over_mean": float(np.mean([q.max_load for q in plans] / mean_load)),
        "calls": len(t_time),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cost-model", default=None, help="bundled name or JSON path (default: a rough H200 model)"
    )
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/timed_planner_cpu.json"))
    args = ap.parse_args(argv)
    tune_allocator()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    if args.quick:
        args.batches, args.repeats = 10, 1
    model = FALLBACK if args.cost_model is None else cost_models.load(args.cost_model)
    rows = []
    print(
        f"{'size':>10} {'stream':>12} {'token':>8} {'timed':>8} {'p99':>8} {'t/tok':>7} {'gap':>7} {'gapmax':>7}"
    )
    for e, g, r in SIZES:
        for stream in STREAMS:
            row = bench_size(e, g, r, args, stream, model)
            rows.append(row)
            print(
                f"{row['size']:>10} {row['stream']:>12} {row['token_median_us']:>6.1f}us "
                f"{row['timed_median_us']:>6.1f}us {row['timed_p99_us']:>6.1f}us "
                f"{row['time_over_token_predicted_mean']:>7.4f} {row['gap_to_lower_bound_mean']:>7.4f} "
                f"{row['gap_to_lower_bound_max']:>7.4f}",
                flush=True,
            )
    out = {
        "benchmark": "timed_planner",
        "environment": environment(),
        "cost_model": model.to_json(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
