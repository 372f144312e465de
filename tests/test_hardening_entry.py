"""Entry points: `python -m micromoe` and `micromoe --version`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import micromoe
from micromoe.cli import main


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"micromoe {micromoe.__version__}"


def test_python_dash_m_runs_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "micromoe", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"micromoe {micromoe.__version__}"


def test_python_dash_m_without_a_command_prints_help() -> None:
    out = subprocess.run([sys.executable, "-m", "micromoe"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "usage: micromoe" in out.stdout and "simulate" in out.stdout
