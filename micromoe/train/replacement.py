"""The training loop's adaptive-replacement hook (this default never replaces anything).

The loop calls, on every rank and in the same order:
- `observe(layer_index, counts_ge)` for every MoE layer and micro-batch, with int64 [G, E] counts
  of the layer's MicroEP group;
- `maybe_replace(step, model, optimizer) -> list[dict]` once after every optimizer step; the
  returned events are logged under the key `replacements` of that step's log line.
`build_replacement` is given the run's `ParallelState`, whose `groups` list (indexed by MoE layer)
is the one place that holds each layer's placement and process groups; a replacement swaps an entry.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch


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


def build_replacement(interval: int, threshold: float, parallel: Any) -> Replacer:
    """The hook for a run: `interval` steps between checks (0 = off), `threshold` the score above
    which a layer is re-placed, `parallel` the run's ParallelState."""
    return NoReplacement()
