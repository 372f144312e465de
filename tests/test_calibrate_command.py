"""`micromoe calibrate` as a user meets it: output paths and values checked before any
measurement, the device it measures named (plainly when it falls back to the CPU), progress
lines when not on a terminal, and the whole command within --budget-s (+10%) as the user's clock
sees it, or an early failure that says the budget is too small."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from micromoe.cli import main
from micromoe.plan.cost import load

SMALL = ["--hidden", "64", "--ffn", "128"]


def _calibrate(*argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "micromoe", "calibrate", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - start


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{tmp}", "is a directory"),
        ("{tmp}/missing/model.json", "does not exist; create it first"),
        ("/proc/model.json", "cannot be written"),
        ("/proc/version", "cannot be written"),
    ],
)
def test_an_unwritable_out_is_refused_before_measuring(capsys, tmp_path, out, message):
    start = time.monotonic()
    assert main(["calibrate", *SMALL, "--out", out.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("micromoe calibrate: error: --out ") and message in err, err
    assert "timing expert GEMMs" not in err and time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget-s", "nan"], "--budget-s must be a finite number"),
        (["--budget-s", "inf"], "--budget-s must be a finite number"),
        (["--budget-s", "-3"], "--budget-s must be a finite number of seconds > 0"),
        (["--reps", "0"], "--reps must be a positive integer"),
        (["--hidden", "0"], "--hidden must be a positive integer"),
        (["--rows", "4,64"], "--rows must be >= 8"),
        (["--hidden", "1000000", "--ffn", "1000000"], "needs at least"),
    ],
)
def test_bad_values_are_refused_before_measuring(capsys, tmp_path, argv, message):
    assert main(["calibrate", *SMALL, "--out", str(tmp_path / "m.json"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_samples_out_may_not_be_the_model_file(capsys, tmp_path):
    out = str(tmp_path / "m.json")
    assert main(["calibrate", *SMALL, "--out", out, "--samples-out", out]) == 2
    assert "is also --out" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back to the CPU")
@pytest.mark.timeout(120)
def test_the_command_stays_within_its_budget_and_says_where_it_measures(tmp_path):
    budget = 8.0
    done, wall = _calibrate(*SMALL, "--budget-s", str(budget), "--out", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    assert wall <= 1.1 * budget, f"{wall:.1f} s for --budget-s {budget:g}"
    assert "on the CPU (float32, one thread)" in done.stderr and "no CUDA device found" in done.stderr
    assert "samples, " in done.stderr, "a progress line when stderr is not a terminal"
    assert done.stdout.startswith("cpu 64x128: ") and load(tmp_path / "m.json").meta["hidden"] == 64


@pytest.mark.timeout(120)
def test_a_budget_too_small_for_a_fit_fails_early_naming_the_budget(tmp_path):
    budget = 4.0
    argv = ["--hidden", "512", "--ffn", "1024", "--device", "cpu", "--budget-s", str(budget)]
    done, wall = _calibrate(*argv, "--out", str(tmp_path / "m.json"))
    assert done.returncode == 2 and "micromoe calibrate: error: --budget-s 4: " in done.stderr, done.stderr
    assert "give more time" in done.stderr and wall <= 1.1 * budget + 1.0
    assert not Path(tmp_path / "m.json").exists()
