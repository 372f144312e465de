"""Per-step training metrics: balance of the executed plans against plain EP, throughput, MFU.

Balance is max/mean GPU load (rows computed per GPU) inside one MicroEP group of G = d*EP GPUs.
The plain-EP counterfactual takes the same counts[src, e] and lets each of the d EP groups of EP
GPUs compute its own sources' tokens, every expert on its single plain-EP host (the planner with
a one-replica placement, so the rule is the planner's, not a copy). Each rank measures its own
MicroEP group; the log (rank 0) shows the first group's, which is every group's when there is one.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from micromoe.plan import IntArray, Placement, schedule
from micromoe.runtime import MoEStats


def max_mean(loads: npt.ArrayLike) -> float:
    """max / mean of per-GPU loads (1.0 = perfectly even; 1.0 also when nothing ran)."""
    arr = np.asarray(loads, dtype=np.float64)
    mean = arr.mean() if arr.size else 0.0
    return float(arr.max() / mean) if mean > 0 else 1.0


@functools.lru_cache(maxsize=64)
def _plain_ep(ep: int, num_experts: int) -> Placement:
    return Placement.expert_parallel(ep, num_experts, 1)


def plain_ep_loads(counts_ge: IntArray, ep: int) -> IntArray:
    """int64 [G]: per-GPU rows under plain EP for counts [G, E] (G a multiple of `ep`)."""
    g, e = counts_ge.shape
    if g % ep:
        raise ValueError(f"{g} source GPUs do not split into plain EP groups of {ep}")
    placement = _plain_ep(ep, e)
    parts = [schedule(counts_ge[k * ep : (k + 1) * ep], placement).gpu_load for k in range(g // ep)]
    return np.concatenate(parts).astype(np.int64)


def executed_loads(stats: MoEStats, ep: int) -> IntArray:
    """int64 [G]: per-GPU rows the layer actually computed in its last forward pass."""
    if stats.plan is not None:
        return np.asarray(stats.plan.gpu_load, dtype=np.int64)
    return plain_ep_loads(stats.counts_ge, min(ep, stats.counts_ge.shape[0]))


@dataclass
class StepMeter:
    """Collects one optimizer step's per-layer balance and scheduler time over its micro-batches."""

    num_layers: int
    ep: int
    executed: list[list[float]] = field(default_factory=list)
    counterfactual: list[list[float]] = field(default_factory=list)
    route_s: float = 0.0
    route_calls: int = 0

    def __post_init__(self) -> None:
        self.executed = [[] for _ in range(self.num_layers)]
        self.counterfactual = [[] for _ in range(self.num_layers)]

    def add(self, layer: int, stats: MoEStats) -> None:
        ep = min(self.ep, stats.counts_ge.shape[0])
        self.executed[layer].append(max_mean(executed_loads(stats, ep)))
        self.counterfactual[layer].append(max_mean(plain_ep_loads(stats.counts_ge, ep)))
        self.route_s += stats.route_s
        self.route_calls += 1

    def record(self, *, scheduled: bool = True) -> dict[str, float | list[float] | None]:
        """The log fields: means over micro-batches per layer, then over layers. Without a
        planner (`scheduled` False: plain EP, one process) the scheduler times are None."""
        ex = [float(np.mean(v)) if v else 1.0 for v in self.executed]
        cf = [float(np.mean(v)) if v else 1.0 for v in self.counterfactual]
        return {
            "max_mean_load": float(np.mean(ex)) if ex else 1.0,
            "ep_max_mean_load": float(np.mean(cf)) if cf else 1.0,
            "layer_max_mean_load": ex,
            "layer_ep_max_mean_load": cf,
            "sched_us": 1e6 * self.route_s / max(1, self.route_calls) if scheduled else None,
            "sched_us_step": 1e6 * self.route_s if scheduled else None,
        }


def measure_bf16_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul throughput of `device` in FLOP/s (random data, n^3 GEMMs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, world: int) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the world's peak (None without a peak)."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * world)
