"""benchmarks/bench_startup_calibration.py on CPU: a fresh process per shape, two calibrations each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_startup_calibration.py"


def test_fresh_process_calibration_report(tmp_path):
    out = tmp_path / "startup.json"
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "16x32", "--slots", "2"]
    done = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["env"]["device"] == "cpu" and report["env"]["torch"]
    [row] = report["rows"]
    assert (row["hidden"], row["ffn"], row["slots"]) == (16, 32, 2)
    assert [c["when"] for c in row["calls"]] == ["first CUDA work", "warm"]
    for call in row["calls"]:
        assert call["samples"] >= 12  # the calibration's minimum, whatever the budget
        assert 0 <= call["startup_s"] <= call["wall_s"]
        assert 0 <= call["heldout_median_err"] < 1
    assert "16x32" in done.stdout and "warm" in done.stdout  # the printed table
