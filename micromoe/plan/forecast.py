"""Adaptive replacement (AR): forecast per-layer expert loads, score the placement, decide.

The tracker keeps an exponential moving average of each layer's per-expert load. A placement is
scored under the forecast either by the density lemma (tokens: T* / mean, 1.0 = perfectly
balanceable) or, given a cost model, in predicted time (`timed_layouts.time_score`: the time-aware
plan's slowest GPU over an ideal fair share). When the score passes a threshold, a new load-aware
placement is built for the forecast (with a cost model: the candidate with the best predicted time,
which also decides how many slots each expert gets); the caller migrates expert weights and
optimizer state to it. `ReplacementPolicy` adds the rules around that decision: no cold start, a
trigger on realized imbalance, hysteresis, and a reason for every replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import positive_int
from micromoe.plan.density import balance_ratio
from micromoe.plan.layouts import integer_loads
from micromoe.plan.placement import Placement
from micromoe.plan.timed import TOKEN_SLACK, SlotCostModel, check_cost_model
from micromoe.plan.timed_layouts import EVEN_MARGIN, time_aware_slots, time_score

# micro-batches a check scores placements over: with 4, replacements chased noise (on a training
# run's routing log, twice as many moves for the same predicted time; docs/RESULTS.md)
REPLACE_WINDOW = 8


class LoadTracker:
    """Exponential moving average of per-expert load, one row per layer.

    `decay` weighs history: forecast = decay * forecast + (1 - decay) * observed.
    """

    def __init__(self, num_layers: int, num_experts: int, *, decay: float = 0.9) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"need num_layers >= 1 and num_experts >= 1, got {num_layers}, {num_experts}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._avg = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._seen = np.zeros(num_layers, dtype=np.int64)

    def observe(self, layer: int, loads: npt.ArrayLike) -> None:
        """Record one micro-batch's per-expert load (int or float [E], >= 0) of `layer`."""
        x = np.asarray(loads, dtype=np.float64)
        if x.shape != self._avg.shape[1:]:
            raise ValueError(f"loads must have shape ({self._avg.shape[1]},), got {x.shape}")
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError("loads must be finite and >= 0")
        if self._seen[layer] == 0:
            self._avg[layer] = x
        else:
            self._avg[layer] = self.decay * self._avg[layer] + (1.0 - self.decay) * x
        self._seen[layer] += 1

    def forecast(self, layer: int) -> npt.NDArray[np.float64]:
        """Forecast per-expert load of `layer` (float [E]); ValueError before any observation."""
        if self._seen[layer] == 0:
            raise ValueError(f"layer {layer} has no observed loads yet")
        return self._avg[layer].copy()

    def observations(self, layer: int) -> int:
        return int(self._seen[layer])

    def reset(self, layer: int, forecast: npt.ArrayLike | None = None) -> None:
        """Forget `layer`'s history; with `forecast` (float [E]) it becomes the first observation."""
        self._avg[layer] = 0.0
        self._seen[layer] = 0
        if forecast is not None:
            self.observe(layer, forecast)


def placement_score(
    forecast: npt.ArrayLike, placement: Placement, *, cost: SlotCostModel | None = None
) -> float:
    """Score of `placement` under forecast loads (float [E]); lower is better.

    Without a cost model: T* / mean GPU load (1.0 = balanceable), scale-free. With one: predicted
    slowest-GPU time of the time-aware plan / the ideal fair share (`timed_layouts.ideal_time_us`); the forecast must then be in
    rows per micro-batch, since GEMM time depends on the scale.
    """
    if cost is not None:
        return time_score(forecast, placement, check_cost_model(cost))
    return balance_ratio(integer_loads(np.asarray(forecast, dtype=np.float64)), placement)


