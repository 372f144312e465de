"""Cost model: the form, exact NNLS, fitting recovers known coefficients, files and their errors."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan.cost import (
    CostModel,
    bundled_models,
    bundled_name,
    fit_cost_model,
    load,
    nnls,
    relative_errors,
)

TRUE = CostModel(
    fixed_us=40.0, max_row_us=0.004, tile=128, c_slot=0.7, c_row=0.02, c_tile=1.5, c_active=6.0, c_nlogn=0.001
)
# the same with the shape terms (half-size tile, first tile, rows past four tiles)
SHAPED = CostModel(**{**TRUE.__dict__, "c_half_tile": 0.8, "c_head": 0.03, "c_big": 0.005})


def _brute_f(m: CostModel, n: int) -> float:
    """f(n) written out by hand, independent of the vectorized code."""
    if n == 0:
        return 0.0
    f = m.c_row * n + m.c_tile * math.ceil(n / m.tile) + m.c_active + m.c_nlogn * n * math.log2(n)
    head = n if n < m.tile else m.tile
    big = n - 4 * m.tile if n > 4 * m.tile else 0
    return f + m.c_half_tile * math.ceil(n / (m.tile // 2)) + m.c_head * head + m.c_big * big


def _samples(rng: np.random.Generator, num: int, slots: int) -> np.ndarray:
    rows = np.zeros((num, slots), dtype=np.int64)
    for i in range(num):
        k = int(rng.integers(1, slots + 1))
        total = int(rng.integers(64, 20_000))
        share = rng.dirichlet(np.full(k, rng.choice([0.3, 1.0, 10.0])))
        rows[i, :k] = np.floor(share * total).astype(np.int64)
    return rows


@pytest.mark.parametrize("m", [TRUE, SHAPED], ids=["base", "shape-terms"])
def test_slot_cost_and_predict_match_hand_formula(m):
    rows = np.array([[0, 1, 63, 64, 65, 127, 128], [129, 0, 0, 511, 512, 513, 5000]])
    want_f = np.array([[_brute_f(m, int(n)) for n in r] for r in rows])
    np.testing.assert_allclose(m.slot_cost(rows), want_f)
    want = m.fixed_us + 7 * m.c_slot + want_f.sum(axis=1) + m.max_row_us * rows.max(axis=1)
    np.testing.assert_allclose(m.predict(rows), want)
    table = m.slot_cost_table(700)
    assert table.shape == (701,) and table[0] == 0.0
    np.testing.assert_allclose(table, [_brute_f(m, n) for n in range(701)])


@settings(max_examples=40, deadline=None)
@given(
    coefs=st.tuples(*[st.floats(0, 10, allow_nan=False)] * 10),
    tile=st.sampled_from([1, 2, 8, 64, 128]),
    n=st.integers(0, 10_000),
)
def test_slot_cost_is_zero_at_zero_and_non_decreasing(coefs, tile, n):
    m = CostModel(coefs[0], coefs[1], tile, *coefs[2:])
    f = m.slot_cost(np.array([0, n, n + 1]))
    assert f[0] == 0.0 and f[0] <= f[1] <= f[2]


def test_nnls_no_worse_than_projected_gradient():
    """Against projected gradient descent (an independent solver) on random small problems."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(size=(30, 4))
        b = rng.normal(size=30)
        x = nnls(a, b)
        assert np.all(x >= 0)
        y = np.zeros(4)
        step = 1.0 / np.linalg.norm(a, 2) ** 2
        for _ in range(20_000):
            y = np.maximum(y - step * a.T @ (a @ y - b), 0.0)
        assert np.sum((a @ x - b) ** 2) <= np.sum((a @ y - b) ** 2) + 1e-8


