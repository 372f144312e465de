"""Logs survive a crash: after a SIGKILL of the whole job `log.jsonl` and the routing log hold
every step up to the newest checkpoint, and a resume continues them with no duplicate and no gap,
whatever torn line the crash left at their end.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micromoe.train.loop import open_log
from micromoe.train.report import read_log, summary_line

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn-hidden", "16", "--seq-len", "8"]
TINY += ["--micro-batch", "2", "--eval-interval", "0", "--no-report", "--nproc", "2"]
CKPT = 3


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _latest_step(out: Path) -> int | None:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.timeout(400)
def test_a_killed_job_resumes_its_logs_without_gap_or_duplicate(tmp_path):
    out, routing = tmp_path / "run", tmp_path / "routing.jsonl"
    cmd = [sys.executable, "-m", "micromoe", "train", *TINY, "--out", str(out)]
    cmd += ["--record-routing", str(routing), "--ckpt-interval", str(CKPT)]
    job = subprocess.Popen(
        [*cmd, "--max-steps", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes the launcher and its ranks
    )
    deadline = time.monotonic() + 240
    try:
        while (_latest_step(out) or 0) < 2 * CKPT and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=60)
    saved = _latest_step(out)
    assert saved is not None and saved >= 2 * CKPT, err.decode()[-2000:]
    logged = _steps(out / "log.jsonl")
    assert logged[:saved] == list(range(saved)), "every step up to the checkpoint is in the log"
    assert sorted(set(_steps(routing)))[:saved] == list(range(saved)), "and in the routing log"
    for path in (out / "log.jsonl", routing):  # the crash tore a write
        with path.open("a") as fp:
            fp.write('{"step": 99, "lo')
    final = saved + 2
    done = subprocess.run(
        [*cmd, "--resume", "--max-steps", str(final)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(out / "log.jsonl") == list(range(final))
    assert _steps(routing) == list(range(final)), "one record per step (1 layer, 1 micro-batch)"
    assert done.stdout.startswith(f"done: {final} steps"), "the summary covers the whole run"


def _write_log(path: Path, steps: int, tail: str) -> None:
    lines = "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(steps))
    path.write_text(lines + tail)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.integers(0, 12),
    start=st.integers(1, 15),
    tail=st.one_of(
        st.just(""),
        st.text(alphabet='{}"step: 0123456789,.', max_size=12),  # a torn last write
        st.integers(0, 30).map(lambda s: json.dumps({"step": s})),  # a record without its newline
    ),
)
def test_open_log_keeps_exactly_the_steps_before_the_resume(tmp_path_factory, steps, start, tail):
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    _write_log(path, steps, tail)
    with open_log(path, start) as fp:
        fp.write(json.dumps({"step": start}) + "\n")
    kept = _steps(path)
    try:  # the tail may happen to be a whole record (only its newline missing): then it stays
        record = json.loads(tail)
        extra = [record["step"]] if isinstance(record, dict) and type(record.get("step")) is int else []
    except ValueError:
        extra = []
    expected = list(itertools.takewhile(lambda s: s < start, [*range(steps), *extra]))
    assert kept == [*expected, start]


def test_open_log_names_the_file_and_line_of_a_damaged_record(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl' line 2 is not a log record"):
        open_log(path, 3)
    path.write_text('{"step": 0}\n{"loss": 1}\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a log record"):
        open_log(path, 3)


def test_a_fresh_run_starts_the_log_empty(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_log(path, 5, "")
    open_log(path, 0).close()
    assert path.read_text() == ""


def test_the_report_reads_a_log_with_a_torn_last_line(tmp_path):
    rec = {"step": 0, "loss": 2.0, "max_mean_load": 1.0, "ep_max_mean_load": 1.2, "tokens_per_s": 10.0}
    (tmp_path / "log.jsonl").write_text(json.dumps(rec) + '\n{"step": 1, "lo')
    assert [r["step"] for r in read_log(tmp_path)] == [0]
    assert summary_line(read_log(tmp_path)).startswith("done: 1 steps")
    (tmp_path / "log.jsonl").write_text(json.dumps(rec) + '\n{"step": 1, "lo\n' + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_log(tmp_path)