def _load_aware(
    loads: npt.ArrayLike,
    like: Placement,
    cost: SlotCostModel | None,
    seed: int,
    num_samples: int,
    even_margin: float,
) -> Placement:
    """A load-aware placement for loads (float [E]) with `like`'s GPUs, slots and experts: the
    asymmetric layout, or with `cost` the best of `timed_layouts.time_aware_slots`
    (num_samples // 4 GPU samples for each replica budget)."""
    g, s = like.num_gpus, like.slots_per_gpu
    if cost is None:
        return Placement.asymmetric(loads, g, s, seed=seed, num_samples=num_samples)
    per_budget = max(1, num_samples // 4)
    slots, _, _ = time_aware_slots(
        loads, g, s, cost, seed=seed, num_samples=per_budget, even_margin=even_margin
    )
    return Placement.from_slots(slots, like.num_experts)


@dataclass(frozen=True)
class Replacement:
    """Outcome of one replacement check: the scores, the placement to use from now on, and why."""

    replace: bool
    current_score: float
    new_score: float
    placement: Placement
    reason: str = ""


def decide_replacement(
    forecast: npt.ArrayLike,
    current: Placement,
    *,
    threshold: float = 1.02,
    min_gain: float = 0.01,
    seed: int = 0,
    num_samples: int = 32,
    cost: SlotCostModel | None = None,
    samples: Sequence[npt.ArrayLike] = (),
    alternatives: Sequence[Placement] = (),
    even_margin: float = EVEN_MARGIN,
) -> Replacement:
    """Replace when the current score exceeds `threshold` and a new load-aware placement with the
    same GPUs and slots improves it by at least `min_gain`. Deterministic for a given seed.

    With `cost`, scores are predicted times (`placement_score`) and the candidates are the best of
    `timed_layouts.time_aware_slots` (num_samples // 4 GPU samples for each replica budget) and the
    token-balanced load-aware layout. A candidate must also keep tokens balanced: its T*/mean may
    not exceed max(1 + TOKEN_SLACK, the current placement's), since tokens are all-to-all volume,
    which the model does not cost (a layout that only saves GEMM groups can leave one GPU with far
    more tokens once loads move).
    `samples` (recent per-micro-batch loads, float [E] each): placements are scored by their mean
    score over these instead of on the forecast alone, which favours layouts that stay balanced
    when loads move; `alternatives`: more candidates (e.g. the symmetric layout) scored the same way.
    `even_margin`: the cost model's tie margin between replica budgets (`timed_layouts.prefer_even`).
    """
    if threshold < 1.0:
        raise ValueError(f"threshold must be >= 1.0 (1.0 = perfect balance), got {threshold}")
    unit = "predicted time / fair share" if cost is not None else "T*/mean"
    loads = [forecast] if not samples else list(samples)

    def score(p: Placement) -> float:
        return float(np.mean([placement_score(x, p, cost=cost) for x in loads]))

    current_score = score(current)
    if current_score <= threshold:
        why = f"kept: {unit} {current_score:.4f} <= threshold {threshold:.4f}"
        return Replacement(False, current_score, current_score, current, why)
    candidates = [_load_aware(forecast, current, cost, seed, num_samples, even_margin)]
    if cost is not None:
        candidates.append(_load_aware(forecast, current, None, seed, num_samples, even_margin))
    candidates = [c for c in [*candidates, *alternatives] if c != current]
    if cost is not None:
        token_cap = max(1.0 + TOKEN_SLACK, _token_score(current, loads))
        candidates = [c for c in candidates if _token_score(c, loads) <= token_cap]
    scored = [(score(c), i, c) for i, c in enumerate(candidates)]
    if not scored:
        why = f"kept: {unit} {current_score:.4f}; no other placement" + (
            f" keeps T*/mean within {token_cap:.4f}" if cost is not None else ""
        )
        return Replacement(False, current_score, current_score, current, why)
    new_score, _, candidate = min(scored, key=lambda t: t[:2])  # ties: the earlier candidate
    if new_score <= current_score - min_gain:
        why = f"{unit} {current_score:.4f} > threshold {threshold:.4f}; new placement {new_score:.4f}"
        return Replacement(True, current_score, new_score, candidate, why)
    why = f"kept: {unit} {current_score:.4f}, best new {new_score:.4f} gains < min_gain {min_gain}"
    return Replacement(False, current_score, new_score, current, why)


def _token_score(placement: Placement, loads: Sequence[npt.ArrayLike]) -> float:
    """Mean T*/mean over loads (float [E] each): how evenly the placement can spread the tokens."""
    return float(np.mean([balance_ratio(integer_loads(np.asarray(x, np.float64)), placement) for x in loads]))


def initial_placement(
    history: npt.ArrayLike | None,
    fallback: Placement,
    *,
    cost: SlotCostModel | None = None,
    seed: int = 0,
    num_samples: int = 32,
    even_margin: float = EVEN_MARGIN,
) -> Replacement:
    """The placement to start from: no cold start when a load history exists.

    history: float [E] expected loads (a trace's, or the first observed micro-batches'; rows per
    micro-batch when `cost` is given) or None. Returns a `Replacement` whose placement is the
    load-aware one built for the history when it scores better than `fallback`, else `fallback`.
    """
    if history is None:
        return Replacement(False, float("nan"), float("nan"), fallback, "no load history: fallback placement")
    old = placement_score(history, fallback, cost=cost)
    candidate = _load_aware(history, fallback, cost, seed, num_samples, even_margin)
    new = placement_score(history, candidate, cost=cost)
    if new < old:
        return Replacement(
            True, old, new, candidate, f"load-aware start from history ({old:.4f} -> {new:.4f})"
        )
    return Replacement(
        False, old, new, fallback, f"history scores the fallback best ({old:.4f} <= {new:.4f})"
    )


@dataclass(frozen=True)
class ReplacementEvent:
    """One replacement taken by `ReplacementPolicy` (also logged in `ReplacementPolicy.events`)."""

    layer: int
    micro_batch: int
    rule: str  # "cold-start", "realized", "interval" or "history"
    reason: str
    old_score: float
    new_score: float


@dataclass
class _LayerState:
    placement: Placement
    fallback: Placement  # the load-independent start, kept as a candidate for drifting loads
    load_aware: bool
    seen: int = 0
    over: int = 0  # consecutive micro-batches with realized score > threshold
    last_replace: int = -(10**9)
    warm: list[npt.NDArray[np.float64]] = field(default_factory=list)


class ReplacementPolicy:
    """When to re-place each layer, and why: the rules around `decide_replacement`.

    After every micro-batch of a layer (`observe`), in this order:
      - cold start: a layer started without a load history (`start(layer, fallback)`) gets a
        load-aware placement from the mean load of its first `warmup` micro-batches;
      - realized imbalance: when the realized score (the executed plan's, passed as `realized`, or
        the placement's score under this micro-batch's loads) exceeded `threshold` for
        `trigger_after` consecutive micro-batches, check now, on the mean of those micro-batches;
      - interval: every `interval` micro-batches, check the moving-average forecast.
    A check is `decide_replacement`, scoring the current placement, a new one built for the forecast
    and the start's `fallback` by their mean score over the last `window` micro-batches' loads (so a
    layout that only fits the average loses to one that stays balanced as loads move). Hysteresis against flapping: no replacement within `cooldown`
    micro-batches of the previous one, a check replaces only when the score exceeds `threshold`
    and the new placement gains at least `min_gain`, and the realized count restarts after every
    check. Every replacement is returned with its reason and appended to `events`.
    Deterministic: the same loads give the same decisions on every rank.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        cost: SlotCostModel | None = None,
        interval: int = 4,
        threshold: float = 1.02,
        min_gain: float = 0.01,
        trigger_after: int = 3,
        cooldown: int = 4,
        warmup: int = 2,
        window: int = REPLACE_WINDOW,
        decay: float = 0.9,
        seed: int = 0,
        num_samples: int = 32,
        even_margin: float = EVEN_MARGIN,
    ) -> None:
        for name, v in (
            ("interval", interval),
            ("trigger_after", trigger_after),
            ("warmup", warmup),
            ("window", window),
        ):
            positive_int(v, name)
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
            raise ValueError(f"cooldown must be an integer >= 0, got {cooldown!r}")
        if threshold < 1.0:
            raise ValueError(f"threshold must be >= 1.0 (1.0 = perfect balance), got {threshold}")
        if not 0.0 <= even_margin < 1.0:
            raise ValueError(f"even_margin must lie in [0, 1) (0.02 = 2%), got {even_margin}")
        self.cost = None if cost is None else check_cost_model(cost)
        self.interval, self.threshold, self.min_gain = interval, threshold, min_gain
        self.trigger_after, self.cooldown, self.warmup = trigger_after, cooldown, warmup
        self.window, self.num_experts = window, num_experts
        self.seed, self.num_samples, self.even_margin = seed, num_samples, even_margin
        self.tracker = LoadTracker(num_layers, num_experts, decay=decay)
        self._layers: list[_LayerState | None] = [None] * num_layers
        self.events: list[ReplacementEvent] = []

    def start(self, layer: int, fallback: Placement, history: npt.ArrayLike | None = None) -> Placement:
        """Set the layer's first placement: load-aware from `history` (float [E] expected loads;
        rows per micro-batch with a cost model) when that scores better, else `fallback`."""
        first = initial_placement(
            history,
            fallback,
            cost=self.cost,
            seed=self.seed + layer,
            num_samples=self.num_samples,
            even_margin=self.even_margin,
        )
        self._layers[layer] = _LayerState(first.placement, fallback, load_aware=history is not None)
        if first.replace:
            self._log(layer, 0, "history", first)
        return first.placement

    def placement(self, layer: int) -> Placement:
        return self._state(layer).placement

    def state_dict(self) -> dict[str, Any]:
        """The history behind the next decisions, JSON-ready: per layer the forecast (float [E] or
        None), the start's fallback placement (`slot_expert` [G, S] as lists), the counters and the
        recent loads. The current placements are not included: the caller saves them with the
        weights and hands them back to `load_state_dict`. Every layer must have been started."""
        layers = []
        for i in range(len(self._layers)):
            st = self._state(i)
            seen = self.tracker.observations(i)
            layers.append(
                {
                    "forecast": self.tracker.forecast(i).tolist() if seen else None,
                    "fallback": st.fallback.slot_expert.tolist(),
                    "load_aware": st.load_aware,
                    "seen": st.seen,
                    "over": st.over,
                    "last_replace": st.last_replace,
                    "warm": [w.tolist() for w in st.warm],
                }
            )
        return {"version": 2, "layers": layers}

    def load_state_dict(self, state: dict[str, Any], placements: Sequence[Placement]) -> None:
        """Restore `state_dict()`; `placements[i]` is layer i's placement when it was saved.

        The forecast restarts from the saved value (its observation count becomes 1); `events`
        is left as it is."""
        if state.get("version") != 2:
            raise ValueError(f"unknown replacement-policy state version {state.get('version')!r}; expected 2")
        saved_layers = state["layers"]
        if len(saved_layers) != len(self._layers) or len(placements) != len(self._layers):
            raise ValueError(
                f"the policy has {len(self._layers)} layers, the state {len(saved_layers)} and "
                f"placements {len(placements)}; restore into a policy built for the same model"
            )
        for i, (saved, current) in enumerate(zip(saved_layers, placements, strict=True)):
            self.tracker.reset(i, saved["forecast"])
            fallback = Placement.from_slots(np.asarray(saved["fallback"]), self.num_experts)
            st = _LayerState(current, fallback, load_aware=saved["load_aware"])
            st.seen, st.over, st.last_replace = saved["seen"], saved["over"], saved["last_replace"]
            st.warm = [np.asarray(w, dtype=np.float64) for w in saved["warm"]]
            self._layers[i] = st

    def observe(self, layer: int, loads: npt.ArrayLike, *, realized: float | None = None) -> Replacement:
        """Record one micro-batch's per-expert loads (float [E]) of `layer`; maybe re-place.

        Returns the decision; when `replace` is True its placement serves from the next micro-batch.
        """
        st = self._state(layer)
        x = np.asarray(loads, dtype=np.float64)
        self.tracker.observe(layer, x)
        st.seen += 1
        if realized is None:
            realized = placement_score(x, st.placement, cost=self.cost)
        st.over = st.over + 1 if realized > self.threshold else 0
        st.warm = (st.warm + [x])[-max(self.warmup, self.trigger_after, self.window) :]
        seed = self.seed + 7919 * st.seen + layer
        if not st.load_aware and st.seen >= self.warmup:
            st.load_aware = True
            first = initial_placement(
                np.mean(st.warm[-self.warmup :], axis=0),
                st.placement,
                cost=self.cost,
                seed=seed,
                num_samples=self.num_samples,
                even_margin=self.even_margin,
            )
            return self._apply(layer, st, "cold-start", first)
        if st.seen - st.last_replace <= self.cooldown:
            return self._keep(
                st, realized, f"cooldown: {st.seen - st.last_replace} <= {self.cooldown} since the last"
            )
        if st.over >= self.trigger_after:
            st.over = 0
            recent = np.mean(st.warm[-self.trigger_after :], axis=0)
            return self._apply(layer, st, "realized", self._check(recent, st, seed))
        if st.seen % self.interval == 0:
            return self._apply(layer, st, "interval", self._check(self.tracker.forecast(layer), st, seed))
        return self._keep(st, realized, "no check due")

    # ----------------------------------------------------------------------------------------
    def _check(self, forecast: npt.NDArray[np.float64], st: _LayerState, seed: int) -> Replacement:
        return decide_replacement(
            forecast,
            st.placement,
            threshold=self.threshold,
            min_gain=self.min_gain,
            seed=seed,
            num_samples=self.num_samples,
            cost=self.cost,
            samples=st.warm[-self.window :],
            alternatives=(st.fallback,),
            even_margin=self.even_margin,
        )

    def _apply(self, layer: int, st: _LayerState, rule: str, r: Replacement) -> Replacement:
        if not r.replace:
            return r
        reason = {
            "cold-start": f"cold start: first {self.warmup} micro-batch(es) give a load history; ",
            "realized": f"realized score > {self.threshold} for {self.trigger_after} consecutive micro-batches; ",
            "interval": f"interval check every {self.interval} micro-batches; ",
        }[rule] + r.reason
        r = Replacement(True, r.current_score, r.new_score, r.placement, reason)
        st.placement, st.last_replace, st.over = r.placement, st.seen, 0
        self._log(layer, st.seen, rule, r)
        return r

    def _keep(self, st: _LayerState, score: float, why: str) -> Replacement:
        return Replacement(False, score, score, st.placement, why)

    def _log(self, layer: int, micro_batch: int, rule: str, r: Replacement) -> None:
        self.events.append(ReplacementEvent(layer, micro_batch, rule, r.reason, r.current_score, r.new_score))

    def _state(self, layer: int) -> _LayerState:
        st = self._layers[layer]
        if st is None:
            raise ValueError(f"layer {layer} has no placement yet; call start({layer}, fallback) first")
        return st
