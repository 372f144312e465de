"""How much expert loads vary between micro-batches of a real training run's routing log.

    python benchmarks/routing_variability.py micromoe/data/traces/tiny_routing.jsonl --skip 20

Per layer, over micro-batches after `--skip`: the coefficient of variation of each expert's share
of the layer's load (std / mean over micro-batches, averaged over experts), the mean absolute
change of an expert's share between consecutive micro-batches relative to its mean share, and the
max/mean expert load of one micro-batch against that of the whole-run average (what a static
placement such as EPLB's is built for).
"""

from __future__ import annotations

import argparse

import numpy as np

from micromoe.sim import load_trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument(
        "--skip", type=int, default=20, help="micro-batches to drop at the start (routing settles)"
    )
    args = ap.parse_args()
    trace = load_trace(args.trace)
    loads = trace.counts.sum(axis=2)[args.skip :].astype(np.float64)  # [M, L, E]
    share = loads / loads.sum(axis=2, keepdims=True)
    mean_share = share.mean(axis=0)  # [L, E]
    cv = share.std(axis=0) / mean_share
    step_change = np.abs(np.diff(share, axis=0)).mean(axis=0) / mean_share
    per_mb_skew = (loads.max(axis=2) / loads.mean(axis=2)).mean(axis=0)
    avg_skew = mean_share.max(axis=1) * mean_share.shape[1]
    print(
        f"{args.trace}: {loads.shape[0]} micro-batches x {loads.shape[1]} layers x {loads.shape[2]} experts"
    )
    print("layer  share CV  step-to-step change  hottest/mean per micro-batch  hottest/mean of the average")
    for layer in range(loads.shape[1]):
        print(
            f"{layer:5d}  {cv[layer].mean():8.3f}  {step_change[layer].mean():19.3f}  "
            f"{per_mb_skew[layer]:28.3f}  {avg_skew[layer]:27.3f}"
        )


if __name__ == "__main__":
    main()
