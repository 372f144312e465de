"""Adaptive replacement (AR): forecast per-layer expert loads, score the placement, decide.

The tracker keeps an exponential moving average of each layer's per-expert load. A placement is
scored by the density lemma under the forecast: T* / mean, 1.0 = perfectly balanceable. When the
score passes a threshold, a new asymmetric placement is built for the forecast; the caller migrates
expert weights and optimizer state to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from micromoe.plan.density import balance_ratio
from micromoe.plan.layouts import integer_loads
from micromoe.plan.placement import Placement


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


def placement_score(forecast: npt.ArrayLike, placement: Placement) -> float:
    """T* / mean GPU load of `placement` under forecast loads (1.0 = balanceable)."""
    return balance_ratio(integer_loads(np.asarray(forecast, dtype=np.float64)), placement)


@dataclass(frozen=True)
class Replacement:
    """Outcome of one replacement check: the scores and the placement to use from now on."""

    replace: bool
    current_score: float
    new_score: float
    placement: Placement


def decide_replacement(
    forecast: npt.ArrayLike,
    current: Placement,
    *,
    threshold: float = 1.02,
    min_gain: float = 0.01,
    seed: int = 0,
    num_samples: int = 32,
) -> Replacement:
    """Replace when the current score exceeds `threshold` and a new asymmetric placement with the
    same GPUs and slots improves it by at least `min_gain`. Deterministic for a given seed."""
    if threshold < 1.0:
        raise ValueError(f"threshold must be >= 1.0 (1.0 = perfect balance), got {threshold}")
    current_score = placement_score(forecast, current)
    if current_score <= threshold:
        return Replacement(False, current_score, current_score, current)
    candidate = Placement.asymmetric(
        forecast, current.num_gpus, current.slots_per_gpu, seed=seed, num_samples=num_samples
    )
    new_score = placement_score(forecast, candidate)
    if new_score <= current_score - min_gain:
        return Replacement(True, current_score, new_score, candidate)
    return Replacement(False, current_score, new_score, current)
