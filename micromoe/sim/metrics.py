"""What a simulation measures per (micro-batch, layer), and the summary statistics of it.

Legend: M micro-batches, L layers, G GPUs, E experts.

- ratio = max GPU load / mean GPU load (mean = total selections / G); 1.0 is perfect balance.
- at bound: max GPU load == ceil(total / G), the smallest integer max load any balancer can reach.
- remote tokens: selections processed on a GPU other than their source, counted for the quota
  the balancer chose with locality-first routing (each source keeps what its local replicas
  take; the same for every balancer, and the fewest possible for that quota). With nodes, also
  the selections that leave their source's node (again the fewest possible for the quota).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from micromoe.plan.checks import FloatArray, IntArray


@dataclass
class Samples:
    """Per-sample records of one balancer on one workload; every array is [M, L].

    time_max_us / time_mean_us: the cost model's predicted slowest-GPU and mean GPU expert time
    (float64; zero when the run has no cost model). own_opt: ceil of the LP optimum of the
    balancer's own placement for the sample's loads, the least max load that placement allows
    (equal to max_load for plain EP and MicroEP; ceil(total / G) for 'bound').
    """

    max_load: IntArray
    total: IntArray
    remote: IntArray
    remote_node: IntArray
    sched_ns: IntArray
    time_max_us: FloatArray
    time_mean_us: FloatArray
    own_opt: IntArray

    @classmethod
    def empty(cls, num_micro_batches: int, num_layers: int) -> Samples:
        def z() -> IntArray:
            return np.zeros((num_micro_batches, num_layers), dtype=np.int64)

        def f() -> FloatArray:
            return np.zeros((num_micro_batches, num_layers), dtype=np.float64)

        return cls(z(), z(), z(), z(), z(), f(), f(), z())

    @classmethod
    def concat(cls, parts: list[Samples]) -> Samples:
        """Stack workloads along the micro-batch axis; flattened to [sum M*L, 1] if their L differ."""
        same_l = len({p.max_load.shape[1] for p in parts}) == 1

        def cat(f: str) -> IntArray:
            arrs = [getattr(p, f) for p in parts]
            return np.concatenate(arrs if same_l else [a.reshape(-1, 1) for a in arrs])

        return cls(*(cat(f) for f in cls.__dataclass_fields__))

    def tail(self, skip: int) -> Samples:
        """The samples without the first `skip` micro-batches."""
        return Samples(*(getattr(self, f)[skip:] for f in self.__dataclass_fields__))

    def ratios(self, num_gpus: int) -> np.ndarray:
        """float64 [M, L]: max / mean GPU load (NaN where a sample has no tokens: 0/0 is undefined)."""
        mean = self.total / num_gpus
        return np.where(self.total > 0, self.max_load / np.maximum(mean, 1e-300), np.nan)


def mean_bound(total: IntArray, num_gpus: int) -> IntArray:
    """ceil(total / G): the smallest integer max GPU load any balancer can reach (int64, same shape)."""
    return -(-total // num_gpus)


def traffic(counts: IntArray, quota: IntArray, gpus_per_node: int | None) -> tuple[int, int]:
    """(tokens leaving their GPU, tokens leaving their node) for counts [G, E] and quota [E, G].

    A source keeps min(own tokens, local quota) of an expert; everything else must travel. At node
    level the same with per-node sums (0 when gpus_per_node is None).
    """
    local = np.minimum(counts, quota.T).sum()
    total = counts.sum()
    if gpus_per_node is None:
        return int(total - local), 0
    num_nodes = counts.shape[0] // gpus_per_node
    node_counts = counts.reshape(num_nodes, gpus_per_node, -1).sum(axis=1)
    node_quota = quota.T.reshape(num_nodes, gpus_per_node, -1).sum(axis=1)
    return int(total - local), int(total - np.minimum(node_counts, node_quota).sum())


def summarize(s: Samples, num_gpus: int, gpus_per_node: int | None) -> dict[str, float | None]:
    """The report's numbers for one balancer: ratio statistics, share at the bound, timing, traffic.

    Samples without tokens have no balance: they are left out of the ratio statistics and the share
    at the bound (NaN when no sample has tokens) and counted in `empty_samples`.
    """
    has_tokens = s.total.ravel() > 0
    ratios = s.ratios(num_gpus).ravel()[has_tokens]
    own_opt_ratios = (s.own_opt.ravel() * num_gpus / np.maximum(s.total.ravel(), 1))[has_tokens]
    bound = mean_bound(s.total, num_gpus)
    total = int(s.total.sum())
    sched_us = s.sched_ns.ravel() / 1e3
    out: dict[str, float | None] = {
        "mean_ratio": _stat(ratios, np.mean),
        "p50_ratio": _stat(ratios, np.median),
        "p99_ratio": _stat(ratios, lambda r: np.percentile(r, 99)),
        "max_ratio": _stat(ratios, np.max),
        "at_bound": _stat((s.max_load == bound).ravel()[has_tokens], np.mean),
        "own_opt_mean_ratio": _stat(own_opt_ratios, np.mean),
        "at_own_opt": _stat((s.max_load == s.own_opt).ravel()[has_tokens], np.mean),
        "sched_us_median": float(np.median(sched_us)),
        "sched_us_p99": float(np.percentile(sched_us, 99)),
        "remote_share": float(s.remote.sum() / total) if total else 0.0,
        "node_remote_share": (float(s.remote_node.sum() / total) if total else 0.0)
        if gpus_per_node is not None
        else None,
        "samples": int(has_tokens.size),
        "empty_samples": int(has_tokens.size - ratios.size),
    }
    return out


def _stat(values: np.ndarray, f) -> float:
    """f(values) as a float, NaN for no values (undefined, not a perfect 1.0)."""
    return float(f(values)) if values.size else float("nan")
