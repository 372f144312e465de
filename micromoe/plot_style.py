"""Figures that do not hide what they show: lines that coincide, and axes that zoom in.

Shared by the training report and the simulator's figure (matplotlib-free: only the decisions).
Two series with the same values draw on top of each other and the one below disappears (MicroEP
and MicroEP-AR at max/mean 1.000, four layers at 1.000): `coinciding` finds them, `overlap_style`
draws each line a little thinner than the one before and with its own marker at staggered
positions, so every line stays visible, and `coincide_note` says in words which ones coincide.
`zoom_limits` cuts an axis to where the series differ instead of to the rare extremes, and
`crowded_window` finds the stretch a zoomed inset should show when most series crowd into a small
part of it (balancers near the bound of 1.0, next to plain EP far above).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", "-.", ":")


def coinciding(series: Mapping[str, npt.ArrayLike], *, rtol: float = 1e-6) -> list[list[str]]:
    """Groups (two or more names, in the mapping's order) of series equal everywhere within
    `rtol` (NaN equal to NaN); series of different lengths never coincide."""
    names = list(series)
    arrays = {n: np.asarray(series[n], dtype=np.float64) for n in names}
    groups: list[list[str]] = []
    placed: set[str] = set()
    for i, a in enumerate(names):
        if a in placed:
            continue
        group = [a]
        for b in names[i + 1 :]:
            x, y = arrays[a], arrays[b]
            if (
                b not in placed
                and x.shape == y.shape
                and np.allclose(x, y, rtol=rtol, atol=0, equal_nan=True)
            ):
                group.append(b)
        if len(group) > 1:
            groups.append(group)
            placed.update(group)
    return groups


def coincide_note(groups: Sequence[Sequence[str]]) -> str:
    """'identical: microep = microep-ar; layer 0 = layer 1' ('' when nothing coincides)."""
    if not groups:
        return ""
    return "identical: " + "; ".join(" = ".join(g) for g in groups)


def overlap_style(index: int, count: int, *, points: int) -> dict[str, object]:
    """matplotlib line keywords for series `index` of `count` on one axis with `points` points:
    the first drawn widest and with the largest markers, each later one thinner, smaller and on
    top, so lines and points that coincide all remain visible (concentric markers; on long lines
    the markers of different series also sit at staggered positions)."""
    shrink = (count - 1 - index) / max(count - 1, 1)  # 1 for the first series, 0 for the last
    style: dict[str, object] = {
        "lw": 1.0 + 2.0 * shrink,
        "marker": MARKERS[index % len(MARKERS)],
        "ms": 3.0 + 6.0 * shrink,
        "mfc": "none",  # hollow: a marker drawn on top of another leaves the one below visible
        "mew": 1.2,
        "zorder": 2 + index,
    }
    if points > 24:
        every = points // 12
        style["markevery"] = ((index * every) // max(count, 1), every)
    return style


def crowded_window(values: Sequence[npt.ArrayLike], *, share: float = 0.9) -> tuple[float, float] | None:
    """An x window for a zoomed inset of distributions: from the smallest value to the median,
    over the series, of each one's `share` quantile, i.e. where half of the series keep most of
    their samples. None unless that window is under half of the full range (no zoom needed)."""
    finite = [v[np.isfinite(v)] for v in (np.asarray(s, dtype=np.float64).ravel() for s in values)]
    finite = [v for v in finite if v.size]
    if len(finite) < 2:
        return None
    low = min(float(v.min()) for v in finite)
    full = max(float(v.max()) for v in finite) - low
    high = float(np.median([np.quantile(v, share) for v in finite]))
    if full <= 0 or high - low >= full / 2:
        return None
    span = max(high - low, full * 0.01)
    return low - 0.05 * span, low + 1.1 * span


def zoom_limits(
    values: Sequence[npt.ArrayLike], *, quantile: float = 0.99, pad: float = 0.05
) -> tuple[float, float] | None:
    """(low, high) axis limits over the finite values of every series: from the smallest value
    to the largest series' `quantile` (so a rare worst case does not squash the range where the
    series differ), padded by `pad` of the span; None when there is nothing finite to show."""
    finite = [v[np.isfinite(v)] for v in (np.asarray(s, dtype=np.float64).ravel() for s in values)]
    finite = [v for v in finite if v.size]
    if not finite:
        return None
    low = min(float(v.min()) for v in finite)
    high = max(float(np.quantile(v, quantile)) for v in finite)
    span = high - low
    if span <= 0:
        span = max(abs(low), 1.0) * 0.01
    return low - pad * span, high + pad * span
