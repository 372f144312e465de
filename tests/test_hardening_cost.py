"""Cost models are checked against the layer they will plan and refused at load when they cannot
plan at all: another hidden x FFN shape, a model that predicts no time for rows, one whose
predictions overflow the planners' integer arithmetic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.cli import main
from micromoe.plan.cost import CHECK_ROWS, PLANNABLE_US, CostModel, bundled_models, load
from micromoe.runtime.cost_select import check_layer_shape, load_cost_spec, resolve_cost_model

ROW_KEYS = ["max_row_us", "c_row", "c_tile", "c_active", "c_nlogn", "c_half_tile", "c_head", "c_big"]


def _file(tmp_path: Path, model: CostModel) -> Path:
    path = tmp_path / "model.json"
    model.save(path)
    return path


@settings(max_examples=80, deadline=None)
@given(
    coefs=st.fixed_dictionaries({k: st.floats(0, 1e3) for k in ROW_KEYS}),
    fixed=st.floats(0, 1e3),
    tile=st.sampled_from([1, 8, 128]),
)
def test_a_model_plans_iff_it_grows_with_rows_and_stays_in_range(coefs, fixed, tile):
    model = CostModel(fixed_us=fixed, tile=tile, **coefs)
    top = float(model.predict([[CHECK_ROWS]])[0])
    if not any(coefs.values()):
        with pytest.raises(ValueError, match="predicts the same time whatever the rows"):
            model.check_plannable()
    elif top >= PLANNABLE_US:
        with pytest.raises(ValueError, match="beyond the"):
            model.check_plannable()
    else:
        assert model.check_plannable() is model


@pytest.mark.parametrize(
    ("coefs", "message"),
    [
        ({"fixed_us": 0.0}, "whatever the rows"),
        ({"fixed_us": 50.0, "c_slot": 3.0}, "whatever the rows"),  # constants only: no plan is better
        ({"c_row": 1e300}, "beyond the 1e+12 us"),
        ({"max_row_us": 1e308, "c_big": 1e308}, "beyond the 1e+12 us"),  # inf when summed
        ({"c_nlogn": 1e7}, "beyond the 1e+12 us"),
    ],
)
def test_unplannable_files_are_refused_at_load_naming_the_file(tmp_path, coefs, message):
    path = _file(tmp_path, CostModel(**{"fixed_us": 1.0, "max_row_us": 0.0, "tile": 8, **coefs}))
    with pytest.raises(ValueError, match=f"cost model file {re.escape(str(path))} .*{re.escape(message)}"):
        load(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_cost_spec(str(path))


def test_simulate_refuses_an_unplannable_model_before_simulating(tmp_path, capsys):
    path = _file(tmp_path, CostModel(fixed_us=1.0, max_row_us=0.0, tile=8))
    assert main(["simulate", "--zipf", "1", "--cost-model", str(path)]) == 2
    assert "whatever the rows" in capsys.readouterr().err


@pytest.mark.parametrize("meta", [{"hidden": 64, "ffn": 128}, {"hidden": 16, "ffn": 16}, {}])
def test_a_model_of_another_layer_shape_is_refused(meta):
    model = CostModel(fixed_us=1.0, max_row_us=0.0, tile=8, c_row=0.1, meta=meta)
    if meta.get("hidden", 16) == 16:
        check_layer_shape(model, hidden=16, ffn=16, spec=model)  # same shape, or none recorded
        return
    with pytest.raises(ValueError, match="measured for hidden 64 x FFN 128, but the layer is 16 x 16"):
        check_layer_shape(model, hidden=16, ffn=16, spec=model)


def test_resolving_a_file_for_a_layer_checks_its_shape(tmp_path):
    path = _file(
        tmp_path, CostModel(fixed_us=1.0, max_row_us=0.0, tile=8, c_row=0.1, meta={"hidden": 64, "ffn": 8})
    )
    kwargs = {"device": torch.device("cpu"), "group": None, "num_slots": 4}
    with pytest.raises(ValueError, match=f"cost model '{path}' was measured for hidden 64 x FFN 8"):
        resolve_cost_model(str(path), hidden=32, ffn=8, **kwargs)
    assert resolve_cost_model(str(path), hidden=64, ffn=8, **kwargs).c_row == 0.1


def test_every_bundled_model_is_plannable_and_knows_its_shape():
    for name in bundled_models():
        model = load(name)
        hidden, ffn = (int(v) for v in name.split("-")[1].split("x"))
        assert (model.meta["hidden"], model.meta["ffn"]) == (hidden, ffn), name
        check_layer_shape(model, hidden=hidden, ffn=ffn, spec=name)
        assert json.loads(json.dumps(model.to_json()))["format"] == "micromoe-cost-model"
