"""An LPLB-style balancer (after DeepSeek's LPLB): one redundant copy per expert along a fixed
GPU topology graph, and a per-micro-batch LP over how much of each expert's load its copy takes.

Legend: E experts, G GPUs, k = E / G original experts per GPU.

Layout (built once from the history, as LPLB reorders experts with EPLB):
- originals: EPLB's balanced packing of the E experts onto G GPUs, k per GPU, by history load;
- copies: GPU g's originals, hottest first, get their copy on g's topology neighbours in turn.
  `ring`: neighbours g+1, g-1; `cube` (G a power of two): neighbours g xor 2^b.
So every expert has at most 2 copies (original + redundant) and load moves only along graph edges.

Per micro-batch: minimize T subject to, for every GPU g,
  sum_{e original on g} (L_e - f_e) + sum_{e copied onto g} f_e <= T,  0 <= f_e <= L_e,
solved exactly by HiGHS (warm-started: only bounds change); the copy takes round(f_e) tokens.
LPLB itself solves the LP approximately (a few interior-point iterations on the GPU); this
version gets the exact optimum, so it shows what LPLB's topology allows, not its solver's error.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from micromoe.plan.highs import new_highs
from micromoe.sim.eplb import balanced_packing
from micromoe.sim.traces import IntArray

Topology = Literal["ring", "cube"]


def topology_neighbours(num_gpus: int, topology: Topology) -> list[list[int]]:
    """Neighbour lists of the GPU graph (ring: g+1, g-1; cube: g xor 1, 2, 4, ...)."""
    if topology == "ring":
        if num_gpus < 2:
            raise ValueError("the LPLB ring needs at least 2 GPUs")
        return [sorted({(g + 1) % num_gpus, (g - 1) % num_gpus}) for g in range(num_gpus)]
    if topology == "cube":
        if num_gpus < 2 or num_gpus & (num_gpus - 1):
            raise ValueError(f"the LPLB cube needs a power-of-two GPU count, got {num_gpus}; use ring")
        bits = num_gpus.bit_length() - 1
        return [[g ^ (1 << b) for b in range(bits)] for g in range(num_gpus)]
    raise ValueError(f"unknown LPLB topology {topology!r}; use 'ring' or 'cube'")


def default_topology(num_gpus: int) -> Topology:
    """cube for power-of-two groups of >= 4 GPUs (LPLB's usual choice), else ring."""
    return "cube" if num_gpus >= 4 and not num_gpus & (num_gpus - 1) else "ring"


def lplb_layout(history: npt.ArrayLike, num_gpus: int, topology: Topology) -> tuple[IntArray, IntArray]:
    """(orig_gpu int64 [E], copy_gpu int64 [E]) for expected per-expert loads history [E]."""
    w = np.asarray(history, dtype=np.float64)
    if w.size % num_gpus:
        raise ValueError(f"LPLB needs experts divisible by GPUs: {w.size} experts on {num_gpus} GPUs")
    orig = balanced_packing(w, num_gpus)
    nbrs = topology_neighbours(num_gpus, topology)
    copy = np.empty_like(orig)
    for g in range(num_gpus):
        mine = np.flatnonzero(orig == g)
        mine = mine[np.argsort(-w[mine], kind="stable")]
        for i, e in enumerate(mine):
            copy[e] = nbrs[g][i % len(nbrs[g])]
    return orig, copy


class LplbSolver:
    """Warm-started HiGHS model of the per-micro-batch LP for one layout."""

    def __init__(self, orig_gpu: IntArray, copy_gpu: IntArray, num_gpus: int) -> None:
        import highspy

        self.orig_gpu, self.copy_gpu, self.num_gpus = orig_gpu, copy_gpu, num_gpus
        num_e = orig_gpu.size
        h = new_highs()
        inf = highspy.kHighsInf
        h.addVars(num_e + 1, np.zeros(num_e + 1), np.full(num_e + 1, inf))
        h.changeColsCost(1, np.array([num_e], dtype=np.int32), np.array([1.0]))
        for g in range(num_gpus):
            inc = np.flatnonzero(copy_gpu == g)
            out = np.flatnonzero(orig_gpu == g)
            idx = np.concatenate([inc, out, [num_e]]).astype(np.int32)
            val = np.concatenate([np.ones(inc.size), -np.ones(out.size), [-1.0]])
            h.addRow(-inf, 0.0, idx.size, idx, val)
        self._h, self._inf = h, inf
        self._cols = np.arange(num_e, dtype=np.int32)
        self._rows = np.arange(num_gpus, dtype=np.int32)

    def quota(self, loads: npt.ArrayLike) -> IntArray:
        """quota int64 [E, G] for per-expert loads [E]: original keeps L_e - f_e, copy takes f_e."""
        load = np.asarray(loads, dtype=np.int64)
        num_e = load.size
        h = self._h
        h.changeColsBounds(num_e, self._cols, np.zeros(num_e), load.astype(np.float64))
        orig_load = np.bincount(self.orig_gpu, weights=load, minlength=self.num_gpus)
        h.changeRowsBounds(self.num_gpus, self._rows, np.full(self.num_gpus, -self._inf), -orig_load)
        h.run()
        f = np.asarray(h.getSolution().col_value[:num_e], dtype=np.float64)
        moved = np.clip(np.floor(f + 0.5).astype(np.int64), 0, load)
        quota = np.zeros((num_e, self.num_gpus), dtype=np.int64)
        experts = np.arange(num_e)
        quota[experts, self.orig_gpu] = load - moved
        quota[experts, self.copy_gpu] += moved
        return quota
