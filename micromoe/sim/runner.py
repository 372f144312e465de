"""The simulation loop: replay every workload's micro-batches through every balancer.

Legend: M micro-batches, L layers, G GPUs, E experts.
Per micro-batch, layers run in order; each balancer decides, its quota is checked and measured,
then it observes the loads (so adaptive balancers only learn from the past). The decision is
timed here, the same way for every balancer: one wall-clock interval around `decide` (counts in,
quota [E, G] out), so `sched_us` compares across balancers. `observe` (microep-ar's periodic
replacement check) is not part of the per-micro-batch decision and is not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from micromoe.plan import lp_optimum_fraction
from micromoe.plan.cost import CostModel
from micromoe.sim.balancers import Balancer, GroupConfig, make_balancers
from micromoe.sim.metrics import Samples, mean_bound, traffic
from micromoe.sim.predicted import even_split_times, predict_quota
from micromoe.sim.progress import Progress, make_progress
from micromoe.sim.workload import Workload


@dataclass
class WorkloadResult:
    """One workload's samples per balancer (in request order, 'bound' included) and their facts."""

    name: str
    samples: dict[str, Samples]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def simulate(
    workloads: list[Workload],
    names: list[str],
    cfg: GroupConfig,
    *,
    warmup: int = 0,
    progress: bool | None = None,
    cost_model: CostModel | None = None,
) -> list[WorkloadResult]:
    """Run `names` (see balancers.BALANCERS) on every workload.

    The first `warmup` micro-batches of each workload are run (adaptive balancers learn from them)
    but not measured. progress: None = a progress bar on a terminal, else a one-line log message
    every few seconds (`progress.py`). With a `cost_model`, every balancer's plans are also scored
    in predicted expert time (Samples.time_*_us; 'bound' gets a perfectly even split over
    E * d / G slots per GPU).
    """
    total = sum(w.num_micro_batches for w in workloads)
    bar = make_progress(total, progress)
    try:
        return [_run_one(w, names, cfg, bar, warmup, cost_model) for w in workloads]
    finally:
        bar.close()


def _run_one(
    w: Workload, names: list[str], cfg: GroupConfig, bar: Progress, warmup: int, cost: CostModel | None = None
) -> WorkloadResult:
    if w.num_gpus != cfg.num_gpus:
        raise ValueError(f"{w.name}: workload has {w.num_gpus} source GPUs, the group {cfg.num_gpus}")
    if not 0 <= warmup < w.num_micro_batches:
        raise ValueError(
            f"{w.name}: --warmup {warmup} must be >= 0 and leave some of its {w.num_micro_batches} micro-batches"
        )
    balancers = make_balancers(names, cfg)
    for b in balancers:
        b.setup(w)
    samples = {b.name: Samples.empty(w.num_micro_batches, w.num_layers) for b in balancers}
    scorers = {b.name: _scorer(b, cost, cfg.num_gpus) for b in balancers}
    bar.set_postfix_str(w.name)
    totals = np.zeros((w.num_micro_batches, w.num_layers), dtype=np.int64)
    for m, counts_LGE in enumerate(w.micro_batches()):  # one micro-batch in memory at a time
        totals[m] = counts_LGE.sum(axis=(1, 2))
        for l in range(w.num_layers):
            counts = counts_LGE[l]
            loads = counts.sum(axis=0)
            for b in balancers:
                _step(b, samples[b.name], m, l, counts, loads, cfg.gpus_per_node, scorers[b.name])
        bar.update(1)
    if "bound" in names:
        bound = Samples.empty(w.num_micro_batches, w.num_layers)
        bound.total[:] = totals
        bound.max_load[:] = bound.own_opt[:] = mean_bound(totals, cfg.num_gpus)
        if cost is not None:
            even = even_split_times(cost, totals, cfg.num_gpus, w.num_experts * cfg.replicas // cfg.num_gpus)
            bound.time_max_us[:] = bound.time_mean_us[:] = even
        samples["bound"] = bound
    ordered = {n: samples[n].tail(warmup) for n in names}
    return WorkloadResult(w.name, ordered, {b.name: b.info() for b in balancers})


def _scorer(
    b: Balancer, cost: CostModel | None, num_gpus: int
) -> Callable[[int, np.ndarray], np.ndarray] | None:
    """(layer, quota [E, G]) -> predicted time [G] for this balancer's slots per GPU, or None."""
    if cost is None:
        return None
    slots_per_gpu = -(-int(b.info()["slots"]) // num_gpus)
    return lambda layer, quota_EG: predict_quota(cost, quota_EG, slots_per_gpu, b.local_slots(layer))


def _step(
    b: Balancer,
    s: Samples,
    m: int,
    l: int,
    counts: np.ndarray,
    loads: np.ndarray,
    gpn: int | None,
    scorer: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> None:
    t0 = time.perf_counter_ns()
    quota_EG = b.decide(l, counts)
    s.sched_ns[m, l] = time.perf_counter_ns() - t0
    assert np.array_equal(quota_EG.sum(axis=1), loads), f"{b.name} lost or duplicated tokens"
    assert quota_EG.min() >= 0, f"{b.name} produced a negative quota"
    s.max_load[m, l] = quota_EG.sum(axis=0).max()
    layout = b.placement(l)  # None: the decision already is its placement's optimum
    s.own_opt[m, l] = s.max_load[m, l] if layout is None else _ceil(lp_optimum_fraction(loads, layout))
    s.total[m, l] = loads.sum()
    s.remote[m, l], s.remote_node[m, l] = traffic(counts, quota_EG, gpn)
    if scorer is not None:
        t = scorer(l, quota_EG)
        s.time_max_us[m, l], s.time_mean_us[m, l] = t.max(), t.mean()
    b.observe(l, loads)


def _ceil(x: Fraction) -> int:
    return -(-x.numerator // x.denominator)


def pooled(results: list[WorkloadResult]) -> dict[str, Samples]:
    """Every workload's samples of each balancer stacked (see `Samples.concat`)."""
    names = list(results[0].samples)
    return {n: Samples.concat([r.samples[n] for r in results]) for n in names}
