"""The example scripts run as documented (torchrun, 4 CPU processes with gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_microep_layer_example():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        f"--master_port={free_port()}",
        str(ROOT / "examples" / "microep_layer.py"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3
    for line in steps:  # heavy skew in, (near-)perfect balance out
        hottest = float(line.split("hottest expert ")[1].split("x")[0])
        balance = float(line.rsplit(" ", 1)[1])
        assert hottest > 2.0 and 1.0 <= balance <= 1.02, line
