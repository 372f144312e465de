"""One-GPU emulation of the MoE layer's expert time under every balancer.

For a workload on G simulated GPUs, every balancer of `micromoe.sim` plans each micro-batch; then
each simulated GPU's expert GEMMs (forward+backward `GroupedSwiGLU`, at the rows per local slot
its plan gives it, padded to 8 rows per slot as the dispatchers do) are timed on the one real GPU.
The slowest GPU's time is the step's critical path. An *ideal* even split (total rows / G on each
GPU, even over its slots) is timed G times the same way: its max/mean is the noise floor of the
measurement, and its max is what a balancer's max is compared with (both maxima of G noisy
timings). The cost model's prediction of each GPU's time is reported beside the measurement.

Timing is interleaved: per sample, every distinct per-GPU row set of every variant and the ideal's
G GPUs are timed once per round, in a fresh seeded shuffle each round, for --rounds rounds; a GPU's
time is the median over rounds. Drift of the GPU between rounds so hits all variants alike. The
raw rounds are kept in the results JSON; the ideal's one-round noise floor and its drift (max/min
of its per-round median) are reported beside the noise floor of the medians.

Two phases, so planning (which needs HiGHS for LPLB) runs on a CPU and only timing on the GPU:

    PYTHONPATH=. python3 benchmarks/bench_emulated.py plan --out plans.json          # CPU
    PYTHONPATH=. python3 benchmarks/bench_emulated.py time --plans plans.json \\
        --json benchmarks/results/emulated_1xH200.json                             # GPU
    PYTHONPATH=. python3 benchmarks/bench_emulated.py all --json ...               # both

The workload cases and the planning phase live in `emulated_cases.py`; this file times and reports.

Legend: G simulated GPUs, S local slots per GPU, E experts, K timed samples of a case.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from emulated_cases import balancer_names, make_plans, model_for  # benchmarks/ is on sys.path as a script

from micromoe.plan.cost import CostModel

ALIGN = 8


# --------------------------------------------------------------------------------------------
# timing (GPU)
def padded(rows: np.ndarray) -> np.ndarray:
    return -(-rows // ALIGN) * ALIGN


def ideal_rows(total: int, gpus: int, slots: int) -> np.ndarray:
    """[S] rows of one GPU under a perfectly even split of `total` over G GPUs and S slots each."""
    per = total / gpus / slots
    return np.full(slots, int(round(per / ALIGN)) * ALIGN, dtype=np.int64)


def sample_items(case: dict[str, Any], k: int) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    """The timed items of sample k: every distinct per-GPU row set of the variants once, then the
    ideal's G GPUs as G separate items (identical work, so its spread is the noise floor).

    Returns (items, item_of): items[i] is rows int64 [S_v] (padded to ALIGN); item_of[v] is the
    item index of each GPU of variant v, int [G] ("ideal" included, last).
    """
    g = case["spec"]["gpus"]
    items: list[np.ndarray] = []
    index: dict[tuple[int, ...], int] = {}
    item_of: dict[str, list[int]] = {}
    for v in case["rows"]:
        ids = []
        for r in padded(np.asarray(case["rows"][v][k], dtype=np.int64)):
            ids.append(index.setdefault(tuple(r.tolist()), len(items)))
            if ids[-1] == len(items):
                items.append(r)
        item_of[v] = ids
    item_of["ideal"] = list(range(len(items), len(items) + g))
    items += [ideal_rows(case["totals"][k], g, case["slots_per_gpu"])] * g
    return items, item_of


def round_orders(num_items: int, rounds: int, rng: np.random.Generator) -> list[list[int]]:
    """R shuffled orders of the items, int [R, N]; consecutive rounds differ (when N > 1)."""
    orders: list[list[int]] = []
    while len(orders) < rounds:
        order = rng.permutation(num_items).tolist()
        if num_items < 2 or not orders or order != orders[-1]:
            orders.append(order)
    return orders


def time_rounds(
    timer: Any, items: list[np.ndarray], orders: list[list[int]], reps: int, warmup: int
) -> np.ndarray:
    """raw us float64 [R, N]: raw[r, i] the time of item i in round r (median of `reps` runs after
    `warmup`), items timed in round r's order; rounded to 0.01 us (as recorded)."""
    raw = np.zeros((len(orders), len(items)))
    for r, order in enumerate(orders):
        for i in order:
            raw[r, i] = round(float(timer.time_us(items[i], reps=reps, warmup=warmup)), 2)
    return raw


