"""An LPLB-style balancer (after DeepSeek's LPLB): one redundant copy per expert along a fixed,
directed GPU topology graph, and a per-micro-batch LP over how much of each expert's load its copy
takes.

Legend: E experts, G GPUs, k = E / G original experts per GPU, R copy edges out of every GPU.

Layout (built once from the history, as LPLB reorders experts with EPLB):
- originals: EPLB's balanced packing of the E experts onto G GPUs, k per GPU, by history load;
- copies: each GPU g has R directed out-edges `copy_edges[g, 0..R-1]`; g's i-th hottest original
  gets its copy on `copy_edges[g, i mod R]` (LPLB: the i-th redundant slot of a GPU copies the
  i-th hottest expert of one fixed other GPU). Every column of `copy_edges` is a permutation of the
  GPUs, so every GPU receives as many copies as it sends, and the hottest experts of different
  GPUs are copied to different GPUs (no two GPUs swap their hottest experts' copies, except where
  the topology forces it: a 2-GPU ring or a torus side of 2).
Topologies (LPLB's published ones; G must fit):
- `cube` (G a multiple of 8, one cube per 8 GPUs): GPUs 4q..4q+3 form a directed 4-cycle (edge 0,
  the hottest expert), and edge 1 links the two 4-cycles: l -> l + 4 for l < 4, l -> (l + 2) mod 4
  for l >= 4 (a cube with diagonal edges);
- `hypercube` (G a multiple of 16, one per 16 GPUs): a 4 x 4 torus: edge 0 the 4-cycle inside each
  group of 4, edge 1 l -> (l + 4) mod 16;
- `torus` (G = nodes x gpus_per_node, both >= 2): GPU (i, j) sends its hottest expert's copy to
  (i - 1, j) on the neighbouring node and its second hottest to (i, j - 1) on its own node;
- `ring` (any G >= 2): one edge, g -> g - 1.
So every expert has exactly 2 replicas (original + copy) and load moves only along graph edges.

Per micro-batch: minimize T subject to, for every GPU g,
  sum_{e original on g} (L_e - f_e) + sum_{e copied onto g} f_e <= T,  0 <= f_e <= L_e,
solved exactly by HiGHS; the copy takes round(f_e) tokens. `LplbSolver` builds the LP of a layer
once and per micro-batch changes only the bounds (the loads), then solves from scratch: the LP has
many optimal vertices, and a warm start from the last micro-batch's basis ends at another one in
most micro-batches, which would make the quota depend on the order of the micro-batches.
LPLB itself solves the LP approximately (5 interior-point iterations on the GPU); `LplbSolver`
gets the exact optimum, so it shows what LPLB's topology allows, not its solver's error.
`LplbIpmSolver` (`--lplb-solver ipm`) runs LPLB's own 5 steps instead, for comparison.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from micromoe.plan import new_highs
from micromoe.sim.eplb import balanced_packing
from micromoe.sim.traces import IntArray

Topology = Literal["cube", "hypercube", "torus", "ring"]
TOPOLOGIES: tuple[str, ...] = get_args(Topology)
IPM_STEPS = 5  # LPLB's fixed number of interior-point iterations per micro-batch


def copy_edges(num_gpus: int, topology: Topology, gpus_per_node: int | None = None) -> IntArray:
    """edges int64 [G, R]: edges[g, i] receives the copy of GPU g's i-th hottest expert (mod R).

    `gpus_per_node` sets the torus shape (nodes x gpus_per_node); without it the torus uses 8 GPUs
    per node when G is a multiple of 8 above 8, else the most square factorisation.
    """
    g = np.arange(num_gpus, dtype=np.int64)
    if topology == "ring":
        if num_gpus < 2:
            raise ValueError(f"the LPLB ring needs at least 2 GPUs, got {num_gpus}")
        return ((g - 1) % num_gpus)[:, None]
    if topology == "cube":
        _check_blocks(num_gpus, 8, "cube")
        base, local = g - g % 8, g % 8
        ring4 = local - local % 4 + (local + 1) % 4
        across = np.where(local < 4, local + 4, (local + 2) % 4)
        return np.stack([base + ring4, base + across], axis=1)
    if topology == "hypercube":
        _check_blocks(num_gpus, 16, "hypercube")
        base, local = g - g % 16, g % 16
        ring4 = local - local % 4 + (local + 1) % 4
        return np.stack([base + ring4, base + (local + 4) % 16], axis=1)
    if topology == "torus":
        nodes, per_node = torus_shape(num_gpus, gpus_per_node)
        i, j = g // per_node, g % per_node
        return np.stack([(i - 1) % nodes * per_node + j, i * per_node + (j - 1) % per_node], axis=1)
    raise ValueError(f"unknown LPLB topology {topology!r}; use one of {', '.join(TOPOLOGIES)}")


def topology_neighbours(
    num_gpus: int, topology: Topology, gpus_per_node: int | None = None
) -> list[list[int]]:
    """Out-neighbour lists of the directed copy graph (`copy_edges` as lists)."""
    return copy_edges(num_gpus, topology, gpus_per_node).tolist()


def torus_shape(num_gpus: int, gpus_per_node: int | None = None) -> tuple[int, int]:
    """(nodes, gpus_per_node) of LPLB's 2-D torus over `num_gpus` GPUs; both sides >= 2."""
    if gpus_per_node is None:
        if num_gpus > 8 and num_gpus % 8 == 0:
            gpus_per_node = 8
        else:
            sides = [n for n in range(2, num_gpus) if num_gpus % n == 0 and n * n >= num_gpus]
            gpus_per_node = sides[0] if sides else num_gpus
    if gpus_per_node < 2 or num_gpus % gpus_per_node or num_gpus // gpus_per_node < 2:
        raise ValueError(
            f"the LPLB torus needs {num_gpus} GPUs = nodes x GPUs per node with both >= 2, "
            f"got {gpus_per_node} GPUs per node; use ring"
        )
    return num_gpus // gpus_per_node, gpus_per_node


