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
from micromoe.sim.balancers import GroupConfig, make_balancers
from micromoe.sim.predicted import even_split_times, local_slot_rows, predict_quota, slot_rows, time_summary
from micromoe.sim.runner import simulate
from micromoe.sim.workload import workload_from_zipf

SMALL = ["--zipf", "1.0", "--experts", "16", "--gpus", "4", "--layers", "2", "--micro-batches", "4"]
SMALL += ["--tokens-per-gpu", "512", "--no-progress"]
MODEL = CostModel(fixed_us=30.0, max_row_us=0.002, tile=128, c_slot=0.5, c_row=0.01, c_tile=2.0, c_active=5.0)


def _reference_slot_rows(quota_EG: np.ndarray, slots: int, slots_EG: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((quota_EG.shape[1], slots), dtype=np.int64)
    for g in range(quota_EG.shape[1]):
        rows = []
        for e in range(quota_EG.shape[0]):
            q = int(quota_EG[e, g])
            if q > 0:
                m = 1 if slots_EG is None else int(slots_EG[e, g])
                rows += [q // m + (1 if i < q % m else 0) for i in range(m)]
        rows = [-(-r // ROW_ALIGN) * ROW_ALIGN for r in sorted(rows, reverse=True)]
        out[g, : len(rows)] = rows
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_slot_rows_matches_reference(num_gpus, slots, several, seed):
    """Rows per slot, with an expert's quota split over its local slots when it holds several."""
    rng = np.random.default_rng(seed)
    num_experts = num_gpus * slots + 3
    quota = np.zeros((num_experts, num_gpus), dtype=np.int64)
    mult = np.zeros_like(quota)
    for g in range(num_gpus):  # at most `slots` busy slots per GPU
        free = slots
        for e in rng.permutation(num_experts)[: rng.integers(0, slots + 1)]:
            if free == 0:
                break
            mult[e, g] = rng.integers(1, free + 1) if several else 1
            free -= mult[e, g]
            quota[e, g] = rng.integers(0 if several else 1, 5000)  # an idle slot stays empty
    slots_EG = mult if several else None
    got = slot_rows(quota, slots, slots_EG)
    np.testing.assert_array_equal(got, _reference_slot_rows(quota, slots, slots_EG))
    np.testing.assert_allclose(predict_quota(MODEL, quota, slots, slots_EG), MODEL.predict(got))
    unpadded = local_slot_rows(quota, slots, slots_EG)
    np.testing.assert_array_equal(unpadded.sum(axis=1), quota.sum(axis=0))  # no row lost or added
    assert np.all(np.diff(unpadded, axis=1) <= 0)  # largest slot first


def test_eplb_colocated_replicas_are_scored_as_separate_slots():
    """EPLB can put two replicas of a hot expert on one GPU: simulate prices two GEMM groups of
    half the rows there, not one of all of them."""
    cfg = GroupConfig(num_gpus=2, replicas=2, cost_model=MODEL)
    w = workload_from_zipf(
        2.5,
        num_experts=4,
        top_k=1,
        num_gpus=2,
        tokens_per_gpu=4096,
        num_layers=1,
        num_micro_batches=2,
        noise=0.0,
        drift=0.0,
        seed=0,
    )
    eplb = make_balancers(["eplb"], cfg)[0]
    eplb.setup(w)
    mult = eplb.local_slots(0)
    assert mult.sum() == 8 and mult.max() >= 2, "the hot expert should hold two slots on one GPU"
    counts = w.counts[0, 0]
    quota = eplb.decide(0, counts)
    rows = local_slot_rows(quota, 4, mult)
    e, g = np.unravel_index(np.argmax(mult), mult.shape)
    per_slot = quota[e, g] // mult[e, g]
    assert np.sum(rows[g] >= per_slot) >= mult[e, g]  # the expert's rows appear as mult[e, g] slots
    [result] = simulate([w], ["eplb"], cfg, progress=False, cost_model=MODEL)
    want = MODEL.predict(slot_rows(quota, 4, mult)).max()
    assert result.samples["eplb"].time_max_us[0, 0] == pytest.approx(want)
    assert want != pytest.approx(MODEL.predict(slot_rows(quota, 4)).max())


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


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_adds_a_predicted_time_row_with_a_cost_model(tmp_path, capsys):
    """--plot with --cost-model draws the token row and a second row of predicted slowest-GPU time."""
    model_path = tmp_path / "m.json"
    MODEL.save(model_path)
    tokens_png, timed_png = tmp_path / "tokens.png", tmp_path / "timed.png"
    assert main(["simulate", *SMALL, "--plot", str(tokens_png)]) == 0
    assert main(["simulate", *SMALL, "--cost-model", str(model_path), "--plot", str(timed_png)]) == 0
    capsys.readouterr()
    (w1, h1), (w2, h2) = _png_size(tokens_png), _png_size(timed_png)
    assert w1 == w2 and h2 == pytest.approx(2 * h1, rel=0.05)