def time_case(
    case: dict[str, Any],
    timer: Any,
    model: CostModel | None,
    *,
    rounds: int,
    reps: int,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time every variant of every kept sample in interleaved rounds.

    Per sample, the distinct per-GPU row sets of every variant and the ideal's G GPUs (`sample_items`)
    are timed once per round, in a freshly shuffled order each round (seeded by `seed`, the case
    name and the sample), for R rounds; a GPU's time is its item's median over the rounds. So slow
    drift of the GPU (clocks, power, heat) hits every variant alike instead of whichever was timed
    last. Returns measured and predicted us [K, G] per variant and, under "timing", the rounds:
    per sample the item of each (variant, GPU), the orders [R, N] and the raw times [R, N].
    """
    if rounds < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, reps >= 1, warmup >= 0; got {rounds}, {reps}, {warmup}")
    meas: dict[str, list] = {v: [] for v in [*case["rows"], "ideal"]}
    samples = []
    name_key = zlib.crc32(case["spec"]["name"].encode())
    for k in range(len(case["totals"])):
        items, item_of = sample_items(case, k)
        orders = round_orders(len(items), rounds, np.random.default_rng([seed, name_key, k]))
        raw = time_rounds(timer, items, orders, reps, warmup)
        med = np.median(raw, axis=0)  # [N] per item, over rounds
        for v, ids in item_of.items():
            meas[v].append(med[ids].tolist())
        samples.append({"items": item_of, "order": orders, "raw_us": raw.tolist()})
    timing = {"rounds": rounds, "reps": reps, "warmup": warmup, "seed": seed, "samples": samples}
    return {"measured_us": meas, "predicted_us": predictions(case, model), "timing": timing}


def noise_stats(timing: dict[str, Any]) -> dict[str, float]:
    """Measurement quality from the raw rounds of `time_case` (medians over samples):

    - noise_floor_round: the ideal's max/mean over its G timings within one round (what a single
      back-to-back measurement gives; also median over rounds);
    - drift: max/min over rounds of the median of the ideal's G timings in a round (slow change of
      the GPU during a sample's rounds; 1.0 = none);
    - item_spread: max/min over rounds of one item's time (median over all items).
    """
    one_round, drift, spread = [], [], []
    for s in timing["samples"]:
        raw = np.asarray(s["raw_us"], dtype=np.float64)  # [R, N]
        ideal = raw[:, s["items"]["ideal"]]  # [R, G]
        one_round += (ideal.max(axis=1) / ideal.mean(axis=1)).tolist()
        per_round = np.median(ideal, axis=1)
        drift.append(per_round.max() / per_round.min())
        spread += (raw.max(axis=0) / raw.min(axis=0)).tolist()
    return {
        "noise_floor_round": float(np.median(one_round)),
        "drift": float(np.median(drift)),
        "item_spread": float(np.median(spread)),
    }


def predictions(case: dict[str, Any], model: CostModel | None) -> dict[str, list]:
    """The model's per-GPU prediction us [K, G] of every variant and the ideal (NaN without a model)."""
    pred: dict[str, list] = {v: [] for v in [*case["rows"], "ideal"]}
    for k in range(len(case["totals"])):
        items, item_of = sample_items(case, k)
        for v, ids in item_of.items():
            rows_GS = np.stack([items[i] for i in ids])
            pred[v].append(
                model.predict(rows_GS).tolist() if model is not None else [float("nan")] * len(ids)
            )
    return pred


def rescore(plans: dict[str, Any], results: dict[str, Any], models: str | None) -> dict[str, Any]:
    """Recompute predictions and summaries of timed results with the current cost models (the run's
    own predictions are kept as predicted_us_run)."""
    by_name = {c["spec"]["name"]: c for c in plans["cases"]}
    gpu = results["hardware"]["gpu"]
    for r in results["cases"]:
        case = by_name[r["spec"]["name"]]
        model = model_for((r["spec"]["hidden"], r["spec"]["ffn"]), gpu, models)
        r.setdefault("predicted_us_run", r["predicted_us"])
        r["predicted_us"] = predictions(case, model)
        r["model"] = model.meta.get("name")
        r["summary"] = summarize(case, r)
        print(f"\n{r['spec']['name']} (rescored with {r['model']})")
        print(format_table(r["summary"]))
    results["targets"] = target_rows(results["cases"])
    print("\n" + format_targets(results["targets"]))
    return results