def default_topology(num_gpus: int, gpus_per_node: int | None = None) -> Topology:
    """LPLB's suggestions: cube for 8 GPUs, hypercube for 16, a torus when G factorises, else ring."""
    if num_gpus == 8:
        return "cube"
    if num_gpus == 16:
        return "hypercube"
    try:
        torus_shape(num_gpus, gpus_per_node)
    except ValueError:
        return "ring"
    return "torus"


def lplb_layout(
    history: npt.ArrayLike, num_gpus: int, topology: Topology, gpus_per_node: int | None = None
) -> tuple[IntArray, IntArray]:
    """(orig_gpu int64 [E], copy_gpu int64 [E]) for expected per-expert loads history [E]."""
    w = np.asarray(history, dtype=np.float64)
    if w.size % num_gpus:
        raise ValueError(f"LPLB needs experts divisible by GPUs: {w.size} experts on {num_gpus} GPUs")
    edges = copy_edges(num_gpus, topology, gpus_per_node)
    orig = balanced_packing(w, num_gpus)
    copy = np.empty_like(orig)
    for g in range(num_gpus):
        mine = np.flatnonzero(orig == g)
        mine = mine[np.argsort(-w[mine], kind="stable")]
        copy[mine] = edges[g, np.arange(mine.size) % edges.shape[1]]
    return orig, copy


def _check_blocks(num_gpus: int, block: int, name: str) -> None:
    if num_gpus < block or num_gpus % block:
        raise ValueError(
            f"the LPLB {name} needs a multiple of {block} GPUs (one {name} per {block}), got {num_gpus}; "
            "use torus or ring"
        )


