"""Per-decision latency of the LPLB balancer's solvers (`micromoe.sim.lplb`), CPU only.

Variants, each fed the same sequence of micro-batches (Zipf-skewed multinomial loads, every third
micro-batch with a third of the experts idle):
- rebuild: a fresh `LplbSolver` per micro-batch (build the HiGHS model, then solve cold);
- cold: one `LplbSolver` per layout, bounds changed in place, basis cleared, solved cold (the
  default; its quotas equal rebuild's, which this script checks);
- warm: one `LplbSolver(warm_start=True)`: bounds changed in place, re-solved from the last basis;
  equally LP-optimal, but its quotas differ from a fresh solve (the share of micro-batches where
  they do is reported);
- ipm: `LplbIpmSolver`, LPLB's own 5 interior-point steps (no warm start: LPLB starts at x = 1).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lplb.py [--micro-batches 200] [--json OUT]

Legend: G GPUs, E experts, s the Zipf exponent of the expected loads.
"""

from __future__ import annotations

import argparse
import json
import time

import _env  # benchmarks/ (this script's folder) is on sys.path
import numpy as np

from micromoe.sim.lplb import LplbIpmSolver, LplbSolver, default_topology, lplb_layout

CASES = [(8, 32, 1.0), (8, 128, 1.0), (16, 64, 1.5), (32, 256, 1.0)]  # (G, E, s)


def micro_batches(num_experts: int, s: float, num: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(history [E], num loads [E] int64): 4096 x 8 tokens per GPU-equivalent, skewed by Zipf s."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    history = rng.permutation(p / p.sum())
    out = []
    for i in range(num):
        loads = rng.multinomial(num_experts * 1024, rng.dirichlet(history * 200 + 1e-3))
        if i % 3 == 2:
            loads[rng.choice(num_experts, num_experts // 3, replace=False)] = 0
        out.append(loads)
    return history, out


def time_case(g: int, e: int, s: float, num: int) -> dict:
    """Median and p99 microseconds per quota() call for every variant on one case."""
    history, batches = micro_batches(e, s, num, seed=g * 1000 + e)
    orig, copy = lplb_layout(history, g, default_topology(g))
    cold, warm, ipm = (
        LplbSolver(orig, copy, g),
        LplbSolver(orig, copy, g, warm_start=True),
        LplbIpmSolver(orig, copy, g),
    )
    variants = {
        "rebuild": lambda x: LplbSolver(orig, copy, g).quota(x),
        "cold": cold.quota,
        "warm": warm.quota,
        "ipm": ipm.quota,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    answers: dict[str, list[np.ndarray]] = {k: [] for k in variants}
    for loads in batches:  # interleaved, so drift of the shared machine hits all variants alike
        for name, fn in variants.items():
            t0 = time.perf_counter()
            answers[name].append(fn(loads))
            times[name].append(time.perf_counter() - t0)
    same = [np.array_equal(a, b) for a, b in zip(answers["cold"], answers["rebuild"], strict=True)]
    assert all(same), "the kept model solved cold must answer as a fresh solver"
    warm_differs = np.mean(
        [not np.array_equal(a, b) for a, b in zip(answers["warm"], answers["rebuild"], strict=True)]
    )
    row = {"gpus": g, "experts": e, "zipf": s, "warm_differs_from_fresh": float(warm_differs)}
    for name, ts in times.items():
        us = np.asarray(ts) * 1e6
        row[f"{name}_p50_us"], row[f"{name}_p99_us"] = float(np.median(us)), float(np.percentile(us, 99))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, default=200)
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    rows = [time_case(g, e, s, args.micro_batches) for g, e, s in CASES]
    names = ["rebuild", "cold", "warm", "ipm"]
    print(
        f"{'G':>3} {'E':>4} {'s':>4}  "
        + "  ".join(f"{n + ' p50/p99 us':>20}" for n in names)
        + "  warm!=fresh"
    )
    for r in rows:
        cells = "  ".join(f"{r[n + '_p50_us']:>9.0f}/{r[n + '_p99_us']:<10.0f}" for n in names)
        print(
            f"{r['gpus']:>3} {r['experts']:>4} {r['zipf']:>4}  {cells}  {r['warm_differs_from_fresh']:>10.0%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            env = {
                "cpu": _env.cpu_name(),
                **_env.versions("python", "numpy", "highspy"),
                "commit": _env.git_commit(),
            }
            json.dump({"env": env, "micro_batches": args.micro_batches, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
