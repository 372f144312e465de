"""`micromoe simulate` end to end: the default run, JSON and plot outputs, seeds, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from micromoe.cli import main
from micromoe.sim.traces import write_routing_record

SMALL = ["--micro-batches", "3", "--tokens-per-gpu", "256", "--no-progress"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["simulate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_run_prints_every_balancer(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["--no-progress"], capsys)
    assert rc == 0
    assert "counts57b.json" in out and "gpus=8" in out and "replicas=2" in out
    for name in ("ep", "eplb", "lplb", "microep", "microep-ar", "bound"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name


def _results(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for w in [doc, *doc["workloads"]]:
        for r in w["results"].values():  # timings differ run to run; everything else must not
            r.pop("sched_us_median")
            r.pop("sched_us_p99")
        assert w["results"]["bound"]["remote_share"] is None
    return doc


def test_json_plot_and_seed_determinism(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--zipf", "0.5,1.5", "--experts", "16", "--layers", "2", "--gpus-per-node", "4", *SMALL]
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    png = tmp_path / "fig.png"
    assert _run([*base, "--seed", "3", "--json", str(a), "--plot", str(png)], capsys)[0] == 0
    assert _run([*base, "--seed", "3", "--json", str(b)], capsys)[0] == 0
    assert _run([*base, "--seed", "4", "--json", str(c)], capsys)[0] == 0
    ra, rb, rc = _results(a), _results(b), _results(c)
    assert ra == rb
    assert ra["results"] != rc["results"]
    assert ra["config"]["zipf"] == [0.5, 1.5] and ra["config"]["seed"] == 3
    keys = {"mean_ratio", "p50_ratio", "p99_ratio", "max_ratio", "at_bound", "remote_share"}
    for name, r in ra["results"].items():
        assert keys <= set(r), name
        assert r["max_ratio"] >= r["p99_ratio"] >= r["p50_ratio"] >= 1.0 - 1e-12
        if name != "bound":  # the bound has no routing, hence no traffic
            assert 0.0 <= r["node_remote_share"] <= r["remote_share"] <= 1.0
    assert [w["name"] for w in ra["workloads"]] == ["zipf s=0.5", "zipf s=1.5"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replays_a_routing_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    log = tmp_path / "routing.jsonl"
    with log.open("w") as fp:
        for step in range(3):
            for layer in range(2):
                write_routing_record(fp, step=step, layer=layer, counts=rng.integers(0, 40, size=(4, 8)))
    out_json = tmp_path / "r.json"
    rc, out, _ = _run(["--trace", str(log), "--json", str(out_json), "--no-progress"], capsys)
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert doc["config"]["gpus"] == 4  # taken from the log
    assert doc["workloads"][0]["results"]["ep"]["samples"] == 3 * 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--balancers", "ep,nope"], "unknown balancer 'nope'"),
        (["--trace", "no-such-file.json"], "trace 'no-such-file.json' not found"),
        (["--zipf", "1,x"], "--zipf: 'x' is not a number"),
        (["--zipf", "1", "--trace", "counts57b.json"], "either --trace or --zipf"),
        (["--gpus", "8", "--replicas", "9"], "--replicas 9 must be between 1 and --gpus 8"),
        (["--gpus", "6"], "experts divisible by GPUs"),
        (["--gpus-per-node", "3"], "--gpus-per-node 3"),
        (["--micro-batches", "0"], "--micro-batches must be >= 1"),
        (["--zipf", "1", "--lplb-topology", "cube", "--gpus", "6", "--experts", "12"], "multiple of 8 GPUs"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run([*SMALL, *argv], capsys)
    assert rc == 2
    assert message in err
    assert err.startswith("micromoe simulate: error:") and "Traceback" not in err


def test_malformed_trace_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"counts": [[1, 2, -3, 4]]}))
    rc, _, err = _run(["--trace", str(bad), "--gpus", "2", *SMALL], capsys)
    assert rc == 2
    assert "bad.json: counts[0, 2] = -3.0: counts must be >= 0" in err
