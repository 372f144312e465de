"""A first run explains itself: a short start-up summary and progress on stderr, results on stdout,
the full config only in config.json, a line before the kernels compile, the compile time kept out
of the scheduler time, no scheduler time for plain EP, and every adaptive-replacement check in the
log with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from micromoe.train.loop import replacement_checks

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn-hidden", "16", "--seq-len", "8"]
TINY += ["--micro-batch", "2", "--max-steps", "3", "--eval-interval", "0", "--no-save"]


def _train(out: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "micromoe", "train", *TINY, "--out", str(out), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_a_first_run_on_a_fresh_machine(tmp_path):
    """Empty kernel cache (as on a fresh machine): the compile is announced before it happens, kept
    out of the scheduler time and reported apart; the summary is short; results go to stdout."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    out = tmp_path / "run"
    done = _train(out, "--nproc", "2", env=env)
    err = done.stderr.splitlines()
    compiling = next(i for i, line in enumerate(err) if line.startswith("compiling kernels (one time"))
    started = next(i for i, line in enumerate(err) if line.startswith("micromoe train: tiny on CPU, 2 ranks"))
    assert compiling < started, "the compile line comes before the ranks start"
    assert any(line.startswith("kernels compiled in ") for line in err)
    assert max(len(line) for line in err) < 200, "no line dumps the whole config"
    assert any(line.startswith("memory per rank (plan): ") for line in err)
    assert any(line.startswith("model: 1 layer (1 MoE, 8 experts, top-2)") for line in err)
    assert done.stdout.startswith("done: 3 steps") and "report: " in done.stdout
    assert "done: " not in done.stderr and "step 3/3" not in done.stdout, "results out, progress err"
    log = _log(out)
    assert log[0]["cold"] is True and log[0]["compile_s"] > 1.0, "the compile is reported apart"
    assert all("cold" not in r for r in log[1:]) and all(r["sched_us"] < 1e5 for r in log[1:])
    assert "kernels compiled or loaded once in " in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["precision"]["master_weights"] == "fp32" and config["train"]["precision"] == "auto"
    assert config["device"] == "cpu"


@pytest.mark.timeout(300)
def test_plain_ep_reports_no_scheduler_time(tmp_path):
    done = _train(tmp_path / "ep", "--nproc", "2", "--dispatcher", "ep", "--no-report")
    assert all(r["sched_us"] is None and r["sched_us_step"] is None for r in _log(tmp_path / "ep"))
    assert "scheduler" not in done.stdout and "| sched" not in done.stderr


def test_every_replacement_check_of_the_step_is_logged_with_its_reason():
    checks = [
        {"step": 4, "micro_batch": 0, "layer": 0, "realized": 1.3, "replace": True, "reason": "interval check; x"},
        {"step": 4, "micro_batch": 0, "layer": 1, "realized": 1.0, "replace": False, "reason": "kept: 1.0 <= 1.05"},
        {"step": 4, "micro_batch": 1, "layer": 1, "realized": 1.0, "replace": False, "reason": "no check due"},
        {"step": 4, "micro_batch": 1, "layer": 0, "realized": 1.2, "replace": False, "reason": "cooldown: 1 <= 4"},
        {"step": 3, "micro_batch": 0, "layer": 0, "realized": 1.1, "replace": False, "reason": "kept: old"},
    ]  # fmt: skip
    run = SimpleNamespace(replacer=SimpleNamespace(checks=checks))
    got = replacement_checks(run, 4)
    assert [(c["layer"], c["replace"], c["reason"]) for c in got] == [
        (0, True, "interval check; x"),
        (1, False, "kept: 1.0 <= 1.05"),
    ]
    assert replacement_checks(SimpleNamespace(replacer=object()), 4) == []  # replacement off
