"""Trace files: the bundled aggregates load, routing logs round-trip, malformed files fail clearly."""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from micromoe.sim.traces import (
    AggregateTrace,
    RoutingTrace,
    load_trace,
    parse_aggregate,
    parse_routing_lines,
    write_routing_record,
)

BUNDLED = ["counts57b.json", "counts57b_l512.json", "counts57b_multi.json", "counts57b_share.json"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_traces_load(name: str) -> None:
    path = Path(str(resources.files("micromoe") / "data" / "traces" / name))
    trace = load_trace(path)
    assert isinstance(trace, AggregateTrace)
    assert trace.counts.shape == (28, 64)
    raw = json.loads(path.read_text())["counts"]
    np.testing.assert_array_equal(trace.counts, np.array(raw, dtype=np.float64))


def test_routing_log_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 2, 4, 6))  # [M, L, G, E]
    buf = io.StringIO()
    # written out of order, as a recorder on several layers might: replay sorts by (step, micro_batch)
    for m in (2, 0, 1):
        for layer in (1, 0):
            write_routing_record(
                buf, step=m // 2, micro_batch=m % 2, layer=10 + layer, counts=counts[m, layer]
            )
    path = tmp_path / "routing.jsonl"
    path.write_text(buf.getvalue() + "\n")  # trailing blank line is fine
    trace = load_trace(path)
    assert isinstance(trace, RoutingTrace)
    assert trace.keys == [(0, 0), (0, 1), (1, 0)]
    assert trace.layers == [10, 11]
    np.testing.assert_array_equal(trace.counts, counts)


def test_single_line_routing_log(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"step": 0, "layer": 0, "counts": [[1, 2], [3, 4]]}))
    trace = load_trace(path)
    assert isinstance(trace, RoutingTrace)
    assert trace.counts.shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"counts": [[1, 2], [3]]}, "rectangular"),
        ({"counts": [[1, -2], [3, 4]]}, "counts[0, 1] = -2.0: counts must be >= 0"),
        ({"counts": [[1, None], [3, 4]]}, "counts[0, 1] = null: counts must be JSON numbers"),
        ({"counts": [1, 2, 3]}, "2-D"),
        ({"counts": [[0, 0], [3, 4]]}, "layer 0 has no tokens"),
        ({"counts": [[1, 2]], "num_experts": 3}, "num_experts=3 disagrees"),
        ({"counts": [[1, 2]], "top_k": 0}, "top_k must be a positive integer"),
        ({"counts": [[]]}, "at least one"),
        ({"count": [[1, 2]]}, "counts is missing"),
    ],
)
def test_malformed_aggregate(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match="t.json") as info:
        parse_aggregate(doc, name="t.json")
    assert message in str(info.value)


def _line(**kw) -> str:
    return json.dumps({"step": 0, "layer": 0, "counts": [[1, 2], [3, 4]], **kw})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_line(), "{not json"], "line 2: not valid JSON"),
        ([_line(), _line(layer=1, counts=[[1, 2, 3], [4, 5, 6]])], "line 2: counts has shape (2, 3)"),
        ([_line(counts=[[1.5, 2], [3, 4]])], "whole token counts"),
        ([_line(counts=[[1, 2], [3, -4]])], "counts[1, 1] = -4.0"),
        ([_line(counts=[[1, 2], [3, float("nan")]])], "must be finite"),
        ([_line(), _line()], "layer 0 of step 0 micro_batch 0 appears twice"),
        ([_line(), _line(layer=1), _line(step=1)], "step 1 micro_batch 0 does not list the same layers"),
        ([json.dumps({"layer": 0, "counts": [[1]]})], "missing 'step'"),
        ([_line(step=-1)], "step must be an integer >= 0"),
        ([_line(layer=1.5)], "layer must be an integer >= 0"),
        (["[1, 2]"], "expected a JSON object"),
        (["", "  "], "holds no records"),
    ],
)
def test_malformed_routing_log(lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="log.jsonl") as info:
        parse_routing_lines(lines, name="log.jsonl")
    assert message in str(info.value)


def test_load_trace_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trace"):
        load_trace(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_trace(empty)
    bad = tmp_path / "bad.json"
    bad.write_text('{"counts": [[1, 2]')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trace(bad)
    wrong = tmp_path / "list.json"
    wrong.write_text("[[1, 2]]")
    with pytest.raises(ValueError, match="expected a JSON object with a 'counts' key"):
        load_trace(wrong)


def test_write_routing_record_rejects_floats() -> None:
    with pytest.raises(ValueError, match="integer"):
        write_routing_record(io.StringIO(), step=0, layer=0, counts=np.ones((2, 2)))
