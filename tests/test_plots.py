"""Figures that do not hide what they show: coinciding lines stay visible and are named, the
distribution zooms where the balancers differ, and the throughput plot leaves out the one-time
set-up step of each process."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from micromoe.plot_style import coinciding, crowded_window, overlap_style, zoom_limits  # noqa: E402
from micromoe.sim import plot as sim_plot  # noqa: E402
from micromoe.sim.balancers import GroupConfig  # noqa: E402
from micromoe.sim.runner import simulate  # noqa: E402
from micromoe.sim.workload import workload_from_zipf  # noqa: E402
from micromoe.train.report import write_report  # noqa: E402


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the code under test saves (kept open instead of closed)."""
    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=1, max_size=5),
    copies=st.lists(st.integers(0, 4), min_size=0, max_size=4),
)
def test_coinciding_finds_exactly_the_equal_series(base, copies):
    series = {f"s{i}": np.array(v, dtype=float) for i, v in enumerate(base)}  # equal, or 1 apart
    for j, c in enumerate(copies):
        if c < len(base):
            series[f"copy{j}"] = np.array(base[c], dtype=float)
    groups = coinciding(series)
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)), "a series is in one group at most"
    for g in groups:
        assert all(np.array_equal(series[g[0]], series[n]) for n in g)
    for a in series:
        for b in series:
            if a < b and np.array_equal(series[a], series[b]):
                assert any(a in g and b in g for g in groups), (a, b)


@pytest.mark.parametrize("points", [4, 500])
def test_later_lines_are_thinner_with_smaller_hollow_markers(points):
    styles = [overlap_style(i, 5, points=points) for i in range(5)]
    assert all(a["lw"] > b["lw"] and a["ms"] > b["ms"] for a, b in zip(styles, styles[1:], strict=False))
    assert len({s["marker"] for s in styles}) == 5 and all(s["mfc"] == "none" for s in styles)
    if points > 24:  # long lines: the markers of different series sit at different positions
        assert len({s["markevery"][0] for s in styles}) == 5


def test_zoom_limits_keep_the_smallest_value_and_cut_rare_extremes():
    rng = np.random.default_rng(0)
    tame, wild = 1 + rng.random(1000) * 0.1, np.r_[1 + rng.random(999) * 0.2, 50.0]
    low, high = zoom_limits([tame, wild])
    assert low < 1.0 and 1.2 < high < 2
    assert zoom_limits([np.array([np.nan])]) is None


def test_crowded_window_only_when_most_series_crowd():
    near = [np.linspace(1.0, 1.05, 50), np.linspace(1.0, 1.1, 50), np.full(50, 1.0)]
    window = crowded_window([*near, np.linspace(1.0, 4.0, 50)])
    assert window is not None and window[0] < 1.0 and 1.05 < window[1] < 1.5
    assert crowded_window([np.linspace(1, 4, 50), np.linspace(1.5, 4, 50)]) is None


def test_simulate_figure_names_coinciding_balancers_and_zooms(tmp_path, figures):
    w = workload_from_zipf(
        0.0, num_experts=16, num_layers=2, num_micro_batches=8, num_gpus=4, tokens_per_gpu=256, top_k=2, seed=0,
        noise=0.0, drift=0.0,
    )  # fmt: skip
    results = simulate(
        [w], ["ep", "microep", "microep-ar", "bound"], GroupConfig(num_gpus=4, replicas=2), progress=False
    )
    sim_plot.plot_results(results, 4, tmp_path / "f.png")
    (fig,) = figures
    titles = " ".join(ax.get_title() for ax in fig.axes)
    ar, bound = results[0].samples["microep-ar"], results[0].samples["bound"]
    assert np.array_equal(ar.ratios(4), bound.ratios(4)), (
        "uniform routing: both MicroEP variants reach the bound"
    )
    assert "identical: microep = microep-ar = bound" in titles
    lines = [ln for ln in fig.axes[1].get_lines() if ln.get_label() in ("microep", "microep-ar", "bound")]
    assert len(lines) == 3 and len({ln.get_linewidth() for ln in lines}) == 3, "each drawn, thinner on top"
    assert (tmp_path / "f.png").stat().st_size > 0


def _records(steps: int) -> list[dict]:
    out = []
    for s in range(steps):
        rec = {"step": s, "loss": 3.0 - s * 0.01, "tokens_per_s": 5000.0 + s, "max_mean_load": 1.0}
        rec |= {
            "ep_max_mean_load": 1.2,
            "layer_max_mean_load": [1.0, 1.0],
            "layer_ep_max_mean_load": [1.3, 1.1],
        }
        rec |= {"sched_us": 100.0}
        out.append(rec)
    out[0] |= {"cold": True, "compile_s": 3.0, "tokens_per_s": 10.0}  # the one-time set-up step
    out[20] |= {"cold": True, "compile_s": 0.3, "tokens_per_s": 12.0}  # a resumed process's first step
    return out


def test_train_report_leaves_out_cold_steps_and_names_identical_layers(tmp_path, figures):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(40)))
    write_report(Path(tmp_path))
    loss, balance, throughput = figures
    ys = throughput.axes[0].get_lines()[0].get_ydata()
    assert len(ys) == 38 and min(ys) >= 5000, "the two cold steps are left out"
    assert "left out: 2" in throughput.axes[0].get_title()
    notes = [t.get_text() for t in balance.axes[0].texts]
    assert any("identical: layer 0 = layer 1" in n for n in notes)
