"""No run destroys another, and every output path is checked before anything starts.

Unit rules of `micromoe.train.outputs` (which OUT and routing paths a run may write, the lock that
keeps one run per OUT and does not outlive a killed holder), then the command: a bad path is one
error line with nothing started, a second run into a used OUT is refused, --overwrite replaces
only the run's own files.
"""

from __future__ import annotations

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

from micromoe.cli import main
from micromoe.train.outputs import RUN_MARKERS, RunLock, check_run_outputs, clear_run, run_files

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn-hidden", "16", "--seq-len", "8"]
TINY += ["--micro-batch", "2", "--max-steps", "2", "--eval-interval", "0", "--no-report"]
NONE: dict[str, Path | None] = {}


def _check(out: Path, routing: Path | None = None, *, resume=False, overwrite=False, inputs=NONE) -> None:
    check_run_outputs(out, routing=routing, resume=resume, overwrite=overwrite, inputs=dict(inputs))


def _make_run(out: Path, markers: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in markers:
        if name == "checkpoints":
            (out / name / "step_00000002").mkdir(parents=True)
        else:
            (out / name).write_text('{"step": 0}\n')


# ------------------------------------------------------------------------------------------------
# OUT
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a folder"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "sub" / "run", "cannot be created: "),
        (lambda t: Path("/proc/micromoe-run"), "cannot be created (in '/proc')"),
        (lambda t: Path("/proc/self/run"), "cannot be created"),
        (lambda t: Path("/sys/micromoe-run"), "cannot be created (in '/sys')"),
    ],
)
def test_an_out_that_cannot_be_a_folder_is_refused(tmp_path, make, message):
    out = make(tmp_path)
    with pytest.raises(ValueError, match="^--out ") as err:
        _check(out)
    assert message in str(err.value) and str(out) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot be"):
            _check(tmp_path / "run")
    finally:
        tmp_path.chmod(0o755)


def test_checks_create_nothing(tmp_path):
    _check(tmp_path / "a" / "b" / "run", tmp_path / "routing.jsonl")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(markers=st.sets(st.sampled_from(RUN_MARKERS), min_size=1), extra=st.booleans())
def test_an_out_holding_any_part_of_a_run_needs_resume_or_overwrite(tmp_path_factory, markers, extra):
    out = tmp_path_factory.mktemp("out")
    _make_run(out, markers)
    if extra:
        (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds another run") as err:
        _check(out)
    assert all(m in str(err.value) for m in markers)
    _check(out, resume=True)
    _check(out, overwrite=True)
    with pytest.raises(ValueError, match="give one of them"):
        _check(out, resume=True, overwrite=True)


def test_an_out_with_unrelated_files_only_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / ".lock").write_text("123\n")  # a lock file left by a finished run means nothing
    _check(tmp_path)


def test_clear_run_removes_only_the_runs_own_files(tmp_path):
    _make_run(tmp_path, set(RUN_MARKERS))
    for name in ("report.md", "loss.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# the routing log
@pytest.mark.parametrize("name", [p.name for p in run_files(Path("OUT"))])
@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_routing_into_one_of_the_runs_own_files_is_refused_whatever_the_flags(tmp_path, name, flags):
    out = tmp_path / "out"
    if flags:  # a new run has no files yet; a resumed or overwritten one has them all
        _make_run(out, set(RUN_MARKERS))
    with pytest.raises(ValueError, match="^--record-routing .*run's own"):
        _check(out, out / name, **flags)


def test_routing_through_a_symlink_or_inside_checkpoints_is_refused(tmp_path):
    out = tmp_path / "out"
    _make_run(out, set(RUN_MARKERS))
    (tmp_path / "alias.jsonl").symlink_to(out / "log.jsonl")
    for routing in (tmp_path / "alias.jsonl", out / "checkpoints" / "r.jsonl", out / "." / "log.jsonl"):
        with pytest.raises(ValueError, match="run's own"):
            _check(out, routing, resume=True)


@pytest.mark.parametrize("flag", ["--data", "--cost-model"])
def test_routing_onto_an_input_is_refused(tmp_path, flag):
    data = tmp_path / "input.txt"
    data.write_text("precious")
    with pytest.raises(ValueError, match=f"this run's {flag} input"):
        _check(tmp_path / "out", data, overwrite=True, inputs={flag: data})
    assert data.read_text() == "precious"


def test_an_input_inside_the_runs_own_files_is_refused(tmp_path):
    out = tmp_path / "out"
    _make_run(out, {"log.jsonl"})
    with pytest.raises(ValueError, match="^--data .*files the run writes"):
        _check(out, resume=True, inputs={"--data": out / "log.jsonl"})


def test_an_existing_routing_log_needs_resume_or_overwrite(tmp_path):
    routing = tmp_path / "routing.jsonl"
    routing.write_text("")
    with pytest.raises(ValueError, match="already exists"):
        _check(tmp_path / "out", routing)
    _check(tmp_path / "out", routing, overwrite=True)
    _check(tmp_path / "out", routing, resume=True)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ("dir", "is a directory"),
        ("missing/r.jsonl", "does not exist; create it first"),
        ("/proc/version", "cannot be written"),
        ("/proc/micromoe.jsonl", "cannot be written"),
        ("/dev/null", "not a regular file"),
    ],
)
def test_a_routing_path_that_cannot_be_written_is_refused(tmp_path, routing, message):
    (tmp_path / "dir").mkdir()
    path = tmp_path / routing if not routing.startswith("/") else Path(routing)
    with pytest.raises(ValueError, match=message):
        _check(tmp_path / "out", path, overwrite=True)


