"""What the between-micro-batch variation of expert loads in a training run costs a placement
built from a forecast (EPLB), against per-micro-batch balancing (MicroEP); complements
`routing_variability.py` (shares' spread and skew).

Reads a `micromoe train --record-routing` log (JSON lines: step, micro_batch, layer, counts[G][E]
of one MicroEP group) and reports per layer:
- within_step_sd / between_step_sd / iid_token_sd: with gradient accumulation, the std of an
  expert's share between micro-batches of the same step (weights unchanged: data noise only), the
  std of the step means (adds the router's drift as it trains), and what the within-step std
  would be if tokens chose experts independently (binomial), median over experts;
- tv_next / tv_window: total-variation distance of a micro-batch's share vector from the previous
  micro-batch's and from the mean of the previous `--window` micro-batches (the forecast): the
  share of rows a perfect forecaster of that kind would misplace;
- max/mean GPU load per micro-batch, mean over micro-batches, on G GPUs with `--replicas` slots
  per expert: plain EP; EPLB placed for the previous window (even split over replicas, as EPLB
  runs); EPLB placed for the micro-batch itself (a perfect forecast); MicroEP on the symmetric
  placement and on a load-aware placement for the previous window (optimal split per
  micro-batch, density lemma).
The gap between EPLB-window and EPLB-oracle is what the variation costs a forecast placement;
the gap from there to MicroEP is what fine-grained balancing buys.

    PYTHONPATH=. python benchmarks/forecast_error.py micromoe/data/traces/tiny_routing.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from micromoe.plan import Placement, balance_ratio
from micromoe.sim.eplb import eplb_slots, even_quota

FloatArray = npt.NDArray[np.float64]


def read_log(path: Path) -> tuple[int, dict[int, list[tuple[int, int, npt.NDArray[np.int64]]]]]:
    """(G source GPUs, layer -> [(step, micro_batch, loads int64 [E])] in file order, loads summed
    over the sources)."""
    out: dict[int, list[tuple[int, int, npt.NDArray[np.int64]]]] = defaultdict(list)
    num_gpus = 0
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            counts = np.asarray(rec["counts"], dtype=np.int64)
            num_gpus = counts.shape[0]
            out[int(rec["layer"])].append(
                (int(rec["step"]), int(rec.get("micro_batch", 0)), counts.sum(axis=0))
            )
    return num_gpus, dict(out)


def tv(p: FloatArray, q: FloatArray) -> float:
    """Total-variation distance of two share vectors."""
    return 0.5 * float(np.abs(p - q).sum())


def variation(
    records: list[tuple[int, int, npt.NDArray[np.int64]]], window: int, top_k: int
) -> dict[str, float]:
    steps = np.array([r[0] for r in records])
    loads = np.stack([r[2] for r in records]).astype(np.float64)
    shares = loads / loads.sum(axis=1, keepdims=True)
    out = {"micro_batches": len(records), "rows_per_micro_batch": float(loads.sum(axis=1).mean())}
    uniq = np.unique(steps)
    if len(records) > len(uniq):  # gradient accumulation: several micro-batches per step
        within = np.mean([shares[steps == s].var(axis=0) for s in uniq], axis=0)
        step_means = np.stack([shares[steps == s].mean(axis=0) for s in uniq])
        out["within_step_sd"] = float(np.median(np.sqrt(within)))
        out["between_step_sd"] = float(np.median(step_means.std(axis=0)))
        # the same spread if every token chose independently: count_e ~ Binomial(T, q_e), q_e = k * share_e
        q = np.clip(top_k * shares.mean(axis=0), 0.0, 1.0)
        tokens = loads.sum(axis=1).mean() / top_k
        out["iid_token_sd"] = float(np.median(np.sqrt(q * (1 - q) / tokens) / top_k))
    out["tv_next"] = float(np.mean([tv(shares[i], shares[i - 1]) for i in range(1, len(shares))]))
    out["tv_window"] = float(
        np.mean([tv(shares[i], shares[i - window : i].mean(axis=0)) for i in range(window, len(shares))])
    )
    return out


def balance(
    records: list[tuple[int, int, npt.NDArray[np.int64]]], num_gpus: int, replicas: int, window: int
) -> dict[str, float]:
    """Mean over micro-batches (after the first `window`) of max/mean GPU load per balancer."""
    loads = np.stack([r[2] for r in records])
    num_experts = loads.shape[1]
    slots = num_experts * replicas // num_gpus
    ep = Placement.expert_parallel(num_gpus, num_experts, 1)
    sym = Placement.symmetric(num_gpus, num_experts, replicas)
    res: dict[str, list[float]] = defaultdict(list)
    for i in range(window, len(loads)):
        load = loads[i]
        mean = load.sum() / num_gpus
        forecast = loads[i - window : i].mean(axis=0)
        res["ep"].append(balance_ratio(load, ep))
        for name, basis in (("eplb_window", forecast), ("eplb_oracle", load.astype(np.float64))):
            gpu = even_quota(load, eplb_slots(basis, num_gpus, slots)).sum(axis=0)
            res[name].append(float(gpu.max() / mean))
        res["microep_symmetric"].append(balance_ratio(load, sym))
        aware = Placement.asymmetric(forecast, num_gpus, slots, seed=i, num_samples=16)
        res["microep_window"].append(balance_ratio(load, aware))
    return {k: float(np.mean(v)) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "log", type=Path, help="routing log (JSON lines, optionally .gz) of micromoe train --record-routing"
    )
    ap.add_argument("--window", type=int, default=8, help="micro-batches in the forecast window")
    ap.add_argument("--replicas", type=int, default=2, help="slots per expert for EPLB and MicroEP")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token of the logged model")
    ap.add_argument("--skip-steps", type=int, default=0, help="ignore the first N optimizer steps")
    ap.add_argument("--json", type=Path, default=None, help="write the table as JSON")
    args = ap.parse_args()
    gpus, layers = read_log(args.log)
    rows: list[dict[str, Any]] = []
    for layer, recs in sorted(layers.items()):
        recs = [r for r in recs if r[0] >= args.skip_steps]
        rows.append(
            {
                "layer": layer,
                **variation(recs, args.window, args.top_k),
                **balance(recs, gpus, args.replicas, args.window),
            }
        )
    keys = [k for k in rows[0] if k != "layer"]
    mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    print(f"{args.log}: {len(rows)} layers, window {args.window}, replicas {args.replicas}")
    for r in [*rows, {"layer": "mean", **mean}]:
        print(f"layer {r['layer']}: " + ", ".join(f"{k} {r[k]:.4g}" for k in keys if k in r))
    if args.json:
        args.json.write_text(
            json.dumps({"log": str(args.log), "window": args.window, "rows": rows, "mean": mean}, indent=1)
        )


if __name__ == "__main__":
    main()
