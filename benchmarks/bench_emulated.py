"""One-GPU emulation of the MoE layer's expert time under every balancer.

For a workload on G simulated GPUs, every balancer of `micromoe.sim` plans each micro-batch; then
each simulated GPU's expert GEMMs (forward+backward `GroupedSwiGLU`, at the rows per local slot
its plan gives it, padded to 8 rows per slot as the dispatchers do) are timed on the one real GPU.
The slowest GPU's time is the step's critical path. An *ideal* even split (total rows / G on each
GPU, even over its slots) is timed G times the same way: its max/mean is the noise floor of the
measurement, and its max is what a balancer's max is compared with (both maxima of G noisy
timings). The cost model's prediction of each GPU's time is reported beside the measurement.

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
import subprocess
import sys
import time
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


def time_case(case: dict[str, Any], timer: Any, model: CostModel | None, reps: int) -> dict[str, Any]:
    """Time every variant of every kept sample; measured and predicted us [K, G] per variant."""
    g = case["spec"]["gpus"]
    variants = list(case["rows"]) + ["ideal"]
    meas = {v: [] for v in variants}
    pred = {v: [] for v in variants}
    cache: dict[tuple, float] = {}
    for k, total in enumerate(case["totals"]):
        for v in variants:
            if v == "ideal":
                one = ideal_rows(total, g, case["slots_per_gpu"])
                rows_GS = np.tile(one, (g, 1))
                times = [timer.time_us(one, reps=reps) for _ in range(g)]  # G fresh timings
            else:
                rows_GS = padded(np.asarray(case["rows"][v][k], dtype=np.int64))
                times = []
                for r in rows_GS:
                    key = tuple(r)
                    if key not in cache:
                        cache[key] = timer.time_us(r, reps=reps)
                    times.append(cache[key])
            meas[v].append(times)
            pred[v].append(model.predict(rows_GS).tolist() if model is not None else [float("nan")] * g)
    return {"measured_us": meas, "predicted_us": pred}


def predictions(case: dict[str, Any], model: CostModel) -> dict[str, list]:
    """The model's per-GPU prediction [K, G] of every variant (as `time_case` makes them)."""
    g = case["spec"]["gpus"]
    pred: dict[str, list] = {}
    for v in [*case["rows"], "ideal"]:
        pred[v] = []
        for k, total in enumerate(case["totals"]):
            if v == "ideal":
                rows_GS = np.tile(ideal_rows(total, g, case["slots_per_gpu"]), (g, 1))
            else:
                rows_GS = padded(np.asarray(case["rows"][v][k], dtype=np.int64))
            pred[v].append(model.predict(rows_GS).tolist())
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
        timed = time_case(case, timers[shape], model, args.reps)
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
                    "model_err_all": float(np.median([v["model_median_err"] for v in s.values()])),
                    "ratio_err_all": float(
                        np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal_mean"]) for v in s.values()])
                    ),
                }
            )
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    head = f"{'case':<28}{'variant':<14}{'vs best peer':>13}{'':>6}{'vs eplb':>9}{'t max/mean':>11}"
    head += f"{'tok max/mean':>13}{'noise floor':>12}{'model err':>10}{'ratio err':>10}"
    lines = ["targets: vs best peer <= 0.98 (<= 0.90 vs EPLB when noisy), time and token max/mean", head]
    for r in rows:
        lines.append(
            f"{r['case']:<28}{r['variant']:<14}{r['vs_best_peer']:>13.3f}{r['best_peer']:>6}{r['vs_eplb']:>9.3f}"
            f"{r['time_max_mean']:>11.3f}{r['token_max_mean']:>13.3f}{r['noise_floor']:>12.3f}"
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
    return "\n".join(lines)


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
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per GPU (median)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=None, help="folder of cost-model JSON files (default: bundled)")
    ap.add_argument(
        "--gpu-name", default="NVIDIA H200", help="plan: whose cost models the time-aware planners use"
    )
    args = ap.parse_args()
    if args.phase == "rescore":
        out = rescore(json.loads(args.plans.read_text()), json.loads(args.results.read_text()), args.models)
        (args.json or args.results).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    if args.phase in ("plan", "all"):
        plans = make_plans(args)
        if args.out:
            args.out.write_text(json.dumps(plans) + "\n")
        if args.phase == "plan":
            return 0
    else:
        plans = json.loads(args.plans.read_text())
    result = run_timing(plans, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
