"""Analyses of the time-aware planner behind docs/RESULTS.md's issue-7 section (CPU, cost models only).

    PYTHONPATH=. python3 benchmarks/time_planner_analysis.py [--only bound,effort,split,sampling] \
        [--json benchmarks/results/time_planner_analysis_devvm.json]

- bound: on MicroEP-AR-t's own layouts at Zipf-128 (h200-2048x768, 8 GPUs, 2 replicas, 4096 tokens
  per GPU, top-8, 32 micro-batches x 4 layers), its plan and the planner's valid lower bound, both
  over the ideal even split (`timed_layouts.ideal_time_us`).
- effort: on the same layouts (4 micro-batches), the planner's predicted slowest GPU / ideal and its
  latency with more search steps, and with rounds of search and split smoothing alternated; plus a
  full `schedule(cost=)` against three such rounds at 32x8x2 and 256x64x4 (h200-4096x1536,
  Dirichlet(1) loads), timed in this process on one pinned core.
- split: a what-if on `emulated_plans_next.json` at Zipf-128: each GPU's largest slot of
  MicroEP-AR-t cut into 2, 3 or 4 equal groups (median over the samples of the slowest GPU / ideal).
- sampling: the model's MicroEP-AR-t / EPLB over the emulation's timed samples (median of each
  sample's slowest GPU) against `micromoe simulate --cost-model` over all samples (mean).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _env  # benchmarks/ (this script's folder) is on sys.path
import numpy as np
from bench_emulated import ideal_rows, padded, predictions
from emulated_cases import model_for

from micromoe.cli import main as cli_main
from micromoe.plan import Placement, schedule
from micromoe.plan import timed as T
from micromoe.plan.cost import load
from micromoe.plan.kernel import gpu_tokens, own_gpu_tokens
from micromoe.plan.timed_kernel import local_search
from micromoe.plan.timed_layouts import ideal_time_us
from micromoe.plan.timed_smooth import smooth_splits
from micromoe.sim.balancers import GroupConfig, make_balancers
from micromoe.sim.eplb import eplb_slots
from micromoe.sim.workload import workload_from_zipf

RESULTS = Path(__file__).resolve().parent / "results"
PLANS = RESULTS / "emulated_plans_next.json"


def ar_layout_cases(s: float, micro_batches: int, cost) -> list[tuple[Any, Placement, np.ndarray]]:
    """(token plan, MicroEP-AR-t's placement, counts) of every (micro-batch, layer) at Zipf-128 s."""
    w = workload_from_zipf(
        s,
        num_experts=128,
        num_layers=4,
        num_micro_batches=micro_batches,
        num_gpus=8,
        tokens_per_gpu=4096,
        top_k=8,
        noise=0.1,
        drift=0.1,
        seed=0,
    )
    (ar,) = make_balancers(["microep-ar"], GroupConfig(8, 2, cost_model=cost))
    ar.setup(w)
    out = []
    for m in range(w.num_micro_batches):
        for l in range(w.num_layers):
            counts = w.counts[m, l]
            out.append((schedule(counts, ar.placements[l]), ar.placements[l], counts))
            ar.decide(l, counts)
            ar.observe(l, counts.sum(axis=0))
    return out


def _ideal(counts: np.ndarray, p: Placement, cost) -> float:
    return ideal_time_us(counts.sum(axis=0), p.num_gpus, p.slots_per_gpu, cost)


def bound(cost) -> dict:
    out = {}
    for s in (1.0, 1.5):
        plans, bounds = [], []
        for _plan, p, counts in ar_layout_cases(s, 32, cost):
            t = schedule(counts, p, cost=cost)
            plans.append(t.predicted_us.max() / _ideal(counts, p, cost))
            bounds.append(t.time_lower_bound_us / _ideal(counts, p, cost))
        out[f"s={s}"] = {
            "plan_median": float(np.median(plans)),
            "bound_median": float(np.median(bounds)),
            "bound_min": float(np.min(bounds)),
            "bound_max": float(np.max(bounds)),
        }
    return out


def rounds(
    plan, p: Placement, counts: np.ndarray, cost, num_rounds: int, steps: int | None = None
) -> np.ndarray:
    """The planner's search and smoothing (timed_kernel / timed_smooth), alternated `num_rounds`
    times from the token plan (one round = the default pass without its second start)."""
    tables = T.cost_tables(cost, int(counts.sum(axis=0).max()))
    x = np.array(plan.replica_quota, dtype=np.int64)
    g = p.num_gpus
    off, base = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
    load_ = counts.sum(axis=0)
    cap = max(-(-(int(load_.sum()) * 1010) // (g * 1000)), int(gpu_tokens(x, base, p.host_gpu).max()))
    local = own_gpu_tokens(counts, p.graph)
    for _ in range(num_rounds):
        local_search(x, local, off, tables.f_int, tables.m_int, base, cap, p.graph, steps or 32 + g // 2)
        smooth_splits(x, load_, off, tables.f_int, tables.m_int, base, cap, p.graph, 1)
    return x


def _timed(fn, *args, **kw) -> tuple[Any, float]:
    """fn(*args, **kw) and its wall time in seconds, after one untimed call (compile and warm)."""
    fn(*args, **kw)
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def effort(cost) -> dict:
    out: dict[str, Any] = {}
    for s in (0.5, 1.0, 1.5):
        cases = ar_layout_cases(s, 4, cost)
        row = {}
        for label, steps in (
            ("default", None),
            ("steps 300", 300),
            ("steps 1000", 1000),
            ("steps 10000", 10000),
        ):
            ratios, secs = [], []
            for plan, p, counts in cases:
                kw = {} if steps is None else {"max_steps": steps}
                tq, sec = _timed(
                    T.time_replica_quota,
                    plan.counts,
                    plan.replica_quota,
                    p,
                    cost,
                    certificate=plan.certificate,
                    **kw,
                )
                ratios.append(tq.max_us / _ideal(counts, p, cost))
                secs.append(sec)
            row[label] = {"ratio": float(np.median(ratios)), "us": float(np.median(secs) * 1e6)}
        ratios, secs = [], []
        for plan, p, counts in cases:
            x, sec = _timed(rounds, plan, p, counts, cost, 3)
            ratios.append(cost.predict(T.rows_per_slot(x, p)).max() / _ideal(counts, p, cost))
            secs.append(sec)
        row["3 rounds"] = {"ratio": float(np.median(ratios)), "us": float(np.median(secs) * 1e6)}
        out[f"s={s}"] = row
    big = load("h200-4096x1536")
    for e, g, r in ((32, 8, 2), (256, 64, 4)):
        p = Placement.symmetric(g, e, r)
        rng = np.random.default_rng(0)
        cases = []
        for _ in range(100):
            c = rng.multinomial(4096 * 2, rng.dirichlet(np.ones(e)), size=g).astype(np.int64)
            cases.append((schedule(c, p), c))
        full = [_timed(schedule, c, p, cost=big)[1] for _, c in cases]
        one = [_timed(rounds, plan, p, c, big, 1)[1] for plan, c in cases]
        three = [_timed(rounds, plan, p, c, big, 3)[1] for plan, c in cases]
        out[f"{e}x{g}x{r}"] = {
            k: float(np.median(v) * 1e6)
            for k, v in (("schedule_us", full), ("one_round_us", one), ("three_rounds_us", three))
        }
    return out


def split(plans: dict) -> dict:
    out = {}
    for case in plans["cases"]:
        if not case["spec"]["name"].startswith("zipf128") or "noisy" in case["spec"]["name"]:
            continue
        cost = model_for((case["spec"]["hidden"], case["spec"]["ffn"]), "NVIDIA H200", None)
        g, s = case["spec"]["gpus"], case["slots_per_gpu"]
        per_k: dict[str, list[float]] = {"as planned": [], "eplb": [], "2": [], "3": [], "4": []}
        for k, total in enumerate(case["totals"]):
            ideal = cost.predict(np.tile(ideal_rows(total, g, s), (g, 1))).max()
            rows = padded(np.asarray(case["rows"]["microep-ar-t"][k]))
            per_k["as planned"].append(cost.predict(rows).max() / ideal)
            per_k["eplb"].append(cost.predict(padded(np.asarray(case["rows"]["eplb"][k]))).max() / ideal)
            for parts in (2, 3, 4):
                cut = [np.concatenate([np.delete(r, r.argmax()), [r.max() // parts] * parts]) for r in rows]
                table = np.zeros((g, max(len(c) for c in cut)), dtype=np.int64)
                for i, c in enumerate(cut):
                    table[i, : len(c)] = padded(c)
                per_k[str(parts)].append(cost.predict(table).max() / ideal)
        out[case["spec"]["name"]] = {k: float(np.median(v)) for k, v in per_k.items()}
    for s in (1.0, 1.5):  # how EPLB replicates the hottest expert at Zipf-128 (one layer's history)
        w = workload_from_zipf(
            s, num_experts=128, num_layers=1, num_micro_batches=1, num_gpus=8,
            tokens_per_gpu=4096, top_k=8, noise=0.1, drift=0.1, seed=0,
        )  # fmt: skip
        slots, hot = eplb_slots(w.history[0], 8, 32), int(np.argmax(w.history[0]))
        out[f"eplb hottest expert s={s}"] = {
            "share": float(w.history[0].max() / w.history[0].sum()),
            "slots": int((slots == hot).sum()),
            "min_per_gpu": int((slots == hot).sum(axis=1).min()),
        }
    return out


SIMULATE = {  # workload name in the plans -> (simulate arguments, the workload's name in its JSON)
    "qwen57b counts57b": (["--trace", "counts57b.json", "--cost-model", "h200-3584x2560"], "counts57b.json"),
    "zipf128 s=0.5": (
        ["--zipf", "0.5", "--experts", "128", "--top-k", "8", "--cost-model", "h200-2048x768"],
        None,
    ),
    "zipf128 s=1.0": (
        ["--zipf", "1.0", "--experts", "128", "--top-k", "8", "--cost-model", "h200-2048x768"],
        None,
    ),
    "zipf128 s=1.5": (
        ["--zipf", "1.5", "--experts", "128", "--top-k", "8", "--cost-model", "h200-2048x768"],
        None,
    ),
    "zipf16 s=0.5": (
        ["--zipf", "0.5", "--experts", "16", "--top-k", "2", "--gpus", "4", "--cost-model", "h200-2048x4096"],
        None,
    ),
    "zipf16 s=1.0": (
        ["--zipf", "1.0", "--experts", "16", "--top-k", "2", "--gpus", "4", "--cost-model", "h200-2048x4096"],
        None,
    ),
    "zipf16 s=1.5": (
        ["--zipf", "1.5", "--experts", "16", "--top-k", "2", "--gpus", "4", "--cost-model", "h200-2048x4096"],
        None,
    ),
}
NOISY = ["--noise", "0.5", "--drift", "0.5"]


def sampling(plans: dict) -> dict:
    """Per workload of the plans: the model's slowest GPU of MicroEP-AR-t and EPLB over the ideal
    (median over the timed samples) and, where `micromoe simulate` covers it, MicroEP-AR / EPLB
    over all samples against the same ratio over the timed ones."""
    specs = dict(SIMULATE)
    for name in ("qwen57b counts57b", "zipf128 s=1.0", "zipf16 s=1.0"):
        specs[f"{name} noisy"] = (SIMULATE[name][0] + NOISY, None)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in plans["cases"]:
            name = case["spec"]["name"]
            cost = model_for((case["spec"]["hidden"], case["spec"]["ffn"]), "NVIDIA H200", None)
            pred = predictions(case, cost)
            slowest = {
                v: float(np.median(np.max(pred[v], axis=1))) for v in ("microep-ar-t", "eplb", "ideal")
            }
            row = {
                "samples_timed": len(case["totals"]),
                "ar_t_over_ideal": slowest["microep-ar-t"] / slowest["ideal"],
                "eplb_over_ideal": slowest["eplb"] / slowest["ideal"],
            }
            if name in specs:
                path = Path(tmp) / "sim.json"
                argv = ["simulate", *specs[name][0], "--balancers", "eplb,microep-ar", "--no-progress"]
                cli_main([*argv, "--json", str(path)])
                r = json.loads(path.read_text())["workloads"][0]["results"]
                row["model_on_timed_samples"] = slowest["microep-ar-t"] / slowest["eplb"]
                row["simulate_all_samples"] = r["microep-ar"]["time_ms_mean"] / r["eplb"]["time_ms_mean"]
            out[name] = row
    return out


def _flat(row: dict, prefix: str = ""):
    for k, v in row.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k} ")
        else:
            yield f"{prefix}{k}", v


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and v < 100 else f"{v:.0f}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="bound,effort,split,sampling")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):  # one thread: keep it on one core, as bench_timed_planner does
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    cost = load("h200-2048x768")
    plans = json.loads(PLANS.read_text())
    parts = {
        "bound": lambda: bound(cost),
        "effort": lambda: effort(cost),
        "split": lambda: split(plans),
        "sampling": lambda: sampling(plans),
    }
    report: dict[str, Any] = {
        "env": {
            "cpu": _env.cpu_name(),
            **_env.versions("python", "numpy", "numba"),
            "commit": _env.git_commit(),
        }
    }
    for name in args.only.split(","):
        report[name] = parts[name]()
        print(f"== {name}")
        for key, row in report[name].items():
            cells = (f"{k} {_fmt(v)}" for k, v in _flat(row))
            print(f"{key:<24} " + "  ".join(cells))
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}  # keep parts not run now
        args.json.write_text(json.dumps({**old, **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
