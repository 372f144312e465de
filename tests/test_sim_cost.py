"""`micromoe simulate --cost-model`: every balancer scored in predicted expert time by one model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.cli import main
from micromoe.plan.cost import ROW_ALIGN, CostModel
from micromoe.sim.predicted import even_split_times, predict_quota, slot_rows, time_summary

SMALL = ["--zipf", "1.0", "--experts", "16", "--gpus", "4", "--layers", "2", "--micro-batches", "4"]
SMALL += ["--tokens-per-gpu", "512", "--no-progress"]
MODEL = CostModel(fixed_us=30.0, max_row_us=0.002, tile=128, c_slot=0.5, c_row=0.01, c_tile=2.0, c_active=5.0)


def _reference_slot_rows(quota_EG: np.ndarray, slots: int) -> np.ndarray:
    out = np.zeros((quota_EG.shape[1], slots), dtype=np.int64)
    for g in range(quota_EG.shape[1]):
        rows = sorted((int(q) for q in quota_EG[:, g] if q > 0), reverse=True)
        rows = [-(-r // ROW_ALIGN) * ROW_ALIGN for r in rows]
        out[g, : len(rows)] = rows
    return out


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_slot_rows_matches_reference(num_gpus, slots, seed):
    rng = np.random.default_rng(seed)
    quota = np.zeros((num_gpus * slots + 3, num_gpus), dtype=np.int64)
    for g in range(num_gpus):  # at most `slots` busy experts per GPU
        busy = rng.choice(quota.shape[0], size=rng.integers(0, slots + 1), replace=False)
        quota[busy, g] = rng.integers(1, 5000, size=busy.size)
    got = slot_rows(quota, slots)
    np.testing.assert_array_equal(got, _reference_slot_rows(quota, slots))
    np.testing.assert_allclose(predict_quota(MODEL, quota, slots), MODEL.predict(got))


def test_even_split_and_summary():
    t = even_split_times(MODEL, np.array([[4096, 8192]]), 4, 8)
    np.testing.assert_allclose(t, MODEL.predict(np.array([[128] * 8, [256] * 8])).reshape(1, 2))
    s = time_summary(np.array([[2000.0, 4000.0]]), np.array([[1000.0, 4000.0]]))
    assert s == {"time_ms_mean": 3.0, "time_max_mean": 1.5}


def _simulate(tmp_path: Path, model: CostModel | None, capsys) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    argv = ["simulate", *SMALL, "--json", str(out)]
    if model is not None:
        path = tmp_path / "m.json"
        model.save(path)
        argv += ["--cost-model", str(path)]
    assert main(argv) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_every_balancer_gets_time_fields(tmp_path, capsys):
    doc, text = _simulate(tmp_path, MODEL, capsys)
    assert doc["config"]["cost_model"].endswith("m.json")
    assert "time ms" in text and "time max/mean" in text
    for w in [doc, *doc["workloads"]]:
        for name, r in w["results"].items():
            assert r["time_ms_mean"] > 0 and r["time_max_mean"] >= 1.0 - 1e-12, name
        assert w["results"]["bound"]["time_max_mean"] == pytest.approx(1.0)
        # plain EP on Zipf 1.0 is far more imbalanced in time than a token-balanced plan
        assert w["results"]["ep"]["time_max_mean"] > w["results"]["microep"]["time_max_mean"] + 0.1


def test_linear_model_time_ratio_tracks_token_ratio(tmp_path, capsys):
    """Time proportional to rows: predicted max/mean time is the token max/mean, up to the
    padding of each slot to 8 rows."""
    linear = CostModel(fixed_us=0.0, max_row_us=0.0, tile=128, c_row=0.01)
    doc, _ = _simulate(tmp_path, linear, capsys)
    for name, r in doc["results"].items():
        if name != "bound":
            assert r["time_max_mean"] == pytest.approx(r["mean_ratio"], rel=0.02), name


def test_without_cost_model_no_time_fields(tmp_path, capsys):
    doc, text = _simulate(tmp_path, None, capsys)
    assert doc["config"]["cost_model"] is None and "time ms" not in text
    assert all("time_ms_mean" not in r for r in doc["results"].values())


def test_bad_cost_model_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "micromoe-cost-model", "version": 1}')
    assert main(["simulate", *SMALL, "--cost-model", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["simulate", *SMALL, "--cost-model", "h100-1x1"]) == 2
    assert "neither a file nor a bundled name" in capsys.readouterr().err