# ------------------------------------------------------------------------------------------------
# the lock
def test_one_lock_per_out(tmp_path):
    with RunLock.claim(tmp_path):
        with pytest.raises(ValueError, match=f"in use by another micromoe train \\(pid {os.getpid()}\\)"):
            RunLock.claim(tmp_path)
    RunLock.claim(tmp_path).release()  # released: free again


def _holder(out: Path, mode: str) -> subprocess.Popen:
    """A process that claims (or joins, shared) OUT's lock, says so, and sleeps."""
    code = (
        "import sys, time; from pathlib import Path; from micromoe.train.outputs import RunLock; "
        f"lock = RunLock.{mode}(Path({str(out)!r})); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_killed_holder_leaves_no_false_lock(tmp_path):
    proc = _holder(tmp_path, "claim")
    try:
        with pytest.raises(ValueError, match=f"pid {proc.pid}"):
            RunLock.claim(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / ".lock").exists()  # the file stays; the lock went with the process
    RunLock.claim(tmp_path).release()


def test_a_rank_holding_the_lock_shared_keeps_the_out_busy_after_its_launcher_is_gone(tmp_path):
    launcher = RunLock.claim(tmp_path)
    launcher.share()
    rank = _holder(tmp_path, "join")
    launcher.release()  # the launcher died; its rank lives on
    try:
        with pytest.raises(ValueError, match="in use"):
            RunLock.claim(tmp_path)
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    RunLock.claim(tmp_path).release()


# ------------------------------------------------------------------------------------------------
# the command
def _train(capsys, *argv: str) -> tuple[int, str]:
    start = time.monotonic()
    code = main(["train", *TINY, *argv])
    return code, capsys.readouterr().err + f"\n[{time.monotonic() - start:.1f} s]"


@pytest.mark.parametrize("out", ["/proc/micromoe-run", "/sys/run", "{tmp}/file.txt", "{tmp}/file.txt/run"])
def test_a_bad_out_is_one_line_before_anything_starts(capsys, tmp_path, out):
    (tmp_path / "file.txt").write_text("x")
    code, err = _train(capsys, "--nproc", "2", "--out", out.format(tmp=tmp_path))
    lines = [line for line in err.splitlines() if line.startswith("micromoe train:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("micromoe train: error: --out "), err
    assert "Traceback" not in err and "compiling" not in err


def test_a_second_run_into_a_busy_out_is_refused(capsys, tmp_path):
    with RunLock.claim(tmp_path / "run"):
        code, err = _train(capsys, "--out", str(tmp_path / "run"))
    assert code == 2 and "is in use by another micromoe train" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_overwrite_replaces_the_old_run_and_keeps_other_files(capsys, tmp_path):
    out = tmp_path / "run"
    _make_run(out, set(RUN_MARKERS))
    (out / "log.jsonl").write_text('{"step": 7}\n{"step": 8}\n')
    (out / "notes.txt").write_text("mine")
    code, err = _train(capsys, "--out", str(out))
    assert code == 2 and "holds another run" in err
    assert (out / "checkpoints" / "step_00000002").exists()  # refused: nothing touched
    code, err = _train(capsys, "--out", str(out), "--overwrite", "--no-save")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / "checkpoints").exists() and (out / "notes.txt").read_text() == "mine"


def test_a_routing_log_that_is_the_runs_own_log_is_refused_by_the_command(capsys, tmp_path):
    out = tmp_path / "run"
    code, err = _train(capsys, "--out", str(out), "--record-routing", str(out / "log.jsonl"))
    assert code == 2 and "is the run's own log.jsonl" in err
    assert not out.exists()