def test_fit_recovers_known_coefficients_from_exact_timings():
    rng = np.random.default_rng(1)
    # GPUs of 8, 16 and 32 slots: each sample's time from a predict() on its own slot count
    parts = [(_samples(rng, 70, s), s) for s in (8, 16, 32)]
    rows = np.zeros((210, 32), dtype=np.int64)
    for i, (r, s) in enumerate(parts):
        rows[70 * i : 70 * (i + 1), :s] = r
    times = np.concatenate([TRUE.predict(r) for r, _ in parts])
    slots = np.repeat([8, 16, 32], 70)
    m = fit_cost_model(rows, times, tile=128, meta={"gpu": "synthetic"}, num_slots_N=slots)
    for key in ("fixed_us", "max_row_us", "c_slot", "c_row", "c_tile", "c_active", "c_nlogn"):
        assert getattr(m, key) == pytest.approx(getattr(TRUE, key), rel=1e-6), key
    assert m.c_half_tile == m.c_head == m.c_big == 0.0  # shape terms only when asked
    assert m.meta["gpu"] == "synthetic"
    assert m.meta["fit"]["samples"] == 210 and m.meta["fit"]["median_rel_err"] < 1e-9
    assert np.max(relative_errors(m, rows, times, slots)) < 1e-9


def test_fit_with_shape_terms_recovers_them_and_ignores_zero_weight_samples():
    rng = np.random.default_rng(3)
    rows = np.concatenate([_samples(rng, 150, 16), rng.integers(0, 40, size=(60, 16)) * 8])
    times = SHAPED.predict(rows)
    weights = np.ones(len(rows))
    times[:20] *= 1.5  # corrupted samples that carry no weight
    weights[:20] = 0.0
    m = fit_cost_model(rows, times, tile=128, weights_N=weights, shape_terms=True)
    # one slot count: fixed_us and c_slot are one constant
    assert m.fixed_us + 16 * m.c_slot == pytest.approx(SHAPED.fixed_us + 16 * SHAPED.c_slot, rel=1e-6)
    for key in (
        "max_row_us",
        "c_row",
        "c_tile",
        "c_active",
        "c_nlogn",
        "c_half_tile",
        "c_head",
        "c_big",
    ):
        assert getattr(m, key) == pytest.approx(getattr(SHAPED, key), rel=1e-5, abs=1e-9), key
    assert np.max(relative_errors(m, rows[20:], times[20:])) < 1e-8


@pytest.mark.parametrize("weights", [np.zeros(10), -np.ones(10), np.ones(3), np.full(10, np.nan)])
def test_fit_rejects_bad_weights(weights):
    rows = np.arange(20).reshape(10, 2)
    with pytest.raises(ValueError, match="weights_N"):
        fit_cost_model(rows, np.ones(10), tile=128, weights_N=weights)


def test_fit_with_noise_predicts_within_noise_and_keeps_coefficients_non_negative():
    rng = np.random.default_rng(2)
    rows = _samples(rng, 300, 32)
    # a true model with a zero coefficient: the unconstrained fit could go negative, NNLS must not
    true = CostModel(fixed_us=30.0, max_row_us=0.0, tile=128, c_row=0.03, c_tile=2.0, c_active=0.0)
    times = true.predict(rows) * rng.lognormal(0.0, 0.02, size=len(rows))
    m = fit_cost_model(rows, times, tile=128)
    assert np.all(m.coefficients() >= 0)
    held = _samples(rng, 100, 32)
    assert np.median(relative_errors(m, held, true.predict(held))) < 0.02
    assert m.meta["fit"]["median_rel_err"] < 0.03


@pytest.mark.parametrize(
    "rows, times, match",
    [
        (np.ones((3, 2), dtype=int), np.ones(3), "need >= 7 samples"),
        (np.ones((8, 2), dtype=int), np.zeros(8), "> 0"),
        (-np.ones((6, 2), dtype=int), np.ones(6), ">= 0"),
        (np.ones(6, dtype=int), np.ones(6), "2-D"),
    ],
)
def test_fit_rejects_bad_input(rows, times, match):
    with pytest.raises(ValueError, match=match):
        fit_cost_model(rows, times, tile=128)


