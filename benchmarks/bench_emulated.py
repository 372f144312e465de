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

Legend: G simulated GPUs, S local slots per GPU, E experts, K timed samples of a case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from micromoe.plan import Placement, schedule
from micromoe.plan.cost import CostModel, bundled_name, load
from micromoe.plan.forecast import ReplacementPolicy
from micromoe.plan.timed_layouts import EVEN_MARGIN
from micromoe.sim.balancers import BALANCERS, Balancer, GroupConfig, MicroEP, make_balancers
from micromoe.sim.traces import load_trace
from micromoe.sim.workload import Workload, workload_from_aggregate, workload_from_zipf

TRACES = Path(__file__).resolve().parents[1] / "micromoe" / "data" / "traces"
ALIGN = 8
QWEN = (3584, 2560)


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One workload of the suite: its name, shape, group and sampling options."""

    name: str
    hidden: int
    ffn: int
    gpus: int
    source: str  # a trace file name, or "zipf:<s>:<experts>:<top_k>"
    noise: float = 0.1
    drift: float = 0.1


def target_suite() -> list[CaseSpec]:
    """The issue's target workloads (8 GPUs, 2 replicas, 4096 tokens per GPU)."""
    cases = [CaseSpec(f"qwen57b {t}", *QWEN, 8, f"{t}.json") for t in ("counts57b", "counts57b_l512")]
    cases += [CaseSpec(f"qwen57b {t}", *QWEN, 8, f"{t}.json") for t in ("counts57b_multi", "counts57b_share")]
    cases += [CaseSpec(f"zipf128 s={s}", 2048, 768, 8, f"zipf:{s}:128:8") for s in (0.5, 1.0, 1.5)]
    cases += [CaseSpec(f"zipf16 s={s}", 2048, 4096, 4, f"zipf:{s}:16:2") for s in (0.5, 1.0, 1.5)]
    noisy = {"noise": 0.5, "drift": 0.5}
    cases += [
        CaseSpec("qwen57b counts57b noisy", *QWEN, 8, "counts57b.json", **noisy),
        CaseSpec("zipf128 s=1.0 noisy", 2048, 768, 8, "zipf:1.0:128:8", **noisy),
        CaseSpec("zipf16 s=1.0 noisy", 2048, 4096, 4, "zipf:1.0:16:2", **noisy),
    ]
    return cases


def build_workload(spec: CaseSpec, args: argparse.Namespace) -> Workload:
    sampling = dict(
        num_micro_batches=args.micro_batches,
        num_gpus=spec.gpus,
        tokens_per_gpu=args.tokens_per_gpu,
        noise=spec.noise,
        drift=spec.drift,
        seed=args.seed,
    )
    if spec.source.startswith("zipf:"):
        _, s, e, k = spec.source.split(":")
        return workload_from_zipf(
            float(s), num_experts=int(e), num_layers=args.layers, top_k=int(k), **sampling
        )
    trace = load_trace(TRACES / spec.source)
    w = workload_from_aggregate(trace, top_k=trace.top_k or 8, **sampling)
    layers = np.linspace(0, w.num_layers - 1, args.layers).round().astype(int)  # a spread of layers
    return Workload(w.name, w.counts[:, layers], w.history[layers], w.top_k)


