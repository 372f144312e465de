"""benchmarks/bench_train.py on CPU: 4 gloo ranks and one process, a tiny model, a few steps.

Checks the JSON schema, the variant names, that MicroEP's executed balance is no worse than plain
EP's on skewed routing, that the `uniform` bound is exactly balanced, and that the one-process run
degrades to its single-rank variants. Timings are recorded, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from _dist import run_workers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_train imports _env from there
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bench_train  # dataclasses look their module up there
_spec.loader.exec_module(bench_train)

TINY = ["--preset", "tiny", "--layers", "2", "--seq-len", "16", "--micro-batch", "2", "--warmup", "1"]
TINY += ["--steps", "2", "--ar-interval", "1"]


def _top1_model(args):
    """The preset with top-1 routing: Zipf 1.5 then sends ~52% of the rows to expert 0, more than
    the two GPUs of its replicas can take in the symmetric placement, so adaptive replacement has
    a reason to migrate (with top-2 draws of distinct experts the symmetric placement balances)."""
    return bench_train.preset(args.preset, num_layers=args.layers, seq_len=args.seq_len, top_k=1)


def _worker(rank: int, world: int, argv: list[str]) -> dict:
    bench_train.model_config = _top1_model  # in this spawned process only
    return bench_train.worker(rank, world, bench_train.parse_args(argv), "gloo")


def _check_schema(result: dict, names: list[str]) -> None:
    assert set(result) >= {"gpu", "versions", "config", "rows"}
    assert result["versions"]["torch"]
    assert [r["variant"] for r in result["rows"]] == names
    for r in result["rows"]:
        assert set(r) >= {"variant", "skew", "tokens_per_s", "max_mean_load"}
        assert r["skew"] is None or isinstance(r["skew"], float)
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["max_mean_load"] >= 1.0


@pytest.mark.timeout(300)
def test_bench_train_4_gloo_ranks(tmp_path):
    out = tmp_path / "bench.json"
    results = run_workers(_worker, 4, [*TINY, "--skews", "1.5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == results[1]["rows"], "every rank returns the same rows"
    names = ["ep4", "ep4", "ep2", "ep2", "microep", "microep", "microep-ar", "microep-ar", "uniform"]
    _check_schema(result, names)
    row = {(r["variant"], r["skew"]): r for r in result["rows"]}
    assert row[("microep", 1.5)]["max_mean_load"] <= row[("ep2", 1.5)]["max_mean_load"]
    assert row[("microep", 1.5)]["max_mean_load"] <= row[("ep4", 1.5)]["max_mean_load"]
    assert row[("microep-ar", 1.5)]["max_mean_load"] <= row[("ep2", 1.5)]["max_mean_load"]
    ar = row[("microep-ar", 1.5)]
    # Zipf 1.5 on the symmetric placement scores over the threshold: the cold start re-places
    assert ar["replacements"] > 0 and ar["migration_bytes"] == 0, "the AR row re-places; nothing moves"
    assert row[("uniform", 0.0)]["max_mean_load"] == 1.0
    assert result["config"]["skipped"] == []


def test_bench_train_one_process(tmp_path):
    out = tmp_path / "bench1.json"
    bench_train.worker(0, 1, bench_train.parse_args([*TINY, "--skews", "1.0", "--out", str(out)]), None)
    result = json.loads(out.read_text())
    _check_schema(result, ["ep1", "ep1", "uniform"])
    assert [r["skew"] for r in result["rows"]] == [None, 1.0, 0.0]
    assert result["config"]["skipped"], "the multi-rank variants are listed as skipped"
