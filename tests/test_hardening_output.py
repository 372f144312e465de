"""What `micromoe simulate` prints when not on a terminal: periodic one-line progress, nothing with
--no-progress."""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction

import numpy as np
import pytest

from micromoe.cli import main
from micromoe.sim import progress
from micromoe.sim.balancers import GroupConfig, make_balancers
from micromoe.sim.progress import LineProgress, make_progress
from micromoe.sim.runner import simulate
from micromoe.sim.workload import workload_from_zipf

ARGS = ["simulate", "--zipf", "1", "--experts", "16", "--layers", "1", "--micro-batches", "3"]
ARGS += ["--tokens-per-gpu", "64", "--balancers", "ep,bound"]


def test_line_progress_logs_at_most_every_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="micromoe.sim")
    bar = LineProgress(total=4, every_s=0.0)
    bar.set_postfix_str("zipf s=1")
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("simulate: 1/4 micro-batches (25%), zipf s=1, ")
    assert lines[-1].startswith("simulate: 4/4 micro-batches (100%)")
    assert len(lines) == 5  # four updates and the close
    caplog.clear()
    slow = LineProgress(total=4, every_s=3600.0)
    for _ in range(4):
        slow.update(1)
    slow.close()
    assert [r.getMessage()[:30] for r in caplog.records] == ["simulate: 4/4 micro-batches (1"]


def test_not_a_terminal_means_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: False)
    assert isinstance(make_progress(10, None), LineProgress)
    assert not isinstance(make_progress(10, False), LineProgress)
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
    assert not isinstance(make_progress(10, None), LineProgress)


def test_piped_cli_prints_progress_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="micromoe.sim")
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    assert main(ARGS) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("simulate: 3/3 micro-batches (100%), zipf s=1") for m in messages), messages
    assert "micro-batches (" not in capsys.readouterr().out  # progress never mixes into the results
    caplog.clear()
    assert main([*ARGS, "--no-progress"]) == 0
    assert not any("micro-batches (" in r.getMessage() for r in caplog.records)


def _brute_force_opt(loads: np.ndarray, hosts_GE: np.ndarray) -> int:
    """ceil(max over GPU sets S of (load of experts hosted only inside S) / |S|), by enumeration."""
    g = hosts_GE.shape[0]
    best = Fraction(0)
    for k in range(1, g + 1):
        for subset in itertools.combinations(range(g), k):
            outside = np.ones(g, dtype=bool)
            outside[list(subset)] = False
            inside = ~hosts_GE[outside].any(axis=0)
            best = max(best, Fraction(int(loads[inside].sum()), k))
    return -(-best.numerator // best.denominator)


def test_own_optimum_is_the_placements_lp_optimum() -> None:
    """The report's "own opt" against an independent enumeration of GPU sets, per sample."""
    w = workload_from_zipf(
        1.2, num_experts=8, num_layers=2, num_micro_batches=3, num_gpus=4, tokens_per_gpu=50, top_k=2,
        noise=0.2, drift=0.2, seed=1,
    )  # fmt: skip
    cfg = GroupConfig(num_gpus=4, replicas=2)
    names = ["ep", "eplb", "lplb", "microep", "bound"]
    (result,) = simulate([w], names, cfg, progress=False)
    balancers = {b.name: b for b in make_balancers(names, cfg)}
    for b in balancers.values():
        b.setup(w)
    for name in ("eplb", "lplb"):
        s = result.samples[name]
        for m in range(w.num_micro_batches):
            for l in range(w.num_layers):
                hosts = balancers[name].placement(l).slot_expert >= 0  # [G, E]: expert e in slot e
                loads = w.counts[m, l].sum(axis=0)
                assert s.own_opt[m, l] == _brute_force_opt(loads, hosts), (name, m, l)
                assert result.samples["bound"].max_load[m, l] <= s.own_opt[m, l] <= s.max_load[m, l]
    for name in ("ep", "microep"):
        np.testing.assert_array_equal(result.samples[name].own_opt, result.samples[name].max_load)