def test_json_round_trip(tmp_path):
    m = CostModel(
        10.0, 0.001, 64, 0.2, 0.01, 0.5, 3.0, 0.002, meta={"gpu": "x", "fit": {"median_rel_err": 0.01}}
    )
    path = tmp_path / "m.json"
    m.save(path)
    back = load(path)
    assert back == m and back.meta == m.meta
    assert load(str(path)) == m
    assert CostModel.from_json(json.loads(json.dumps(m.to_json()))) == m


def _write(tmp_path, obj) -> str:
    path = tmp_path / "bad.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def _edit(**changes):
    obj = TRUE.to_json()
    for k, v in changes.items():
        if v is None:
            del obj[k]
        else:
            obj[k] = v
    return obj


@pytest.mark.parametrize(
    "obj, match",
    [
        ("{not json", "not readable JSON"),
        ([1, 2], "expected a JSON object"),
        (_edit(format=None), "'format' must be"),
        (_edit(version=99), "unsupported version 99"),
        (_edit(c_tile=None), r"missing key\(s\) \['c_tile'\]"),
        (_edit(c_row=-0.1), "'c_row' must be finite and >= 0"),
        (_edit(c_big=-1.0), "'c_big' must be finite and >= 0"),
        (_edit(c_head="x"), "'c_head' must be a number, got str"),
        (_edit(fixed_us="12"), "'fixed_us' must be a number, got str"),
        (_edit(max_row_us=True), "'max_row_us' must be a number, got bool"),
        (_edit(tile=0), "'tile' must be an integer >= 1"),
        (_edit(tile=12.5), "'tile' must be an integer >= 1"),
        (_edit(meta=[1]), "'meta' must be an object"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, obj, match):
    path = _write(tmp_path, obj)
    with pytest.raises(ValueError, match=match) as info:
        load(path)
    assert "bad.json" in str(info.value)


def test_unknown_name_lists_bundled_models():
    with pytest.raises(ValueError, match="neither a file nor a bundled name"):
        load("h100-1x1")
    with pytest.raises(ValueError, match="neither a file nor a bundled name"):
        load("/no/such/file.json")


def test_constructor_validates():
    with pytest.raises(ValueError, match="'c_active' must be finite and >= 0"):
        CostModel(1.0, 0.0, 128, c_active=float("nan"))
    with pytest.raises(ValueError, match="rows must be non-negative integers"):
        TRUE.slot_cost(np.array([1.5]))


@pytest.mark.parametrize(
    "gpu, want",
    [
        ("NVIDIA H200", "h200-4096x1536"),
        ("NVIDIA H100 80GB HBM3", "h100-4096x1536"),
        ("cpu", "cpu-4096x1536"),
    ],
)
def test_bundled_name(gpu, want):
    assert bundled_name(gpu, 4096, 1536) == want


def test_predict_is_monotone_in_each_slot():
    rows = np.array(list(itertools.product([0, 7, 128, 300], repeat=3)))
    base = TRUE.predict(rows)
    for s in range(3):
        more = rows.copy()
        more[:, s] += 1
        assert np.all(TRUE.predict(more) >= base)


def test_bundled_models_load_and_match_their_names():
    names = bundled_models()
    assert "h200-4096x1536" in names and len(names) >= 7
    for name in names:
        m = load(name)
        assert name == bundled_name(m.meta["gpu"], m.meta["hidden"], m.meta["ffn"])
        assert m.meta["heldout"]["samples"] > 0
        even = np.array([[n] * 16 for n in (0, 8, 512, 4096)])
        assert np.all(np.diff(m.predict(even)) > 0)


@pytest.mark.parametrize("key", ["c_nlogn", "c_half_tile", "c_head", "c_big"])
def test_files_without_a_later_term_read_it_as_zero(tmp_path, key):
    obj = SHAPED.to_json()
    del obj[key]
    m = load(_write(tmp_path, obj))
    assert getattr(m, key) == 0.0 and m.c_tile == SHAPED.c_tile
    assert m == CostModel(**{**SHAPED.__dict__, key: 0.0})
