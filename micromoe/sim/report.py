"""Text tables and the JSON document of a simulation's results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from micromoe.sim.metrics import summarize
from micromoe.sim.predicted import time_summary
from micromoe.sim.runner import WorkloadResult, pooled


def build_report(results: list[WorkloadResult], config: dict[str, Any]) -> dict[str, Any]:
    """{"config", "results": {balancer: summary} over all workloads pooled, "workloads": [...]}.

    The 'bound' row has no scheduler and no traffic: those fields are None there.
    """
    g, gpn = config["gpus"], config["gpus_per_node"]

    def summaries(samples: dict) -> dict[str, dict[str, Any]]:
        out = {n: summarize(s, g, gpn) for n, s in samples.items()}
        if config.get("cost_model"):  # predicted expert time under one model for every balancer
            for n, s in samples.items():
                out[n].update(time_summary(s.time_max_us, s.time_mean_us))
        if "bound" in out:
            for key in ("sched_us_median", "sched_us_p99", "remote_share", "node_remote_share"):
                out["bound"][key] = None
        return out

    return {
        "config": config,
        "results": summaries(pooled(results)),
        "workloads": [{"name": r.name, "results": summaries(r.samples), "info": r.info} for r in results],
    }


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Strict JSON: an undefined statistic (NaN, e.g. max/mean of samples without tokens) is null."""
    Path(path).write_text(json.dumps(_nan_to_none(report), indent=2, allow_nan=False) + "\n")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


LEGEND = (
    "bound = ceil(total / G), the least max load of any placement. own opt = ceil of the LP optimum of "
    "the balancer's own placement (the least max load it allows; mean over samples, / mean GPU load); "
    "at own opt = share of samples that reach it. ep and microep are always at their own optimum."
)


def format_table(results: dict[str, dict[str, Any]], *, nodes: bool) -> str:
    """One row per balancer: max/mean statistics, share at the bound, scheduling time, traffic."""
    head = ["balancer", "mean", "p50", "p99", "worst", "at bound", "own opt", "at own opt"]
    head += ["sched us p50", "sched us p99", "remote"]
    if nodes:
        head.append("off-node")
    timed_cols = all("time_ms_mean" in r for r in results.values())
    if timed_cols:
        head += ["time ms", "time max/mean"]
    rows = [head]
    for name, r in results.items():
        timed = name != "bound"
        row = [
            name,
            f"{r['mean_ratio']:.4f}",
            f"{r['p50_ratio']:.4f}",
            f"{r['p99_ratio']:.4f}",
            f"{r['max_ratio']:.4f}",
            f"{100 * r['at_bound']:.1f}%",
            f"{r['own_opt_mean_ratio']:.4f}",
            f"{100 * r['at_own_opt']:.1f}%",
            f"{r['sched_us_median']:.1f}" if timed else "-",
            f"{r['sched_us_p99']:.1f}" if timed else "-",
            f"{100 * r['remote_share']:.1f}%" if timed else "-",
        ]
        if nodes:
            row.append(f"{100 * r['node_remote_share']:.1f}%" if timed else "-")
        if timed_cols:
            row += [f"{r['time_ms_mean']:.3f}", f"{r['time_max_mean']:.4f}"]
        rows.append(row)
    return _align(rows)


def format_matrix(report: dict[str, Any], key: str = "mean_ratio") -> str:
    """Workloads x balancers table of one statistic (the figure's data)."""
    names = list(report["results"])
    rows = [["workload", *names]]
    for w in report["workloads"]:
        rows.append([w["name"], *(f"{w['results'][n][key]:.4f}" for n in names)])
    return _align(rows)


def format_report(report: dict[str, Any]) -> str:
    """The stdout text: resolved config, one table per workload, and a summary across workloads."""
    cfg = report["config"]
    nodes = cfg["gpus_per_node"] is not None
    lines = ["config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "workloads")]
    unit = "per (micro-batch, layer); max/mean GPU load"
    for w in report["workloads"]:
        lines += ["", f"== {w['name']} ({unit})", format_table(w["results"], nodes=nodes)]
    if len(report["workloads"]) > 1:
        lines += ["", f"== all workloads pooled ({unit})", format_table(report["results"], nodes=nodes)]
        lines += ["", "== mean max/mean by workload", format_matrix(report)]
        lines += ["", "== share of samples at the bound by workload", format_matrix(report, "at_bound")]
    return "\n".join([*lines, "", LEGEND])


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join(cells))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