# --------------------------------------------------------------------------------------------
# planning (CPU)
def gpu_slot_rows(balancer: Any, layer: int, quota_EG: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """rows int64 [G, S]: each GPU's rows per local slot (sorted descending, zero-padded).

    A quota [E, G] merges replicas of one expert on one GPU (EPLB may place two there); those are
    split evenly again, as EPLB's even split does.
    """
    e_count, g_count = quota_EG.shape
    mult = np.ones((e_count, g_count), dtype=np.int64)
    slot_tables = getattr(balancer, "_slots", None)
    if isinstance(slot_tables, list):  # EPLB: slot_expert [G, S] per layer
        se = slot_tables[layer]
        mult = np.zeros((e_count, g_count), dtype=np.int64)
        for g in range(g_count):
            np.add.at(mult[:, g], se[g][se[g] >= 0], 1)
    out = np.zeros((g_count, slots_per_gpu), dtype=np.int64)
    for g in range(g_count):
        parts = []
        for e in np.flatnonzero(quota_EG[:, g]):
            q, m = int(quota_EG[e, g]), max(int(mult[e, g]), 1)
            parts += [q // m + (1 if i < q % m else 0) for i in range(m)]
        assert len(parts) <= slots_per_gpu, "more busy slots than the GPU has"
        out[g, : len(parts)] = sorted(parts, reverse=True)
    return out


class TimedMicroEP(MicroEP):
    """MicroEP on the symmetric placement, each micro-batch planned in predicted time."""

    name = "microep-t"

    def __init__(self, cfg: GroupConfig, cost: CostModel) -> None:
        super().__init__(cfg)
        self.cost = cost

    def decide(self, layer: int, counts: np.ndarray) -> np.ndarray:
        return schedule(counts, self.placements[layer], cost=self.cost).quota


class TimedMicroEPAdaptive(Balancer):
    """Time-aware MicroEP-AR: `ReplacementPolicy` with the cost model (starts load-aware from the
    workload's history, the same history EPLB gets) and time-aware plans."""

    name = "microep-ar-t"
    even_margin = EVEN_MARGIN

    def __init__(self, cfg: GroupConfig, cost: CostModel) -> None:
        super().__init__(cfg)
        self.cost = cost

    def setup(self, workload: Workload) -> None:
        g, e, d = self.cfg.num_gpus, workload.num_experts, self.cfg.replicas
        base = Placement.symmetric(g, e, d)
        self.policy = ReplacementPolicy(
            workload.num_layers, e, cost=self.cost, seed=self.cfg.seed, even_margin=self.even_margin
        )
        rows = workload.counts[0].sum(axis=(1, 2))  # rows per micro-batch: tokens x top-k x G, fixed
        for l in range(workload.num_layers):
            h = workload.history[l]
            self.policy.start(l, base, history=h / max(h.sum(), 1e-300) * rows[l])
        self._slots = g * base.slot_expert.shape[1]

    def decide(self, layer: int, counts: np.ndarray) -> np.ndarray:
        return schedule(counts, self.policy.placement(layer), cost=self.cost).quota

    def observe(self, layer: int, loads: np.ndarray) -> None:
        self.policy.observe(layer, loads)

    def info(self) -> dict[str, Any]:
        return {"slots": self._slots, "replacements": len(self.policy.events)}


class TimedMicroEPAdaptiveEvenMargin(TimedMicroEPAdaptive):
    """Ablation of `microep-ar-t`: a 2% tie margin towards more replicas when choosing the replica
    budget (`timed_layouts.prefer_even`; measured slower on Zipf-128, equal elsewhere)."""

    name = "microep-ar-t-m2"
    even_margin = 0.02


TIMED = {c.name: c for c in (TimedMicroEP, TimedMicroEPAdaptive, TimedMicroEPAdaptiveEvenMargin)}


def balancer_names() -> list[str]:
    return [b for b in BALANCERS if b != "bound"] + list(TIMED)


def make_all(names: list[str], cfg: GroupConfig, cost: CostModel | None) -> list[Balancer]:
    """The sim's balancers plus the time-aware variants (which need a cost model)."""
    out = make_balancers([n for n in names if n not in TIMED], cfg)
    if cost is not None:
        out += [TIMED[n](cfg, cost) for n in names if n in TIMED]
    return out


def plan_case(spec: CaseSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Run every balancer over the workload; keep the rows of K evenly spread (micro-batch, layer)."""
    w = build_workload(spec, args)
    cfg = GroupConfig(num_gpus=spec.gpus, replicas=args.replicas, seed=args.seed)
    names = [n for n in balancer_names() if n in args.balancers.split(",")]
    cost = _model_for((spec.hidden, spec.ffn), args.gpu_name, args.models)
    balancers = make_all(names, cfg, cost)
    names = [b.name for b in balancers]
    for b in balancers:
        b.setup(w)
    picks = _picks(w.num_micro_batches, w.num_layers, args.samples)
    rows: dict[str, list] = {n: [] for n in names}
    token_ratio: dict[str, list] = {n: [] for n in names}
    totals = []
    for m in range(w.num_micro_batches):
        for l in range(w.num_layers):
            counts = w.counts[m, l]
            loads = counts.sum(axis=0)
            for b in balancers:
                quota = b.decide(l, counts)
                assert np.array_equal(quota.sum(axis=1), loads)
                if (m, l) in picks:
                    s = int(b.info()["slots"]) // spec.gpus
                    rows[b.name].append(gpu_slot_rows(b, l, quota, s).tolist())
                    token_ratio[b.name].append(float(quota.sum(axis=0).max() * spec.gpus / loads.sum()))
                b.observe(l, loads)
            if (m, l) in picks:
                totals.append(int(loads.sum()))
    info = {b.name: b.info() for b in balancers}
    return {
        "spec": dataclasses.asdict(spec),
        "experts": w.num_experts,
        "slots_per_gpu": w.num_experts * args.replicas // spec.gpus,
        "picks": sorted(picks),
        "totals": totals,
        "rows": rows,
        "token_ratio": token_ratio,
        "info": json.loads(json.dumps(info, default=str)),
        "planner_model": cost.meta.get("name") if cost else None,
    }


def _picks(num_mb: int, num_layers: int, k: int) -> set[tuple[int, int]]:
    """K (micro-batch, layer) pairs: micro-batches evenly over the run (the first included, so an
    adaptive balancer's cold start counts), layers round-robin."""
    mbs = np.linspace(0, num_mb - 1, k).round().astype(int)
    return {(int(m), i % num_layers) for i, m in enumerate(mbs)}


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
        model = _model_for((r["spec"]["hidden"], r["spec"]["ffn"]), gpu, models)
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
        model = _model_for(shape, gpu, args.models)
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


def _model_for(shape: tuple[int, int], gpu: str, models: str | None) -> CostModel | None:
    """The cost model of this GPU and shape: from the `models` folder, else bundled, else None."""
    name = bundled_name(gpu, *shape)
    for cand in ([Path(models) / f"{name}.json"] if models else []) + [name]:
        try:
            m = load(cand)
            return CostModel(**{**m.__dict__, "meta": {**m.meta, "name": str(cand)}})
        except ValueError:
            continue
    print(f"note: no cost model {name} for {shape}; predictions are NaN")
    return None


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


# --------------------------------------------------------------------------------------------
def make_plans(args: argparse.Namespace) -> dict[str, Any]:
    cases = []
    for spec in target_suite():
        if args.only and not any(o in spec.name for o in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        cases.append(plan_case(spec, args))
        print(f"planned {spec.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    config = {
        k: getattr(args, k)
        for k in ("replicas", "tokens_per_gpu", "micro_batches", "layers", "samples", "seed", "balancers")
    }
    config["python"] = platform.python_version()
    return {"config": config, "cases": cases}


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
