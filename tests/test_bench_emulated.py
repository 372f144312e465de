"""benchmarks/bench_emulated.py's timing phase on CPU: a tiny synthetic plans dict (hidden/FFN
32/64, 2 simulated GPUs, 2 variants, 2 samples), timed in interleaved rounds.

Checks the structure of the results, that every distinct per-GPU row set is timed exactly once
per round in the recorded shuffled order (a timer wrapper logs the calls), that the ideal's G GPUs
are G separate timings, that each GPU's time is the median of its recorded rounds (recomputed
here with `statistics.median`), and the drift and noise statistics on scripted times whose answer
is known. Timings themselves are never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_emulated imports emulated_cases from there
import bench_emulated  # noqa: E402

from micromoe.runtime.calibrate import ExpertTimer  # noqa: E402

G, K, ROUNDS = 2, 2, 3
# rows per local slot [K][G][S]; sample 0: GPU 0 of both variants has the same rows (one item)
ROWS = {
    "eplb": [[[40, 24, 0], [32, 32, 0]], [[48, 16, 0], [40, 24, 0]]],
    "microep-ar-t": [[[40, 24, 0], [56, 8, 0]], [[30, 30, 4], [33, 31, 0]]],
}
IDEAL = (24, 24, 24)  # 128 rows / 2 GPUs / 3 slots


def _case() -> dict:
    return {
        "spec": {"name": "tiny", "hidden": 32, "ffn": 64, "gpus": G},
        "experts": 3,
        "slots_per_gpu": 3,
        "totals": [128, 128],
        "rows": ROWS,
        "token_ratio": {"eplb": [1.0, 1.0], "microep-ar-t": [1.01, 1.0]},
    }


def _padded(rows: list[int]) -> tuple[int, ...]:
    return tuple(-(-r // 8) * 8 for r in rows)


def _distinct(k: int) -> set[tuple[int, ...]]:
    """The distinct padded row sets of the variants in sample k (the ideal excluded)."""
    return {_padded(r) for v in ROWS for r in ROWS[v][k]}


NUM_ITEMS = [len(_distinct(k)) + G for k in range(K)]  # [5, 6]


class LoggingTimer:
    """A timer that logs every call's rows, reps and warmup; times come from `inner` (a real
    ExpertTimer) or from `script(call_index, rows)`."""

    def __init__(self, inner: ExpertTimer | None = None, script=None) -> None:
        self.inner, self.script = inner, script
        self.calls: list[tuple[tuple[int, ...], int, int]] = []

    def time_us(self, rows: np.ndarray, *, reps: int, warmup: int = 1) -> float:
        self.calls.append((tuple(int(x) for x in rows), reps, warmup))
        if self.inner is not None:
            return self.inner.time_us(rows, reps=reps, warmup=warmup)
        return self.script(len(self.calls) - 1, rows)


def _round_of(call: int) -> tuple[int, int]:
    """(sample, round) of the call-th timing call, from the item counts computed here."""
    for k, n in enumerate(NUM_ITEMS):
        if call < ROUNDS * n:
            return k, call // n
        call -= ROUNDS * n
    raise AssertionError("more calls than samples x rounds x items")


def _random_times(call: int, rows: np.ndarray) -> float:
    return float(np.random.default_rng(call).uniform(50, 150))


def _item_rows(case: dict, k: int, items: dict[str, list[int]]) -> dict[int, tuple[int, ...]]:
    """Item index -> its padded rows, from the plan's rows of each (variant, GPU) of sample k."""
    rows_of: dict[int, tuple[int, ...]] = {}
    for v, ids in items.items():
        assert len(ids) == G
        for gpu, i in enumerate(ids):
            rows = IDEAL if v == "ideal" else _padded(case["rows"][v][k][gpu])
            assert rows_of.setdefault(i, rows) == rows, "one item index for two row sets"
    return rows_of


def test_rounds_time_every_distinct_row_set_once_per_round_in_the_recorded_order():
    case = _case()
    timer = LoggingTimer(ExpertTimer(32, 64, torch.device("cpu"), max_rows=256, seed=0))
    out = bench_emulated.time_case(case, timer, None, rounds=ROUNDS, reps=1, warmup=1, seed=3)
    for key in ("measured_us", "predicted_us"):
        assert set(out[key]) == {"eplb", "microep-ar-t", "ideal"}
        assert all(np.asarray(t).shape == (K, G) for t in out[key].values())
    assert all(np.all(np.asarray(t) > 0) for t in out["measured_us"].values())
    assert all(np.all(np.isnan(t)) for t in out["predicted_us"].values())  # no model
    timing = out["timing"]
    assert (timing["rounds"], timing["reps"], timing["warmup"], timing["seed"]) == (ROUNDS, 1, 1, 3)
    assert len(timing["samples"]) == K
    assert len(timer.calls) == ROUNDS * sum(NUM_ITEMS)
    assert all(c[1:] == (1, 1) for c in timer.calls)
    start = 0
    for k, s in enumerate(timing["samples"]):
        chunk = [c[0] for c in timer.calls[start : start + ROUNDS * NUM_ITEMS[k]]]
        start += ROUNDS * NUM_ITEMS[k]
        counts = Counter(chunk)
        assert counts == Counter({**{r: ROUNDS for r in _distinct(k)}, IDEAL: ROUNDS * G})
        # the ideal: G separate items of identical work; shared row sets: one item
        assert len(set(s["items"]["ideal"])) == G
        if k == 0:
            assert s["items"]["eplb"][0] == s["items"]["microep-ar-t"][0]
        rows_of = _item_rows(case, k, s["items"])
        assert sorted(rows_of) == list(range(NUM_ITEMS[k]))
        # each round is a permutation, executed in the recorded order
        assert np.asarray(s["raw_us"]).shape == (ROUNDS, NUM_ITEMS[k])
        for r, order in enumerate(s["order"]):
            assert sorted(order) == list(range(NUM_ITEMS[k]))
            assert [rows_of[i] for i in order] == chunk[r * NUM_ITEMS[k] : (r + 1) * NUM_ITEMS[k]]


