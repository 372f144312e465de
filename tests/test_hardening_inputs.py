"""Bad input to `micromoe simulate` and the trace readers: one clear line (exit 2) or correct acceptance.

Each case is one row of docs/VALIDATION.md. Work that must not start (output paths) is checked by
timing nothing: the error must come before any trace is even read, so a missing trace is passed too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from micromoe.cli import main
from micromoe.plan import Placement, schedule
from micromoe.plan.checks import MAX_TOTAL
from micromoe.sim import plot
from micromoe.sim.traces import load_trace, write_routing_record

SMALL = ["--micro-batches", "2", "--tokens-per-gpu", "64", "--no-progress", "--balancers", "ep,microep,bound"]
ZIPF = [*SMALL, "--zipf", "1", "--experts", "16", "--layers", "2"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["simulate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _expect_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> str:
    rc, out, err = _run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert err.startswith("micromoe simulate: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert out == "", "nothing may be simulated before the error"
    return err


def _aggregate(tmp_path: Path, counts: object, name: str = "agg.json", **extra: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"counts": counts, **extra}))
    return str(path)


def _routing(tmp_path: Path, lines: list[dict], name: str = "log.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


# ------------------------------------------------------------------------------------------------
# overflow: the largest supported total per layer (and micro-batch) is 2**53 - 1


@pytest.mark.parametrize("big", [1e20, 2**63 + 5, 1e308, 10**400])
def test_huge_aggregate_counts_are_refused(tmp_path: Path, big: float, capsys) -> None:
    trace = tmp_path / "big.json"
    trace.write_text('{"counts": [[%s, 1, 1, 1, 1, 1, 1, 1]]}' % big)  # noqa: UP031 - raw JSON number
    _expect_error(["--trace", str(trace), *SMALL], "2**53", capsys)


@pytest.mark.parametrize("big", [2**62, 2**63 + 5, MAX_TOTAL])
def test_huge_routing_counts_are_refused_not_wrapped(tmp_path: Path, big: int) -> None:
    trace = tmp_path / "log.jsonl"
    trace.write_text('{"step": 0, "layer": 0, "counts": [[%d, 0], [0, 1]]}\n' % big)  # noqa: UP031
    with pytest.raises(ValueError, match=r"2\*\*53"):
        load_trace(trace)


def test_the_largest_supported_total_is_accepted(tmp_path: Path) -> None:
    trace = tmp_path / "log.jsonl"
    trace.write_text('{"step": 0, "layer": 0, "counts": [[%d, 0], [0, 0]]}\n' % (MAX_TOTAL - 1))  # noqa: UP031
    loaded = load_trace(trace)
    assert loaded.counts[0, 0, 0, 0] == MAX_TOTAL - 1  # exact, not rounded or wrapped


@pytest.mark.parametrize("value", [2**62, 2**60])
def test_schedule_refuses_counts_whose_sum_overflows(value: int) -> None:
    counts = np.zeros((4, 8), dtype=np.int64)
    counts[:, 0] = value  # 4 x 2**62 wraps around int64
    with pytest.raises(ValueError, match=r"largest supported total is 2\*\*53 - 1"):
        schedule(counts, Placement.symmetric(4, 8, 2))


def test_tokens_per_gpu_overflow_names_the_flags(capsys) -> None:
    _expect_error(
        [*ZIPF, "--tokens-per-gpu", "4000000000000000000"], "--tokens-per-gpu 4000000000000000000", capsys
    )


# ------------------------------------------------------------------------------------------------
# output paths, checked before any work


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--json", "/nonexistent/dir/out.json", "directory '/nonexistent/dir' does not exist"),
        ("--json", "/proc/version", "cannot be written"),
        ("--plot", "/nonexistent/dir/p.png", "directory '/nonexistent/dir' does not exist"),
    ],
)
def test_bad_output_paths_fail_before_any_work(flag: str, value: str, message: str, capsys) -> None:
    # a missing trace would fail later: the output check must come first
    _expect_error(["--trace", "no-such-trace.json", flag, value, *SMALL], f"{flag} {value!r}", capsys)
    _expect_error([*ZIPF, flag, value], message, capsys)


def test_output_that_is_a_directory(tmp_path: Path, capsys) -> None:
    _expect_error([*ZIPF, "--json", str(tmp_path)], "is a directory", capsys)


def test_json_equal_to_the_input_trace_is_refused(tmp_path: Path, capsys) -> None:
    trace = _aggregate(tmp_path, [[5, 3, 2, 1, 1, 1, 1, 1]])
    before = Path(trace).read_text()
    _expect_error(["--trace", trace, "--json", trace, *SMALL], "is the input trace", capsys)
    assert Path(trace).read_text() == before


def test_json_and_plot_on_the_same_file(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.out")
    _expect_error([*ZIPF, "--json", out, "--plot", out], "also given to --json", capsys)


def test_probe_leaves_no_file_behind(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    _expect_error([*ZIPF, "--json", str(out), "--seed", "-5"], "--seed", capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# silently accepted before


@pytest.mark.parametrize("bad", ['"1"', "true", "false", "null", "[1]"])
def test_counts_must_be_json_numbers(tmp_path: Path, bad: str, capsys) -> None:
    agg = tmp_path / "agg.json"
    agg.write_text('{"counts": [[4, %s, 1, 1, 1, 1, 1, 1]]}' % bad)  # noqa: UP031
    _expect_error(["--trace", str(agg), *SMALL], "counts[0, 1]", capsys)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "layer": 0, "counts": [[4, %s], [1, 1]]}\n' % bad)  # noqa: UP031
    with pytest.raises(ValueError, match=r"counts\[0, 1\]|rectangular"):
        load_trace(log)


def test_top_k_zero_is_refused(capsys) -> None:
    _expect_error([*ZIPF, "--top-k", "0"], "--top-k must be >= 1, got 0", capsys)


def test_seed_must_be_non_negative(capsys) -> None:
    _expect_error([*ZIPF, "--seed", "-5"], "--seed must be an integer >= 0, got -5", capsys)


def test_all_zero_routing_log_is_refused(tmp_path: Path, capsys) -> None:
    log = _routing(tmp_path, [{"step": s, "layer": 0, "counts": [[0, 0], [0, 0]]} for s in range(3)])
    _expect_error(["--trace", log, "--no-progress"], "holds no tokens", capsys)


def test_empty_samples_are_undefined_not_perfect(tmp_path: Path, capsys) -> None:
    """A log whose first micro-batch is empty: that sample is left out (not 1.0, not at the bound)."""
    lines = [{"step": 0, "layer": 0, "counts": [[0, 0], [0, 0]]}]
    lines += [{"step": 1, "layer": 0, "counts": [[3, 0], [1, 0]]}]
    log = _routing(tmp_path, lines)
    out = tmp_path / "r.json"
    rc, _, _ = _run(["--trace", log, "--no-progress", "--balancers", "ep,bound", "--json", str(out)], capsys)
    assert rc == 0
    ep = json.loads(out.read_text())["results"]["ep"]
    assert ep["samples"] == 2 and ep["empty_samples"] == 1
    # the one sample with tokens: ep puts expert 0 (4 tokens) on GPU 0: max 4 / mean 2
    assert ep["mean_ratio"] == 2.0 and ep["at_bound"] == 0.0


def test_only_empty_samples_give_null_statistics(tmp_path: Path, capsys) -> None:
    """Measured micro-batches without any token: max/mean and 'at bound' are undefined (null, 'nan')."""
    lines = [
        {"step": 0, "layer": 0, "counts": [[1, 1], [0, 0]]},
        {"step": 1, "layer": 0, "counts": [[0, 0], [0, 0]]},
    ]
    log = _routing(tmp_path, lines)
    out = tmp_path / "r.json"
    argv = ["--trace", log, "--no-progress", "--warmup", "1", "--balancers", "ep,bound", "--json", str(out)]
    rc, text, _ = _run(argv, capsys)
    assert rc == 0
    for r in json.loads(out.read_text())["results"].values():
        assert r["mean_ratio"] is None and r["at_bound"] is None and r["empty_samples"] == 1
    assert "nan" in text and "100.0%" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(step=-1, layer=0, counts=[[1]]), "step must be an integer >= 0"),
        (dict(step=0, layer=-2, counts=[[1]]), "layer must be an integer >= 0"),
        (dict(step=0, layer=0, micro_batch=True, counts=[[1]]), "micro_batch must be an integer >= 0"),
        (dict(step=0, layer=0, counts=[[1, -3]]), "counts[0, 1] = -3"),
        (dict(step=0, layer=0, counts=[[]]), "non-empty integer [G, E]"),
        (dict(step=0, layer=0, counts=[[1.5]]), "non-empty integer [G, E]"),
        (dict(step=0, layer=0, counts=np.array([[2**62, 2**62]])), "2**53"),
    ],
)
def test_write_routing_record_refuses_what_the_loader_refuses(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with (tmp_path / "log.jsonl").open("w") as fp, pytest.raises(ValueError) as exc:
        write_routing_record(fp, **kwargs)
    assert message in str(exc.value)
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_written_records_load_back(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with path.open("w") as fp:
        for step in range(2):
            write_routing_record(fp, step=step, layer=5, counts=np.array([[1, 2], [3, 4]]))
    trace = load_trace(path)
    assert trace.counts.shape == (2, 1, 2, 2) and trace.layers == [5]


# ------------------------------------------------------------------------------------------------
# misleading messages before


def test_binary_file_names_the_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    _expect_error(["--trace", str(path), *SMALL], f"trace {str(path)!r} is not a UTF-8 text file", capsys)


def test_empty_counts_are_blamed_on_the_trace(tmp_path: Path, capsys) -> None:
    agg = _aggregate(tmp_path, [[]])
    _expect_error(
        ["--trace", agg, *SMALL], "counts must be [layers][experts] with at least one of each", capsys
    )
    log = _routing(tmp_path, [{"step": 0, "layer": 0, "counts": [[]]}])
    _expect_error(["--trace", log, "--no-progress"], "counts must be [GPUs][experts]", capsys)


def test_aggregate_with_a_layer_key_is_an_aggregate(tmp_path: Path) -> None:
    agg = _aggregate(tmp_path, [[5, 3, 2, 1]], layer="all", top_k=2)
    trace = load_trace(agg)
    assert type(trace).__name__ == "AggregateTrace" and trace.meta["layer"] == "all"


def test_ragged_counts(tmp_path: Path, capsys) -> None:
    _expect_error(["--trace", _aggregate(tmp_path, [[1, 2], [3]]), *SMALL], "ragged rows", capsys)


def test_traces_with_different_gpu_counts(tmp_path: Path, capsys) -> None:
    a = _routing(tmp_path, [{"step": 0, "layer": 0, "counts": [[1, 2]] * 4}], "a.jsonl")
    b = _routing(tmp_path, [{"step": 0, "layer": 0, "counts": [[1, 2]] * 2}], "b.jsonl")
    err = _expect_error(["--trace", a, "--trace", b, "--no-progress"], "run them separately", capsys)
    assert "pass --gpus" not in err
    agg = _aggregate(tmp_path, [[5, 3, 2, 1, 1, 1, 1, 1]])
    _expect_error(["--trace", a, "--trace", agg, *SMALL], "pass --gpus 4", capsys)


def test_ragged_placement_rows() -> None:
    with pytest.raises(ValueError, match="every GPU needs the same number of slots"):
        Placement.from_slots([[0, 1], [1]])


# ------------------------------------------------------------------------------------------------
# what the CLI accepts


def test_replicas_not_dividing_the_gpus_are_supported(capsys) -> None:
    """Placement.symmetric(16, 32, 3) exists, so the CLI runs it (32 x 3 = 96 slots = 6 per GPU)."""
    rc, out, err = _run(
        [*SMALL, "--zipf", "1", "--experts", "32", "--layers", "1", "--gpus", "16", "--replicas", "3",
         "--balancers", "eplb,microep,microep-ar,bound"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "replicas=3" in out


def test_replicas_whose_slots_do_not_split_say_what_works(capsys) -> None:
    argv = [*ZIPF, "--experts", "10", "--gpus", "4", "--replicas", "3", "--balancers", "microep"]
    _expect_error(argv, "experts x d divisible by --gpus", capsys)


def test_routing_log_replay_reports_its_own_micro_batches(tmp_path: Path, capsys) -> None:
    lines = [
        {"step": s, "layer": layer, "counts": [[s + 1, 2], [1, layer]]} for s in range(5) for layer in (3, 7)
    ]
    log = _routing(tmp_path, lines)
    out = tmp_path / "r.json"
    rc, text, _ = _run(["--trace", log, "--no-progress", "--warmup", "1", "--json", str(out)], capsys)
    assert rc == 0
    config = json.loads(out.read_text())["config"]
    assert config["micro_batches"] == 4 and config["top_k"] is None
    assert "micro_batches=4" in text and "top_k=None" in text


def test_routing_log_plot_title_and_layer_ids(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plot gets the log's own layer ids and a title without a made-up micro-batch count."""
    seen: dict = {}
    monkeypatch.setattr(plot, "plot_results", lambda *a, **kw: seen.update(kw))
    lines = [
        {"step": s, "layer": layer, "counts": [[s + 1, 2], [1, layer]]} for s in range(3) for layer in (3, 7)
    ]
    log = _routing(tmp_path, lines)
    rc, _, _ = _run(["--trace", log, "--no-progress", "--plot", str(tmp_path / "p.png")], capsys)
    assert rc == 0
    assert seen["layer_ids"] == [3, 7]
    assert seen["title"].endswith("3 micro-batches") and "top-" not in seen["title"]
