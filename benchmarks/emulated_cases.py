"""The workload cases of `bench_emulated.py` and its planning phase (CPU, no torch).

Every balancer of `micromoe.sim` (and the time-aware variants below, which need a cost model)
plans each micro-batch of each case; the rows per local slot of K evenly spread (micro-batch,
layer) samples are kept for the timing phase in `bench_emulated.py`, which runs this through its
`plan` and `all` phases (benchmarks/ is on sys.path when it runs as a script).

Legend: G simulated GPUs, S local slots per GPU, E experts, K timed samples of a case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from micromoe.plan import Placement, schedule
from micromoe.plan.cost import CostModel, bundled_name, load
from micromoe.plan.forecast import ReplacementPolicy
from micromoe.plan.timed_layouts import EVEN_MARGIN
from micromoe.sim.balancers import BALANCERS, Balancer, GroupConfig, MicroEP, make_balancers
from micromoe.sim.predicted import local_slot_rows
from micromoe.sim.traces import load_trace
from micromoe.sim.workload import Workload, workload_from_aggregate, workload_from_zipf

TRACES = Path(__file__).resolve().parents[1] / "micromoe" / "data" / "traces"
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
    cost = model_for((spec.hidden, spec.ffn), args.gpu_name, args.models)
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
                    rows[b.name].append(local_slot_rows(quota, s, b.local_slots(l)).tolist())
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


def model_for(shape: tuple[int, int], gpu: str, models: str | None) -> CostModel | None:
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