def test_measured_is_the_median_of_the_recorded_rounds():
    case = _case()
    timer = LoggingTimer(script=_random_times)
    out = bench_emulated.time_case(case, timer, None, rounds=ROUNDS, reps=2, warmup=0, seed=0)
    # the raw rounds are the timer's answers, rounded to 0.01 us, at their (round, item)
    start = 0
    for k, s in enumerate(out["timing"]["samples"]):
        for r, order in enumerate(s["order"]):
            for j, i in enumerate(order):
                expected = round(_random_times(start + r * NUM_ITEMS[k] + j, None), 2)
                assert s["raw_us"][r][i] == expected
        start += ROUNDS * NUM_ITEMS[k]
        for v, ids in s["items"].items():
            want = [statistics.median(s["raw_us"][r][i] for r in range(ROUNDS)) for i in ids]
            assert out["measured_us"][v][k] == pytest.approx(want, rel=1e-12)
    assert all(c[1:] == (2, 0) for c in timer.calls)


def test_shuffle_is_deterministic_per_seed_and_changes_between_rounds():
    def orders(seed: int) -> list:
        out = bench_emulated.time_case(
            _case(), LoggingTimer(script=_random_times), None, rounds=4, reps=1, seed=seed
        )
        return [s["order"] for s in out["timing"]["samples"]]

    first = orders(0)
    assert orders(0) == first
    assert orders(1) != first
    for sample in first:
        assert all(a != b for a, b in zip(sample[:-1], sample[1:], strict=True))
    rng = np.random.default_rng(0)
    assert bench_emulated.round_orders(1, 3, rng) == [[0], [0], [0]]
    two = bench_emulated.round_orders(2, 6, rng)  # consecutive rounds differ even with 2 items
    assert all(a != b for a, b in zip(two[:-1], two[1:], strict=True))


def test_drift_and_noise_statistics_on_scripted_times():
    factors = [1.0, 1.2, 1.1]  # every time scaled by its round's factor: drift 1.2, no noise

    def script(call: int, rows: np.ndarray) -> float:
        return (100.0 + float(np.sum(rows))) * factors[_round_of(call)[1]]

    case = _case()
    out = bench_emulated.time_case(case, LoggingTimer(script=script), None, rounds=ROUNDS, reps=1)
    ideal = np.asarray(out["measured_us"]["ideal"])
    assert ideal == pytest.approx(np.full((K, G), (100 + 72) * 1.1))
    summary = bench_emulated.summarize(case, out)
    s = summary["ideal"]
    assert s["time_max_mean"] == pytest.approx(1.0)
    assert s["noise_floor_round"] == pytest.approx(1.0)
    assert s["drift"] == pytest.approx(1.2)
    assert s["item_spread"] == pytest.approx(1.2)
    assert summary["eplb"]["critical_us"] == pytest.approx((100 + 64) * 1.1)  # every EPLB GPU: 64 rows
    assert "drift" in bench_emulated.format_table(summary)


def test_run_timing_on_cpu_writes_compact_json_that_summarizes_again(tmp_path):
    case = _case()
    plans = {"config": {"samples": K}, "cases": [case]}
    path = tmp_path / "emulated.json"
    args = argparse.Namespace(device="cpu", models=None, seed=0, rounds=2, reps=1, warmup=0, json=path)
    result = bench_emulated.run_timing(plans, args)
    assert result["timing"] == {"rounds": 2, "reps": 1, "warmup": 0, "seed": 0}
    (r,) = result["cases"]
    assert "rows" not in r and set(r["summary"]) == {"eplb", "microep-ar-t", "ideal"}
    assert {"drift", "noise_floor_round", "item_spread"} <= set(r["summary"]["ideal"])
    (target,) = result["targets"]
    assert target["variant"] == "microep-ar-t" and target["noise_floor"] >= 1.0 and target["drift"] >= 1.0
    assert "drift" in bench_emulated.format_targets(result["targets"])
    text = bench_emulated.dumps(result)
    loaded = json.loads(text)
    assert json.dumps(loaded) == json.dumps(result)  # only the layout differs
    raw0 = loaded["cases"][0]["timing"]["samples"][0]["raw_us"][0]
    assert json.dumps(raw0)[1:-1] in text  # a round of raw times on one line
    again = bench_emulated.summarize(case, loaded["cases"][0])  # as `rescore` does
    assert json.dumps(again) == json.dumps(r["summary"])
    assert json.loads(path.read_text())["partial"] is True  # the partial file of the last case
