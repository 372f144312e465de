"""Calibration on CPU with tiny shapes: the designed samples, the fit's error fields, the file."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import micromoe.runtime.calibrate as cal
from micromoe.cli import main
from micromoe.plan.cost import load, relative_errors
from micromoe.runtime.calibrate import calibrate, calibrate_cost_model
from micromoe.runtime.calibrate_design import ALIGN, KINDS, design, split_rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slots", [1, 2, 5, 32])
def test_split_rows_shape_alignment_and_total(kind, slots):
    rng = np.random.default_rng(0)
    total = 4096
    rows = split_rows(slots, total, kind, rng)
    assert rows.shape == (slots,) and rows.dtype == np.int64
    assert rows.min() >= 0 and rows.sum() > 0 and np.all(rows % ALIGN == 0)
    if kind != "offtile":  # the others keep the total up to rounding to ALIGN per slot
        assert abs(int(rows.sum()) - total) <= ALIGN * slots
    if kind == "single":
        assert np.count_nonzero(rows) == 1
    if kind == "even":
        assert rows.max() - rows.min() <= ALIGN


def test_split_rows_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown sample kind 'zipf'"):
        split_rows(4, 100, "zipf", np.random.default_rng(0))


def test_design_covers_every_kind_slot_count_and_total_early():
    first = list(zip(range(3 * 4 * len(KINDS)), design([4, 8, 16], [64, 256, 1024, 4096]), strict=False))
    kinds = {k for _, (_, k) in first}
    slots = {len(r) for _, (r, _) in first}
    assert kinds == set(KINDS) and slots == {4, 8, 16}
    # reproducible
    a = [r.tolist() for r, _ in list(design([4], [64], seed=3))]
    b = [r.tolist() for r, _ in list(design([4], [64], seed=3))]
    assert a == b


@pytest.fixture(scope="module")
def cpu_model():
    return calibrate(32, 64, "cpu", slot_counts=(2, 4, 8), totals=(64, 256, 1024), budget_s=2.0, reps=3)


def test_cpu_calibration_fields_and_fit(cpu_model):
    model, samples = cpu_model
    meta = model.meta
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert (meta["hidden"], meta["ffn"]) == (32, 64)
    for part in ("fit", "heldout"):
        assert meta[part]["samples"] >= 3
        assert 0 <= meta[part]["median_rel_err"] <= meta[part]["p90_rel_err"] < np.inf
    assert meta["fit"]["samples"] + meta["heldout"]["samples"] == len(samples.times_us) >= 12
    assert samples.heldout.sum() == meta["heldout"]["samples"]
    # the recorded held-out error is the model's error on exactly those samples
    held = samples.heldout
    err = relative_errors(model, samples.rows[held], samples.times_us[held], samples.slots[held])
    assert np.median(err) == pytest.approx(meta["heldout"]["median_rel_err"])
    # CPU timings are noisy; a loose bound only says the form describes them at all
    assert meta["heldout"]["median_rel_err"] < 0.5


def test_cpu_model_predictions_are_positive_and_monotone(cpu_model):
    model, _ = cpu_model
    even = np.array([[n] * 4 for n in (0, 8, 64, 256, 1024)])
    pred = model.predict(even)
    assert np.all(pred > 0) and np.all(np.diff(pred) >= 0)
    table = model.slot_cost_table(2048)
    assert table[0] == 0 and np.all(np.diff(table) >= 0)


def test_calibrate_command_writes_a_loadable_file(tmp_path, capsys):
    out, raw = tmp_path / "cpu.json", tmp_path / "samples.json"
    argv = ["calibrate", "--hidden", "16", "--ffn", "32", "--out", str(out), "--device", "cpu"]
    argv += [
        "--budget-s",
        "5",
        "--slots",
        "2,4",
        "--rows",
        "32,128",
        "--reps",
        "2",
        "--samples-out",
        str(raw),
    ]
    assert main(argv) == 0
    assert "held-out relative error median" in capsys.readouterr().out
    model = load(out)
    assert model.meta["hidden"] == 16 and model.meta["heldout"]["samples"] >= 3
    samples = json.loads(raw.read_text())
    assert len(samples["rows"]) == len(samples["times_us"]) == len(samples["kinds"])


def test_calibrate_command_errors(capsys):
    argv = ["calibrate", "--hidden", "16", "--ffn", "32", "--out", "x.json", "--device", "cpu"]
    assert main([*argv, "--budget-s", "0"]) == 2
    assert "--budget-s must be a finite number of seconds > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--slots", "0,4"])


def test_fast_calibration_on_cpu():
    model = calibrate_cost_model(16, 32, "cpu", budget_s=0.5, num_slots=4, rows_per_gpu=128)
    assert model.meta["slot_counts"] == [2, 4, 8] and model.meta["totals"] == [32, 64, 128, 256]
    assert model.meta["heldout"]["samples"] >= 3


def test_warm_up_runs_once_per_slot_count_before_the_budget(monkeypatch):
    """A fresh process's one-time start-up (here a slow first run per slot count) is paid before the
    budget starts, so it neither counts as a sample nor cuts the measurement short."""
    calls: list[tuple[int, ...]] = []
    real = cal.ExpertTimer.time_us

    def slow_first(self, rows, *, reps, warmup=1):
        first = len(rows) not in {len(c) for c in calls}
        calls.append(tuple(int(r) for r in rows))
        if first:
            time.sleep(0.4)  # stands in for CUDA and GEMM-library start-up
        return real(self, rows, reps=reps, warmup=warmup)

    monkeypatch.setattr(cal.ExpertTimer, "time_us", slow_first)
    model, samples = calibrate(16, 32, "cpu", slot_counts=(2, 4), totals=(64, 256), budget_s=0.6, reps=1)
    # the first call per slot count is the warm-up: an even split of the smallest total
    assert calls[:2] == [(32, 32), (16, 16, 16, 16)]
    assert len(samples.times_us) == len(calls) - 2  # warm-up runs are not samples
    # had the 0.8 s start-up counted against the 0.6 s budget, it would stop at the minimum
    assert len(samples.times_us) > cal.MIN_SAMPLES
    assert samples.startup_s >= 0.8 and model.meta["startup_seconds"] >= 0.8
    assert model.meta["seconds"] >= model.meta["startup_seconds"]