class LplbSolver:
    """The per-micro-batch LP of one layout as one HiGHS model, built once.

    Columns: f_e (tokens expert e moves to its copy, bounds [0, L_e]) and T (cost 1); rows, one
    per GPU g: sum of f over experts copied onto g - sum of f over originals on g - T <= -(load
    of the originals on g). Only the bounds depend on the loads. `quota` solves cold by default
    (the basis is cleared after the bounds change), so its answer is the one a fresh solver gives
    for the same loads; `warm_start=True` re-solves from the last basis instead: faster, equally
    LP-optimal, but a different optimal vertex in most micro-batches (history-dependent quotas).
    """

    def __init__(
        self, orig_gpu: IntArray, copy_gpu: IntArray, num_gpus: int, *, warm_start: bool = False
    ) -> None:
        self.orig_gpu, self.copy_gpu, self.num_gpus = orig_gpu, copy_gpu, num_gpus
        self.warm_start = warm_start
        num_e = orig_gpu.size
        h = new_highs()
        inf = np.inf  # HiGHS reads any bound >= 1e20 as infinite
        h.addVars(num_e + 1, np.zeros(num_e + 1), np.full(num_e + 1, inf))
        h.changeColsCost(1, np.array([num_e], dtype=np.int32), np.array([1.0]))
        for g in range(num_gpus):
            inc = np.flatnonzero(copy_gpu == g)
            out = np.flatnonzero(orig_gpu == g)
            idx = np.concatenate([inc, out, [num_e]]).astype(np.int32)
            val = np.concatenate([np.ones(inc.size), -np.ones(out.size), [-1.0]])
            h.addRow(-inf, 0.0, idx.size, idx, val)
        self._h = h
        self._cols = np.arange(num_e, dtype=np.int32)
        self._rows = np.arange(num_gpus, dtype=np.int32)
        self._col_lower = np.zeros(num_e)
        self._row_lower = np.full(num_gpus, -inf)
        self._experts = np.arange(num_e)

    def quota(self, loads: npt.ArrayLike) -> IntArray:
        """quota int64 [E, G] for per-expert loads [E] (non-negative integers): the original keeps
        L_e - round(f_e), the copy takes round(f_e)."""
        load = _check_loads(loads, self.orig_gpu.size)
        h = self._h
        h.changeColsBounds(load.size, self._cols, self._col_lower, load.astype(np.float64))
        orig_load = np.bincount(self.orig_gpu, weights=load, minlength=self.num_gpus)
        h.changeRowsBounds(self.num_gpus, self._rows, self._row_lower, -orig_load)
        if not self.warm_start:
            h.clearSolver()  # drop the last basis: presolve and solve as a fresh model would
        h.run()
        assert h.modelStatusToString(h.getModelStatus()) == "Optimal", "the LPLB LP is always feasible"
        f = np.asarray(h.getSolution().col_value[: load.size], dtype=np.float64)
        return self._split(load, np.clip(np.floor(f + 0.5).astype(np.int64), 0, load))

    def _split(self, load: IntArray, moved: IntArray) -> IntArray:
        quota = np.zeros((load.size, self.num_gpus), dtype=np.int64)
        quota[self._experts, self.orig_gpu] = load - moved
        quota[self._experts, self.copy_gpu] += moved
        return quota


def _check_loads(loads: npt.ArrayLike, num_experts: int) -> IntArray:
    """loads as int64 [E]; ValueError for another shape or a negative load."""
    load = np.asarray(loads, dtype=np.int64)
    if load.shape != (num_experts,):
        raise ValueError(f"LPLB needs one load per expert: shape {load.shape}, expected ({num_experts},)")
    if load.size and load.min() < 0:
        raise ValueError(f"LPLB loads must be non-negative token counts, got {load.min()}")
    return load


