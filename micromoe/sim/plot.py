"""Figures of a simulation (matplotlib, Agg backend: no display needed).

One row of panels for max/mean GPU load, and with a cost model a second row for the predicted
slowest-GPU expert time (what a step waits for): (1) its distribution per balancer (ECDF over all
(micro-batch, layer) samples); (2) its mean per layer; (3) with several workloads, its mean per
workload (against the Zipf exponent for --zipf runs: the paper's balance figure).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from micromoe.plot_style import coincide_note, coinciding, crowded_window, overlap_style, zoom_limits
from micromoe.sim.metrics import Samples
from micromoe.sim.runner import WorkloadResult, pooled

STYLE = {
    "ep": ("tab:red", "o"),
    "eplb": ("tab:orange", "s"),
    "lplb": ("tab:purple", "^"),
    "microep": ("tab:blue", "D"),
    "microep-ar": ("tab:green", "v"),
    "bound": ("black", ""),
}


def plot_results(
    results: list[WorkloadResult],
    num_gpus: int,
    path: str | Path,
    *,
    x_values: list[float] | None = None,
    x_label: str = "workload",
    title: str = "",
    layer_ids: list[int] | None = None,
    timed: bool = False,
) -> None:
    """Write the figure to `path` (format from its suffix, e.g. .png, .pdf, .svg).

    layer_ids: the per-layer panel's x values (a routing log's own layer ids; default 0..L-1).
    timed: the run had a cost model: add the row of predicted slowest-GPU time.
    Samples without tokens (NaN ratio) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = len(results) > 1
    rows = [("max / mean GPU load", "max/mean", lambda s: s.ratios(num_gpus))]
    if timed:
        rows.append(("predicted slowest-GPU expert time (ms)", "time", _time_ms))
    fig, axes = plt.subplots(
        len(rows), 3 if multi else 2, figsize=(16 if multi else 11, 4.2 * len(rows)), squeeze=False
    )
    for ax_row, (label, short, metric) in zip(axes, rows, strict=True):
        _metric_row(ax_row, results, metric, label, short, x_values, x_label, layer_ids)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _time_ms(s: Samples) -> np.ndarray:
    """Predicted slowest-GPU time in ms [M, L] (NaN for samples without tokens)."""
    return np.where(s.total > 0, s.time_max_us / 1e3, np.nan)


def _metric_row(
    axes,
    results: list[WorkloadResult],
    metric: Callable[[Samples], np.ndarray],
    label: str,
    short: str,
    x_values: list[float] | None,
    x_label: str,
    layer_ids: list[int] | None,
) -> None:
    """One row of panels for `metric` (Samples -> float [M, L]): ECDF, per layer, per workload."""
    from matplotlib.ticker import MaxNLocator

    multi = len(results) > 1
    values = {name: metric(s) for name, s in pooled(results).items()}  # name -> [M, L]
    count = len(values)
    ecdf = {name: np.sort(v.ravel()[np.isfinite(v.ravel())]) for name, v in values.items()}
    layers = {name: _nanmean(v, axis=0) for name, v in values.items()}
    workloads = {name: [_nanmean(metric(r_.samples[name])) for r_ in results] for name in values}
    for i, (name, r) in enumerate(ecdf.items()):
        color, _ = STYLE.get(name, ("gray", "x"))
        style = overlap_style(i, count, points=r.size)
        axes[0].step(
            r, np.arange(1, r.size + 1) / max(r.size, 1), where="post", color=color, label=name, **style
        )
        per_layer = layers[name]
        if per_layer.size > 1:
            xs = (
                layer_ids
                if layer_ids is not None and len(layer_ids) == per_layer.size
                else range(per_layer.size)
            )
            axes[1].plot(
                list(xs), per_layer, color=color, label=name, **overlap_style(i, count, points=per_layer.size)
            )
        else:
            axes[1].bar(name, per_layer[0], color=color)
        if multi:
            xs = x_values if x_values is not None else list(range(len(results)))
            axes[2].plot(
                xs, workloads[name], color=color, label=name, **overlap_style(i, count, points=len(xs))
            )
    _zoom_distribution(axes[0], ecdf)
    axes[0].set(xlabel=label, ylabel="share of (micro-batch, layer) samples <= x")
    axes[0].set_title(_titled(f"distribution of {short}", coincide_note(coinciding(ecdf))), fontsize=9)
    axes[1].set(xlabel="layer", ylabel=f"mean {label}")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_title(_titled("per layer", coincide_note(coinciding(layers))), fontsize=9)
    if multi:
        axes[2].set(xlabel=x_label, ylabel=f"mean {label}")
        axes[2].set_title(_titled(f"by {x_label}", coincide_note(coinciding(workloads))), fontsize=9)
        if x_values is None:
            axes[2].set_xticks(range(len(results)), [r.name for r in results], rotation=20, fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # the distribution panel holds the zoomed inset


def _zoom_distribution(ax, ecdf: dict[str, np.ndarray]) -> None:
    """Zoom the distribution's x axis to where the balancers differ: up to each one's 99th
    percentile (the note names the worst values left out), plus an inset magnifying the stretch
    where most of them crowd (near the bound) when that is a small part of the axis."""
    limits = zoom_limits(list(ecdf.values()))
    if limits is not None:
        ax.set_xlim(*limits)
        beyond = [f"{n} {r[-1]:.3g}" for n, r in ecdf.items() if r.size and r[-1] > limits[1]]
        if beyond:
            _note(ax, "cut at the 99th percentile; worst: " + ", ".join(beyond))
    window = crowded_window(list(ecdf.values()))
    if window is None:
        return
    inset = ax.inset_axes([0.52, 0.1, 0.45, 0.45])
    for i, (name, r) in enumerate(ecdf.items()):
        inset.step(r, np.arange(1, r.size + 1) / max(r.size, 1), where="post",
                   color=STYLE.get(name, ("gray", "x"))[0], **overlap_style(i, len(ecdf), points=r.size))  # fmt: skip
    inset.set_xlim(*window)
    inset.set_title("zoom", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.grid(alpha=0.3)


def _titled(title: str, note: str) -> str:
    """A panel title with the note on lines that coincide (drawn, but on top of each other)."""
    return f"{title}\n({note})" if note else title


def _note(ax, text: str) -> None:
    if text:
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, va="bottom", alpha=0.8)


def _nanmean(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean over samples with tokens; NaN (no warning) where there are none."""
    finite = np.isfinite(a)
    num = np.where(finite, a, 0.0).sum(axis=axis)
    den = finite.sum(axis=axis)
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)
