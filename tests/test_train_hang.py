"""A stalled or dead rank ends `micromoe train` within --timeout plus a few seconds, with one line
that names that rank (not a healthy rank's "connection closed" traceback).

The job runs as `micromoe train --nproc 2` in its own process group; once it logs steps, one rank
(found among the launcher's children, which start in rank order) is stopped (SIGSTOP) or killed
(SIGKILL). Then the launcher's rules for composing that line, on made-up rank reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micromoe.errors import CommandError
from micromoe.train.launch import _raise_failure

TIMEOUT_S = 5.0
BOUND_S = TIMEOUT_S + 12.0  # the timeout, the stall probe (5 s), the launcher's grace (2 s), slack
TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn-hidden", "16", "--seq-len", "8"]
TINY += ["--micro-batch", "2", "--eval-interval", "0", "--no-report", "--no-save", "--nproc", "2"]


def _ranks(launcher: int) -> list[int]:
    """The spawned ranks' pids, in rank order (torch starts them one after another)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = [int(c) for c in children if b"--multiprocessing-fork" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return sorted(ranks)


def _run_and_hit(tmp_path: Path, rank: int, sig: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job, wait for training steps, send `sig` to `rank`; returns the job's result and
    the seconds from the signal to the job's end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "micromoe", "train", *TINY, "--max-steps", "100000"]
    cmd += ["--log-interval", "1", "--timeout", str(TIMEOUT_S), "--out", str(out)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        log = out / "log.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-2000:]
            time.sleep(0.05)
        pids = _ranks(job.pid)
        assert len(pids) == 2
        os.kill(pids[rank], sig)
        hit = time.monotonic()
        stdout, stderr = job.communicate(timeout=120)
        elapsed = time.monotonic() - hit
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        else:
            try:
                os.killpg(job.pid, signal.SIGKILL)  # any rank it left behind
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, job.returncode, stdout.decode(), stderr.decode()), elapsed


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_is_named_within_the_timeout(tmp_path, stopped):
    done, elapsed = _run_and_hit(tmp_path, stopped, signal.SIGSTOP)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = _error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"micromoe train: error: rank {stopped} stopped responding"), errors
    assert f"timed out waiting for it (rank {1 - stopped}: a collective did not complete" in errors[0]
    assert elapsed < BOUND_S, f"the job ended {elapsed:.1f} s after the stall"


@pytest.mark.timeout(300)
def test_a_dead_rank_is_named(tmp_path):
    done, elapsed = _run_and_hit(tmp_path, 1, signal.SIGKILL)
    errors = _error_lines(done.stderr)
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0] == "micromoe train: error: rank 1 died (signal SIGKILL); the other ranks were stopped"
    assert elapsed < BOUND_S


def _reports(tmp_path: Path, **by_rank: str) -> Path:
    for name, text in by_rank.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return tmp_path


def test_a_user_error_wins_over_the_stalls_it_caused(tmp_path):
    reports = _reports(tmp_path, rank1="error\n--foo is bad", rank0="stall\nrank 0: a collective ...")
    with pytest.raises(ValueError, match="^--foo is bad$"):
        _raise_failure(reports, [3, 2, 0], set())


def test_a_rank_that_died_by_itself_is_named_before_the_ranks_killed_after_it(tmp_path):
    reports = _reports(tmp_path, rank0="stall\nrank 0: closed")
    with pytest.raises(CommandError, match="^rank 2 died \\(exit status 7\\)"):
        _raise_failure(reports, [3, -9, 7], {1})


def test_a_crash_keeps_its_traceback(tmp_path):
    reports = _reports(tmp_path, rank1="crash\nTraceback (most recent call last):\nZeroDivisionError")
    with pytest.raises(RuntimeError, match="rank 1 failed:\nTraceback") as err:
        _raise_failure(reports, [0, 1], set())
    assert not isinstance(err.value, CommandError)


def test_several_stalled_ranks_are_all_named(tmp_path):
    reports = _reports(tmp_path, rank0="stall\nrank 0: a collective did not complete; x", rank3="stall\nr3")
    with pytest.raises(CommandError, match="^ranks 1, 2 stopped responding .*ranks 0, 3 timed out"):
        _raise_failure(reports, [3, -9, -9, 3], {1, 2})
