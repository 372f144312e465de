"""What `micromoe simulate` prints when not on a terminal: periodic one-line progress, nothing with
--no-progress."""

from __future__ import annotations

import logging

import pytest

from micromoe.cli import main
from micromoe.sim import progress
from micromoe.sim.progress import LineProgress, make_progress

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