class LplbIpmSolver:
    """LPLB's own solver, for comparison: IPM_STEPS affine-scaling interior-point steps on LPLB's
    per-edge LP, as LPLB runs it on the GPU (here in float64 NumPy).

    The LP (one variable pair per directed copy edge k = (src, dst), with w_k the summed load of
    the experts copied along k, scaled so the largest expert load is 1): p_k (share kept on src)
    + q_k (share moved to dst) = 1; for every GPU i, sum of p_k w_k over edges out of i + sum of
    q_k w_k over edges into i + slack_i - T = 0; minimize T, plus a big-M artificial column
    (cost 1000) that makes x = 1 feasible. Start from x = 1 and take IPM_STEPS Dikin steps (step
    0.999 of the way to the boundary). If the result is not clearly feasible (largest scaled
    direction >= 0.1, artificial >= 1e-4 or residual >= 0.05), LPLB falls back to p = 0.5 on every
    edge; so does this. Each expert on edge k then moves round((1 - p_k) L_e) tokens to its copy.
    """

    def __init__(self, orig_gpu: IntArray, copy_gpu: IntArray, num_gpus: int) -> None:
        self.orig_gpu, self.copy_gpu, self.num_gpus = orig_gpu, copy_gpu, num_gpus
        pairs, self._edge_of = np.unique(np.stack([orig_gpu, copy_gpu], axis=1), axis=0, return_inverse=True)
        self._edge_of = self._edge_of.reshape(-1)
        self._src, self._dst = pairs[:, 0], pairs[:, 1]
        self._a0, self._b, self._c = self._lp_template()
        self.fallbacks = 0  # micro-batches where the IPM result was rejected (p = 0.5 everywhere)

    def quota(self, loads: npt.ArrayLike) -> IntArray:
        """quota int64 [E, G] for per-expert loads [E] (see the class docstring)."""
        load = _check_loads(loads, self.orig_gpu.size)
        keep = self._kept_shares(load)
        moved = np.clip(np.floor((1.0 - keep[self._edge_of]) * load + 0.5).astype(np.int64), 0, load)
        quota = np.zeros((load.size, self.num_gpus), dtype=np.int64)
        experts = np.arange(load.size)
        quota[experts, self.orig_gpu] = load - moved
        quota[experts, self.copy_gpu] += moved
        return quota

    def _kept_shares(self, load: IntArray) -> npt.NDArray[np.float64]:
        """p_k for every edge: the IPM's, or 0.5 everywhere when its result is rejected."""
        n_edges = self._src.size
        w = np.bincount(self._edge_of, weights=load, minlength=n_edges) / max(int(load.max(initial=0)), 1)
        a, b, c = self._lp(w)
        x = np.ones(a.shape[1])
        d = np.zeros_like(x)
        for _ in range(IPM_STEPS):
            ax2 = a * x**2
            y = np.linalg.solve(ax2 @ a.T, ax2 @ c)
            d = x * (c - y @ a)
            if d.max() <= 0:
                break
            x = x * (1.0 - 0.999 / d.max() * d)
        residual = np.abs(a @ x - b).max()
        if not (d.max() < 0.1 and 0.0 <= x[-1] < 1e-4 and residual < 0.05):
            self.fallbacks += 1
            return np.full(n_edges, 0.5)
        return np.clip(x[:n_edges], 0.0, 1.0)

    def _lp(self, w: npt.NDArray[np.float64]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A [NC, NV], b [NC], c [NV]) of the standard-form LP, NV = 2 edges + G + 2: the
        load-free template with the edge loads w [edges] and the big-M column filled in."""
        n = w.size
        a = self._a0.copy()
        k = np.arange(n)
        a[self._src, k] = w  # kept on the original's GPU
        a[self._dst, n + k] = w  # moved to the copy's GPU
        a[:, -1] = self._b - a[:, :-1].sum(axis=1)  # big-M column: A @ 1 = b
        return a, self._b, self._c

    def _lp_template(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A0, b, c): the LP's entries that do not depend on the loads (A0's w entries and big-M
        column are zero), built once per layout."""
        n, g = self._src.size, self.num_gpus
        nv, nc = 2 * n + g + 2, g + n
        a = np.zeros((nc, nv))
        k = np.arange(n)
        a[g + k, k] = a[g + k, n + k] = 1.0  # p_k + q_k = 1
        a[np.arange(g), 2 * n + np.arange(g)] = 1.0  # slack
        a[:g, 2 * n + g] = -1.0  # T
        b = np.concatenate([np.zeros(g), np.ones(n)])
        c = np.zeros(nv)
        c[-2], c[-1] = 1.0, 1000.0
        return a, b, c
