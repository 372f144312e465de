"""The designed samples of a calibration: rows per local slot of one GPU, spread over slot counts,
row totals and shapes of the split.

Kinds: even, Dirichlet(0.3 / 1 / 3), big slots plus tiny fragments, half or a quarter of the slots
used, one hot slot, one slot, and off-tile sizes. `design` yields them in an order that covers the
space early, so a time budget that cuts the list still sees every kind at several sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from micromoe.plan.cost import ROW_ALIGN

ALIGN = ROW_ALIGN  # rows per slot are padded to this by the dispatchers (CUDA grouped GEMM alignment)
KINDS = ("even", "dir0.3", "dir1", "fragments", "half", "hot", "dir3", "quarter", "single", "offtile")


def split_rows(num_slots: int, total: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Rows per slot, int64 [num_slots], multiples of ALIGN, summing to about `total` (> 0)."""
    s = num_slots
    if kind == "even":
        share = np.ones(s)
    elif kind.startswith("dir"):
        share = rng.dirichlet(np.full(s, float(kind[3:])))
    elif kind == "fragments":  # a third of the slots get 8..120 rows, the rest share the remainder
        num_frag = max(1, s // 3) if s > 1 else 0
        frag = rng.integers(1, 16, size=num_frag) * ALIGN
        big = np.full(
            s - num_frag, max(total - int(frag.sum()), ALIGN * (s - num_frag)) / max(s - num_frag, 1)
        )
        return _aligned(np.concatenate([big, frag]), rng)
    elif kind in ("half", "quarter"):
        used = max(1, s // (2 if kind == "half" else 4))
        share = np.zeros(s)
        share[rng.choice(s, used, replace=False)] = 1.0
    elif kind == "hot":  # one slot holds a quarter of the rows (half with few slots)
        frac = max(0.25, min(0.6, 2 / s))
        share = np.ones(s)
        share[rng.integers(s)] = frac * (s - 1) / (1 - frac) if s > 1 else 1.0
    elif kind == "single":
        share = np.zeros(s)
        share[rng.integers(s)] = 1.0
    elif kind == "offtile":  # even, each slot one ALIGN chunk past a 128-row tile
        per = 128 * int(total / s // 128) + ALIGN
        return np.full(s, per, dtype=np.int64)
    else:
        raise ValueError(f"unknown sample kind {kind!r}; known: {KINDS}")
    return _aligned(share / share.sum() * total, rng)


def _aligned(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round real rows to multiples of ALIGN (stochastically, so the total is kept on average)."""
    chunks = rows / ALIGN
    low = np.floor(chunks)
    up = rng.random(len(rows)) < (chunks - low)
    out = (low + up).astype(np.int64) * ALIGN
    if out.sum() == 0:
        out[int(np.argmax(rows))] = ALIGN
    return out


def design(
    slot_counts: Sequence[int], totals: Sequence[int], *, seed: int = 0, repeats: int = 2
) -> Iterator[tuple[np.ndarray, str]]:
    """Samples in coverage order: every (kind, S, total) once, then again with fresh draws.

    Within a round the order cycles kinds fastest, then slot counts, then totals, so a budget cut
    still sees every kind at several sizes.
    """
    rng = np.random.default_rng(seed)
    grid = [(t, s) for t in _interleave(totals) for s in _interleave(slot_counts)]
    for _ in range(repeats):
        for i, (total, s) in enumerate(grid):
            for j in range(len(KINDS)):
                kind = KINDS[(i + j) % len(KINDS)]
                yield split_rows(s, total, kind, rng), kind


def _interleave(values: Sequence[int]) -> list[int]:
    """Middle first, then the ends, then the rest: [a, b, c, d, e] -> [c, a, e, b, d]."""
    vals = sorted(values)
    order = [vals[len(vals) // 2], vals[0], vals[-1]]
    return list(dict.fromkeys(order + vals))