def summarize(case: dict[str, Any], timed: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per variant: medians over samples of critical path, mean, max/mean, ratios, model error."""
    meas = {v: np.asarray(t) for v, t in timed["measured_us"].items()}
    pred = {v: np.asarray(t) for v, t in timed["predicted_us"].items()}
    ideal_max = meas["ideal"].max(axis=1)
    ideal_mean = meas["ideal"].mean(axis=1)
    eplb_max = meas["eplb"].max(axis=1) if "eplb" in meas else None
    out = {}
    for v, t in meas.items():
        crit, mean = t.max(axis=1), t.mean(axis=1)
        err = np.abs(pred[v] - t) / t
        pcrit = pred[v].max(axis=1)
        row = {
            "critical_us": float(np.median(crit)),
            "mean_us": float(np.median(mean)),
            "time_max_mean": float(np.median(crit / mean)),
            "vs_ideal": float(np.median(crit / ideal_max)),
            "vs_ideal_mean": float(np.median(crit / ideal_mean)),
            "vs_eplb": float(np.median(crit / eplb_max)) if eplb_max is not None else float("nan"),
            "model_median_err": float(np.median(err)),
            "model_critical_err": float(np.median(np.abs(pcrit - crit) / crit)),
            "predicted_vs_ideal": float(np.median(pcrit / pred["ideal"].max(axis=1))),
            "predicted_max_mean": float(np.median(pcrit / pred[v].mean(axis=1))),
        }
        if v in case["token_ratio"]:
            row["token_max_mean"] = float(np.median(case["token_ratio"][v]))
        out[v] = row
    if "timing" in timed:  # results timed in rounds (older ones were not)
        out["ideal"].update(noise_stats(timed["timing"]))
    return out


def run_timing(plans: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch  # only the timing phase needs torch and a GPU

    from micromoe.runtime.calibrate import ExpertTimer, environment

    device = torch.device(args.device)
    results, timers = [], {}
    for case in plans["cases"]:
        spec = case["spec"]
        shape = (spec["hidden"], spec["ffn"])
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        model = model_for(shape, gpu, args.models)
        if shape not in timers:
            timers.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            max_rows = max(
                max(int(padded(np.asarray(r)).sum(axis=1).max()) for r in rs) for rs in case["rows"].values()
            )
            timers[shape] = ExpertTimer(*shape, device, max_rows=max(max_rows, 4 * 65536), seed=args.seed)
        t0 = time.perf_counter()
        timed = time_case(
            case, timers[shape], model, rounds=args.rounds, reps=args.reps, warmup=args.warmup, seed=args.seed
        )
        summary = summarize(case, timed)
        kept = {k: v for k, v in case.items() if k != "rows"}  # the plans file keeps the rows
        results.append(
            {**kept, **timed, "summary": summary, "model": model.meta.get("name") if model else None}
        )
        print(
            f"\n{spec['name']} ({shape[0]}x{shape[1]}, {spec['gpus']} GPUs, {time.perf_counter() - t0:.0f} s)"
        )
        print(format_table(summary), flush=True)
        if args.json:  # partial results, in case the run is cut short
            args.json.write_text(json.dumps({"partial": True, "cases": results}) + "\n")
    env = environment(device)
    targets = target_rows(results)
    print("\n" + format_targets(targets))
    return {
        "hardware": env,
        "config": plans["config"],
        "commit": _commit(),
        "timing": {k: getattr(args, k) for k in ("rounds", "reps", "warmup", "seed")},
        "targets": targets,
        "cases": results,
    }


def target_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, the issue's targets for our adaptive variants against the best peer (EPLB, LPLB)."""
    rows = []
    for r in results:
        s = r["summary"]
        peers = [p for p in ("eplb", "lplb") if p in s]
        best = min(peers, key=lambda p: s[p]["critical_us"])
        for ours in ("microep-ar", "microep-ar-t", "microep-ar-t-m2", "microep-t"):
            if ours not in s:
                continue
            o = s[ours]
            rows.append(
                {
                    "case": r["spec"]["name"],
                    "variant": ours,
                    "vs_best_peer": o["critical_us"] / s[best]["critical_us"],
                    "best_peer": best,
                    "vs_eplb": o["vs_eplb"],
                    "time_max_mean": o["time_max_mean"],
                    "token_max_mean": o["token_max_mean"],
                    "noise_floor": s["ideal"]["time_max_mean"],
                    "drift": s["ideal"].get("drift", float("nan")),
                    "model_err_all": float(np.median([v["model_median_err"] for v in s.values()])),
                    "ratio_err_all": float(
                        np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal_mean"]) for v in s.values()])
                    ),
                }
            )
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    head = f"{'case':<28}{'variant':<14}{'vs best peer':>13}{'':>6}{'vs eplb':>9}{'t max/mean':>11}"
    head += f"{'tok max/mean':>13}{'noise floor':>12}{'drift':>7}{'model err':>10}{'ratio err':>10}"
    lines = ["targets: vs best peer <= 0.98 (<= 0.90 vs EPLB when noisy), time and token max/mean", head]
    for r in rows:
        lines.append(
            f"{r['case']:<28}{r['variant']:<14}{r['vs_best_peer']:>13.3f}{r['best_peer']:>6}{r['vs_eplb']:>9.3f}"
            f"{r['time_max_mean']:>11.3f}{r['token_max_mean']:>13.3f}{r['noise_floor']:>12.3f}"
            f"{r.get('drift', float('nan')):>7.3f}"
            f"{r['model_err_all']:>10.3f}{r['ratio_err_all']:>10.3f}"
        )
    return "\n".join(lines)


def format_table(summary: dict[str, dict[str, float]]) -> str:
    cols = [
        ("critical_us", "crit us", "{:.0f}"),
        ("mean_us", "mean us", "{:.0f}"),
        ("time_max_mean", "t max/mean", "{:.3f}"),
        ("vs_ideal", "vs ideal", "{:.3f}"),
        ("vs_eplb", "vs eplb", "{:.3f}"),
        ("token_max_mean", "tok max/mean", "{:.3f}"),
        ("model_median_err", "model err", "{:.3f}"),
        ("predicted_vs_ideal", "pred vs ideal", "{:.3f}"),
    ]
    lines = ["  " + f"{'variant':<16}" + "".join(f"{h:>14}" for _, h, _ in cols)]
    for v, row in summary.items():
        cells = "".join(f"{fmt.format(row[k]) if k in row else '-':>14}" for k, _, fmt in cols)
        lines.append("  " + f"{v:<16}" + cells)
    ideal = summary.get("ideal", {})
    if "drift" in ideal:
        lines.append(
            f"  noise floor {ideal['time_max_mean']:.3f} (one round: {ideal['noise_floor_round']:.3f}), "
            f"drift {ideal['drift']:.3f} (max/min of the ideal's per-round median), "
            f"item spread {ideal['item_spread']:.3f} (max/min over rounds)"
        )
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    """JSON indented by 1, with every list of plain values on one line (the raw rounds stay compact)."""

    def one_line(m: re.Match) -> str:
        text = m.group(0)
        if "\n" not in text:  # not an indented list (json.dumps escapes newlines inside strings)
            return text
        return "[" + ", ".join(x.strip() for x in text[1:-1].split(",")) + "]"

    return re.sub(r"\[[^\[\]{}\"]*\]", one_line, json.dumps(obj, indent=1))


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return sha + ("+dirty" if dirty.stdout.strip() else "") if sha else "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("plan", "time", "all", "rescore"))
    ap.add_argument("--out", type=Path, help="plan: where to write the plans JSON")
    ap.add_argument("--plans", type=Path, help="time, rescore: the plans JSON")
    ap.add_argument("--results", type=Path, help="rescore: timed results to re-predict with --models")
    ap.add_argument("--json", type=Path, help="time/all: results JSON")
    ap.add_argument("--only", default=None, help="comma-separated substrings of case names to keep")
    ap.add_argument("--balancers", default=",".join(balancer_names()))
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tokens-per-gpu", type=int, default=4096)
    ap.add_argument("--micro-batches", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4, help="layers per workload (a spread of a trace's)")
    ap.add_argument("--samples", type=int, default=6, help="timed (micro-batch, layer) samples per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds per sample; a GPU's time is its median"
    )
    ap.add_argument("--reps", type=int, default=1, help="timed runs per item per round (their median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each item's timed runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=None, help="folder of cost-model JSON files (default: bundled)")
    ap.add_argument(
        "--gpu-name", default="NVIDIA H200", help="plan: whose cost models the time-aware planners use"
    )
    args = ap.parse_args()
    if args.phase == "rescore":
        out = rescore(json.loads(args.plans.read_text()), json.loads(args.results.read_text()), args.models)
        (args.json or args.results).write_text(dumps(out) + "\n")
        return 0
    if args.phase in ("plan", "all"):
        plans = make_plans(args)
        if args.out:
            args.out.write_text(json.dumps(plans) + "\n")
        if args.phase == "plan":
            return 0
    else:
        plans = json.loads(args.plans.read_text())
        if args.only:  # time a subset of a plans file (plan and all filter while planning)
            keep = args.only.split(",")
            plans["cases"] = [c for c in plans["cases"] if any(o in c["spec"]["name"] for o in keep)]
    result = run_timing(plans, args)
    if args.json:
        args.json.write_text(dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
