"""The training loop's adaptive-replacement (AR) hook.

The loop calls, on every rank and in the same order:
- `observe(layer_index, counts_ge)` for every MoE layer and micro-batch, with int64 [G, E] counts
  of the layer's MicroEP group (the dispatcher's all-gathered counts);
- `maybe_replace(step, model, optimizer) -> list[dict]` once after every optimizer step; the
  returned events are logged under the key `replacements` of that step's log line.
`build_replacement` is given the run's `ParallelState`, whose `groups` list (indexed by MoE layer)
is the one place that holds each layer's placement and process groups; a migration swaps an entry.

`AdaptiveReplacement` drives the planner's `ReplacementPolicy` (plan/forecast.py) after every
optimizer step [collective, world]: it all-gathers every rank's per-micro-batch group loads of the
step, so every rank feeds the policy identical numbers, micro-batch by micro-batch, and takes the
identical decisions. The policy's rules: a cold start (a load-aware placement from the first
`warmup` micro-batches, since a fresh run has no load history; a resumed run restores its
history instead), the realized-imbalance trigger (the realized score above `threshold` for
`trigger_after` consecutive micro-batches), the interval check on the moving-average forecast,
and hysteresis (`cooldown` micro-batches after a replacement, `min_gain`). The realized score of a
micro-batch is the worst MicroEP group's score of the executed placement under its own loads.
A placement the policy chose is applied by `migrate_layer` at the step boundary (a new gather
table and dispatcher: the experts' masters and AdamW state stay with their owners; collective,
world), after one all-gather checks that every rank chose it.
Legend: W ranks, L MoE layers, M micro-batches per step, E experts, G GPUs of a MicroEP group.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from micromoe.plan import Placement, ReplacementPolicy, placement_score
from micromoe.plan.cost import CostModel
from micromoe.plan.forecast import REPLACE_WINDOW, ReplacementEvent
from micromoe.plan.timed import SlotCostModel
from micromoe.runtime.migrate import MigrationStats, migrate_layer, placement_hash
from micromoe.train.parallel import ParallelState

log = logging.getLogger("micromoe.train")


class Replacer(Protocol):
    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None: ...

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]: ...


class NoReplacement:
    """Keeps the initial placements."""

    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None:
        pass

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        return []


class AdaptiveReplacement:
    """Re-place MoE layers by `ReplacementPolicy`'s rules on the loads all ranks observed.

    Args:
        parallel: the run's state; `parallel.groups[i]` is MoE layer i's placement and groups and
            is replaced after a migration (use it for that layer's gradient sync).
        interval: optimizer steps between interval checks of the forecast (>= 1); checks after
            steps interval-1, 2*interval-1, ...
        threshold: score (T* / mean GPU load, 1.0 = balanceable; predicted time over the fair
            share with `cost`) above which a check re-places a layer and a micro-batch counts
            as imbalanced; >= 1.0.
        micro_batches: micro-batches per rank and optimizer step (the run's grad_accum); the
            policy's clock counts the world's micro-batch m of every step once.
        trigger_after: consecutive imbalanced micro-batches that trigger a check (>= 1).
        cooldown: micro-batches after a replacement during which none happens (>= 0).
        warmup: micro-batches observed before the cold-start placement (>= 1).
        window: a check scores placements by their mean over this many recent micro-batches.
        min_gain: a new placement must lower the score by at least this much.
        decay: the forecast's moving-average weight of history, per micro-batch.
        seed: seeds the asymmetric placement sampler (with the micro-batch and layer).
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
        micro_batches: int = 1,
        trigger_after: int = 3,
        cooldown: int = 4,
        warmup: int = 2,
        window: int = REPLACE_WINDOW,
        min_gain: float = 0.01,
        decay: float = 0.9,
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
        _check_options(interval, threshold, micro_batches, trigger_after, cooldown, warmup, window, min_gain)
        self.parallel, self.micro_batches = parallel, micro_batches
        self.num_experts = parallel.groups[0].placement.num_experts
        self.policy = ReplacementPolicy(
            len(parallel.groups),
            self.num_experts,
            cost=cost,
            interval=interval * micro_batches,
            threshold=threshold,
            min_gain=min_gain,
            trigger_after=trigger_after,
            cooldown=cooldown,
            warmup=warmup,
            window=window,
            decay=decay,
            seed=seed,
            num_samples=num_samples,
        )
        for i, groups in enumerate(parallel.groups):
            self.policy.start(i, groups.placement)  # no load history: cold start after `warmup`
        self._pending: list[list[npt.NDArray[np.int64]]] = [[] for _ in parallel.groups]
        # every micro-batch's decision, newest last (for reports and tests; bounded)
        self.checks: deque[dict[str, Any]] = deque(maxlen=4096)

    # ----------------------------------------------------------------------------------------
    def observe(self, layer_index: int, counts_ge: npt.NDArray[np.int64]) -> None:
        """Add one micro-batch's counts [G, E] of MoE layer `layer_index` (no communication)."""
        counts = np.asarray(counts_ge)
        if counts.ndim != 2 or counts.shape[1] != self.num_experts:
            raise ValueError(f"counts_ge must be [G, E={self.num_experts}], got shape {counts.shape}")
        self._pending[layer_index].append(counts.sum(axis=0).astype(np.int64))

    def maybe_replace(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        """After optimizer step `step` (0-based): feed the policy the step's micro-batches as
        gathered from all ranks, then migrate the layers whose placement it changed.
        Collective (world) on every step. Returns one event per migrated layer."""
        layers = model.moe_layers()
        if len(layers) != len(self.parallel.groups):
            raise ValueError(
                f"the model has {len(layers)} MoE layers, the run's groups {len(self.parallel.groups)}"
            )
        loads_wlme = self._gather_loads()  # collective inside
        first = len(self.policy.events)
        for i in range(loads_wlme.shape[1]):
            for m in range(loads_wlme.shape[2]):
                self._observe_micro_batch(step, i, m, loads_wlme[:, i, m])
        targets = [
            p if p != groups.placement else None
            for p, groups in zip(self._placements(), self.parallel.groups, strict=True)
        ]
        self._check_agreement(targets)  # collective inside
        new_events = self.policy.events[first:]
        events = []
        for i, (layer, target) in enumerate(zip(layers, targets, strict=True)):
            if target is None:
                if self.parallel.rank == 0 and any(e.layer == i for e in new_events):
                    log.info(
                        "step %d: MoE layer %d re-placed and back within the step; nothing moved", step, i
                    )
                continue
            new_groups, stats = migrate_layer(  # collective inside (world)
                layer, self.parallel.groups[i], target, optimizer=optimizer
            )
            self.parallel.groups[i] = new_groups
            events.append(_event(step, i, [e for e in new_events if e.layer == i], stats))
            if self.parallel.rank == 0:
                log.info("step %d: MoE layer %d re-placed: %s", step, i, events[-1]["reason"])
        return events

    def _placements(self) -> list[Placement]:
        return [self.policy.placement(i) for i in range(len(self.parallel.groups))]

    def _observe_micro_batch(self, step: int, i: int, m: int, rows_we: npt.NDArray[np.int64]) -> None:
        """Feed the policy layer i's micro-batch m: rows_we int64 [W, E] holds every rank's
        MicroEP-group load (each group once per member rank, so the mean over ranks is the mean
        over groups and the max over distinct rows the worst group's)."""
        current = self.policy.placement(i)
        realized = max(
            placement_score(row, current, cost=self.policy.cost) for row in np.unique(rows_we, axis=0)
        )
        decision = self.policy.observe(i, rows_we.mean(axis=0), realized=realized)
        self.checks.append(
            {
                "step": step,
                "micro_batch": m,
                "layer": i,
                "realized": realized,
                "replace": decision.replace,
                "reason": decision.reason,
            }
        )

    def _check_agreement(self, targets: list[Placement | None]) -> None:
        """Raise ValueError on every rank unless all ranks chose the same placements (a difference,
        e.g. from per-rank cost models, would otherwise hang the migration's collectives)."""
        mine = [placement_hash(p) if p is not None else 0 for p in targets]
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

    def _gather_loads(self) -> npt.NDArray[np.int64]:
        """int64 [W, L, M, E]: every rank's per-micro-batch MicroEP-group loads since the last call,
        identical on every rank; clears this rank's pending loads."""
        num_micro = {len(p) for p in self._pending}
        assert len(num_micro) == 1, "every MoE layer observes every micro-batch"
        m = num_micro.pop()
        mine = np.zeros((len(self._pending), m, self.num_experts), dtype=np.int64)
        for i, per_micro in enumerate(self._pending):
            if m:
                mine[i] = np.stack(per_micro)
            per_micro.clear()
        local = torch.from_numpy(mine).to(self.parallel.device)
        gathered = [torch.empty_like(local) for _ in range(self.parallel.world)]
        # collective (world): every rank's loads of this step (exact int64)
        dist.all_gather(gathered, local)
        return torch.stack(gathered).cpu().numpy()  # host sync

    # ----------------------------------------------------------------------------------------
    # checkpoints (the trainer saves the placements themselves)
    def state_dict(self) -> dict[str, Any]:
        """The policy's history (`ReplacementPolicy.state_dict`: forecast, per-layer counters,
        recent loads, start placements), JSON-ready."""
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; call after the placements were restored into `parallel.groups`.
        An older checkpoint (forecast only) restores the forecast and keeps the counters fresh."""
        if state.get("version") != 2:
            for i, f in enumerate(state.get("forecast", [])):
                if f is not None:
                    self.policy.tracker.observe(i, f)
            return
        self.policy.load_state_dict(state, [g.placement for g in self.parallel.groups])


def _check_options(
    interval: int,
    threshold: float,
    micro_batches: int,
    trigger_after: int,
    cooldown: int,
    warmup: int,
    window: int,
    min_gain: float,
) -> None:
    """ValueError naming the flag of the first bad option."""
    for flag, v, low in (
        ("--replace-interval", interval, 1),
        ("--grad-accum", micro_batches, 1),
        ("--replace-trigger-after", trigger_after, 1),
        ("--replace-cooldown", cooldown, 0),
        ("--replace-warmup", warmup, 1),
        ("--replace-window", window, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{flag} must be an integer >= {low} here, got {v!r}")
    if not threshold >= 1.0:
        raise ValueError(f"--replace-threshold must be >= 1.0 (1.0 = perfect balance), got {threshold}")
    if not min_gain >= 0.0:
        raise ValueError(f"--replace-min-gain must be >= 0, got {min_gain}")


def _event(
    step: int, layer: int, policy_events: list[ReplacementEvent], stats: MigrationStats
) -> dict[str, Any]:
    """One log event per migrated layer and step: the policy's reasons (more than one only when
    a zero cooldown let it re-place twice within the step) and what the migration cost."""
    assert policy_events, "a migration without a policy event"
    return {
        "step": step,
        "layer": layer,
        "micro_batches": policy_events[-1].micro_batch,  # the layer's micro-batches seen so far
        "rule": "+".join(e.rule for e in policy_events),
        "reason": "; then ".join(e.reason for e in policy_events),
        "old_score": policy_events[0].old_score,
        "new_score": policy_events[-1].new_score,
        "bytes_moved": stats.bytes_moved,
        "slots_changed": stats.slots_changed,
        "ms": stats.ms,
    }


def build_replacement(
    interval: int,
    threshold: float,
    parallel: ParallelState,
    *,
    cost: SlotCostModel | None = None,
    **options: Any,
) -> Replacer:
    """The hook for a run: `interval` steps between interval checks (0 = adaptive replacement
    off), `threshold` the score above which a layer is re-placed, `parallel` the run's
    ParallelState, `cost` an optional GEMM time model for time-aware scores; `options` are
    `AdaptiveReplacement`'s keywords (micro_batches, trigger_after, cooldown, warmup, window,
    min_gain, seed, ...), with its defaults."""
    if interval == 0:
        return NoReplacement()
    if cost is not None and parallel is not None and parallel.distributed:
        cost = rank0_cost_model(cost, parallel)  # collective (world)
    return AdaptiveReplacement(parallel, interval=interval, threshold=threshold, cost=cost, **options)


def rank0_cost_model(cost: SlotCostModel, parallel: ParallelState) -> CostModel:
    """Rank 0's cost model on every rank [collective, world]: the policy decides world-wide, but
    the dispatchers' models may differ between MicroEP groups ("auto" calibrates on each group's
    first rank; "bundled" reads each rank's GPU name), and differing scores would make the ranks
    choose different placements. `cost` must be a `CostModel` (what a run's dispatchers hold)."""
    if not isinstance(cost, CostModel):
        raise ValueError(
            f"adaptive replacement in a distributed run needs a micromoe.plan.cost.CostModel, "
            f"got {type(cost).__name__}"
        )
    box: list[dict[str, Any] | None] = [cost.to_json()]
    device = parallel.device if parallel.device.type == "cuda" else None
    dist.broadcast_object_list(box, src=0, device=device)  # collective (world)
    return CostModel.from_json(box[0], where="rank 0's cost model")
