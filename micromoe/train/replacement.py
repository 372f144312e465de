"""The training loop's adaptive-replacement (AR) hook.

The loop calls, on every rank and in the same order:
- `observe(layer_index, counts_ge)` for every MoE layer and micro-batch, with int64 [G, E] counts
  of the layer's MicroEP group (the dispatcher's all-gathered counts);
- `maybe_replace(step, model, optimizer) -> list[dict]` once after every optimizer step; the
  returned events are logged under the key `replacements` of that step's log line.
`build_replacement` is given the run's `ParallelState`, whose `groups` list (indexed by MoE layer)
is the one place that holds each layer's placement and process groups; a migration swaps an entry.

Every `interval` steps `AdaptiveReplacement` [collective, world] sums the loads observed since the
last check over all ranks, so every rank feeds the identical numbers to the planner's forecast
(`LoadTracker`, an exponential moving average of the per-micro-batch load of one MicroEP group)
and takes the identical decision (`decide_replacement`: the density-lemma score of the current
placement against `threshold`, a new asymmetric placement when it is worse). A chosen placement is
applied by `migrate_layer` (weights and AdamW moments move together; collective, world).
Legend: L MoE layers, E experts, G GPUs of a MicroEP group.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import LoadTracker, Replacement, decide_replacement
from micromoe.plan.timed import SlotCostModel
from micromoe.runtime import MoELayer
from micromoe.runtime.migrate import GroupCache, MigrationStats, migrate_layer, placement_hash
from micromoe.train.parallel import ParallelState

log = logging.getLogger("micromoe.train")


class Replacer(Protocol):
    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None: ...

    def process_groups(self) -> list[dist.ProcessGroup]: ...

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]: ...


class NoReplacement:
    """Keeps the initial placements."""

    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None:
        pass

    def process_groups(self) -> list[dist.ProcessGroup]:
        return []

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        return []


class AdaptiveReplacement:
    """Re-place MoE layers whose forecast balance score passes `threshold`, every `interval` steps.

    Args:
        parallel: the run's state; `parallel.groups[i]` is MoE layer i's placement and groups and
            is replaced after a migration (use it for that layer's gradient sync).
        interval: optimizer steps between checks (>= 1); checks after steps interval-1, 2*interval-1, ...
        threshold: score (forecast T* / mean GPU load, 1.0 = balanceable) above which a layer is
            re-placed; >= 1.0.
        decay: the forecast's moving-average weight of history, per check.
        min_gain: the new placement must lower the score by at least this much.
        seed: seeds the asymmetric placement sampler (with the step and layer).
        num_samples: layouts sampled per new placement.
        cost: a per-slot GEMM time model: score placements by predicted slowest-GPU time over the
            fair share instead of T*/mean (time-aware replacement; see `plan.timed`).
    """

    def __init__(
        self,
        parallel: ParallelState,
        *,
        interval: int,
        threshold: float,
        decay: float = 0.5,
        min_gain: float = 0.01,
        seed: int = 0,
        num_samples: int = 32,
        cost: SlotCostModel | None = None,
    ) -> None:
        if not parallel.distributed or not parallel.groups:
            raise ValueError("adaptive replacement needs a distributed run with MoE layers (--nproc >= 2)")
        if parallel.dispatcher != "microep":
            raise ValueError(
                f"adaptive replacement moves MicroEP replicas; --dispatcher is {parallel.dispatcher!r}: "
                "use --dispatcher microep or --replace-interval 0"
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"--replace-interval must be a positive integer here, got {interval!r}")
        if not threshold >= 1.0:
            raise ValueError(f"--replace-threshold must be >= 1.0 (1.0 = perfect balance), got {threshold}")
        self.parallel = parallel
        self.interval, self.threshold, self.min_gain = interval, threshold, min_gain
        self.seed, self.num_samples, self.cost = seed, num_samples, cost
        num_layers = len(parallel.groups)
        self.num_experts = parallel.groups[0].placement.num_experts
        self.tracker = LoadTracker(num_layers, self.num_experts, decay=decay)
        self._pending = np.zeros((num_layers, self.num_experts), dtype=np.int64)
        self._micro = np.zeros(num_layers, dtype=np.int64)
        self._cache: GroupCache = {}
        self.checks: list[dict[str, Any]] = []  # every decision taken (for reports and tests)

    # ----------------------------------------------------------------------------------------
    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None:
        """Add one micro-batch's counts [G, E] of MoE layer `layer_index` (no communication)."""
        counts = np.asarray(counts_ge)
        if counts.ndim != 2 or counts.shape[1] != self.num_experts:
            raise ValueError(f"counts_ge must be [G, E={self.num_experts}], got shape {counts.shape}")
        self._pending[layer_index] += counts.sum(axis=0)
        self._micro[layer_index] += 1

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        """After optimizer step `step` (0-based): every `interval` steps, update the forecast from
        the loads gathered over all ranks and migrate the layers that need it. Collective (world)
        on those steps, a no-op otherwise. Returns one event per migration."""
        if (step + 1) % self.interval:
            return []
        loads_le = self._gather_loads()
        layers = model.moe_layers()
        if len(layers) != len(self.parallel.groups):
            raise ValueError(
                f"the model has {len(layers)} MoE layers, the run's groups {len(self.parallel.groups)}"
            )
        decisions: list[Replacement | None] = []
        for i, layer in enumerate(layers):
            decisions.append(self._decide(step, i, layer, loads_le[i]))
        self._check_agreement(decisions)  # collective inside
        events = []
        for i, (layer, decision) in enumerate(zip(layers, decisions, strict=True)):
            if decision is None or not decision.replace:
                continue
            new_groups, stats = migrate_layer(  # collectives inside (world, MicroEP, replica groups)
                layer,
                self.parallel.groups[i],
                decision.placement,
                optimizer=optimizer,
                group_cache=self._cache,
            )
            self.parallel.groups[i] = new_groups
            events.append(_event(step, i, decision, stats))
            if self.parallel.rank == 0:
                log.info("step %d: MoE layer %d re-placed: %s", step, i, events[-1]["reason"])
        return events

    def _decide(
        self, step: int, i: int, layer: MoELayer, loads: npt.NDArray[np.float64]
    ) -> Replacement | None:
        """Layer i's decision on this check (None: it saw no micro-batch). The score is in predicted
        time when this hook or the layer's dispatcher has a cost model, else T*/mean."""
        if not np.isfinite(loads).all():
            return None
        self.tracker.observe(i, loads)
        cost = self.cost if self.cost is not None else getattr(layer.dispatcher, "cost_model", None)
        decision = decide_replacement(
            self.tracker.forecast(i),
            self.parallel.groups[i].placement,
            threshold=self.threshold,
            min_gain=self.min_gain,
            seed=self.seed + 7919 * step + i,
            num_samples=self.num_samples,
            cost=cost,
        )
        self.checks.append(
            {"step": step, "layer": i, "score": decision.current_score, "replace": decision.replace}
        )
        return decision

    def _check_agreement(self, decisions: list[Replacement | None]) -> None:
        """Raise ValueError on every rank unless all ranks chose the same placements (a difference,
        e.g. from per-rank cost models, would otherwise hang the migration's collectives)."""
        mine = [placement_hash(d.placement) if d is not None and d.replace else 0 for d in decisions]
        world = self.parallel.world
        local = torch.tensor(mine, dtype=torch.int64, device=self.parallel.device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        # collective (world): every rank's chosen placements, as hashes
        dist.all_gather(gathered, local)
        table = torch.stack(gathered).cpu().numpy()  # host sync
        differ = np.flatnonzero((table != table[0]).any(axis=0))
        if differ.size:
            raise ValueError(
                f"adaptive replacement: ranks chose different placements for MoE layers {differ.tolist()} "
                "(their forecasts or cost models differ); nothing moved. Give every rank the same cost model."
            )

    def _gather_loads(self) -> npt.NDArray[np.float64]:
        """float64 [L, E]: mean per-micro-batch load of one MicroEP group since the last check,
        identical on every rank; NaN rows for layers that saw no micro-batch."""
        dev = self.parallel.device
        mine = torch.from_numpy(np.concatenate([self._pending, self._micro[:, None]], axis=1)).to(dev)
        # collective (world): every rank's loads since the last check (exact int64 sums)
        dist.all_reduce(mine)
        total = mine.cpu().numpy()  # host sync
        self._pending[:] = 0
        self._micro[:] = 0
        # each rank reported its MicroEP group's counts, so the sum holds every group G times:
        # dividing by all ranks' micro-batches gives the mean group load per micro-batch
        with np.errstate(invalid="ignore", divide="ignore"):
            return total[:, :-1] / total[:, -1:].astype(np.float64)

    def process_groups(self) -> list[dist.ProcessGroup]:
        """The replica groups migrations created or reused so far (for a caller that destroys its
        groups before building new ones, like a benchmark running many configurations)."""
        return [g for g in self._cache.values() if g is not None]

    # ----------------------------------------------------------------------------------------
    # checkpoints (the trainer saves the placements themselves)
    def state_dict(self) -> dict[str, Any]:
        forecasts = [
            self.tracker.forecast(i).tolist() if self.tracker.observations(i) else None
            for i in range(len(self.parallel.groups))
        ]
        return {"forecast": forecasts, "pending": self._pending.tolist(), "micro": self._micro.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, f in enumerate(state["forecast"]):
            if f is not None:
                self.tracker.observe(i, f)  # the first observation sets the average exactly
        self._pending[:] = np.asarray(state["pending"], dtype=np.int64)
        self._micro[:] = np.asarray(state["micro"], dtype=np.int64)


def _event(step: int, layer: int, decision: Replacement, stats: MigrationStats) -> dict[str, Any]:
    return {
        "step": step,
        "layer": layer,
        "reason": f"interval check on the load forecast (moving average): {decision.reason}",
        "old_score": decision.current_score,
        "new_score": decision.new_score,
        "bytes": stats.bytes_moved,
        "ms": stats.ms,
        "transfers": stats.num_transfers,
    }


def build_replacement(
    interval: int,
    threshold: float,
    parallel: ParallelState,
    *,
    seed: int = 0,
    cost: SlotCostModel | None = None,
) -> Replacer:
    """The hook for a run: `interval` steps between checks (0 = off), `threshold` the score above
    which a layer is re-placed, `parallel` the run's ParallelState, `cost` an optional GEMM time
    model for time-aware scores."""
    if interval == 0:
        return NoReplacement()
    return AdaptiveReplacement(parallel, interval=interval, threshold=threshold, seed=seed, cost=cost)
