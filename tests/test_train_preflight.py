"""Every value of `micromoe train` is checked once, named by its flag, before any process starts.

The rules are read off the parser, so a flag added later is covered too: every integer option
refuses -1 and every float option refuses NaN and the infinities, each naming that option. Sizes
that cannot fit in memory, data that is not a regular file, a cost model of another shape and a
dishonest resume are refused the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.cli import build_parser, main
from micromoe.plan.cost import CostModel
from micromoe.train.config import TrainConfig

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn-hidden", "16", "--seq-len", "8"]
TINY += ["--micro-batch", "2", "--eval-interval", "0", "--no-report"]


def _train_options() -> list[argparse.Action]:
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    return [a for a in sub._actions if a.option_strings and a.type in (int, float)]


INT_FLAGS = [a.option_strings[0] for a in _train_options() if a.type is int]
FLOAT_FLAGS = [a.option_strings[0] for a in _train_options() if a.type is float]


def _refused(capsys, argv: list[str], tmp_path: Path) -> str:
    code = main(["train", *TINY, "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("micromoe train: error: "), err
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks pass"
    return lines[0]


def test_the_parser_has_the_options_this_file_covers():
    assert {"--nproc", "--seed", "--global-batch", "--max-steps", "--layers"} <= set(INT_FLAGS)
    assert {"--lr", "--grad-clip", "--weight-decay", "--timeout", "--aux-loss"} <= set(FLOAT_FLAGS)


@pytest.mark.parametrize("flag", INT_FLAGS)
def test_every_integer_option_refuses_minus_one_naming_itself(capsys, tmp_path, flag):
    assert f"{flag} must be" in _refused(capsys, [flag, "-1"], tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_option_refuses_non_finite_values_naming_itself(capsys, tmp_path, flag, value):
    line = _refused(capsys, [f"{flag}={value}"], tmp_path)  # "=": argparse reads -inf as an option
    assert f"{flag} must be a finite number" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "0"], "--nproc must be a positive integer"),
        (["--global-batch", "0"], "--global-batch must be a positive integer"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--grad-clip", "-0.5"], "--grad-clip must be >= 0"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--val-fraction", "1"], "--val-fraction must be > 0 and < 1"),
        (["--seed", str(2**64)], "--seed must be < 2**63"),
        (["--top-k", "9"], "--top-k 9 exceeds the 8 experts (--experts)"),
        (["--dense-layers", "2"], "--dense-layers 2 exceeds the 1 layers"),
        (["--hidden", "17"], "--hidden 17 is not a multiple of --heads 2"),
        (["--hidden", "6"], "per head must be even"),
        (["--nproc", "2", "--dense-layers", "1"], "needs at least one MoE layer"),
        (["--nproc", "4", "--experts", "3"], "--experts 3 on ParallelLayout"),
        (["--replace-interval", "2"], "needs a distributed run"),
        (["--data", ""], "--data is empty; give a path"),
        (["--record-routing", " "], "--record-routing is empty"),
        (["--nproc", "2", "--cost-model", ""], "--cost-model is empty"),
    ],
)
def test_out_of_range_values_name_their_flag(capsys, tmp_path, argv, message):
    assert message in _refused(capsys, argv, tmp_path)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["lr", "min_lr", "weight_decay", "grad_clip", "timeout", "replace_min_gain"]),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not np.isfinite(v)),
        st.floats(max_value=-1e-300, allow_infinity=False),
    ),
)
def test_train_config_refuses_any_non_finite_or_negative_float(name, value):
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be"):
        TrainConfig(**{name: value})


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["micro_batch", "max_steps", "seed", "eval_interval", "warmup_steps"]),
    value=st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(0, 10), st.text(max_size=2)),
)
def test_train_config_refuses_negative_or_non_integer_counts(name, value):
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be"):
        TrainConfig(**{name: value})


# ------------------------------------------------------------------------------------------------
# memory
@pytest.mark.parametrize(
    "argv",
    [
        ["--hidden", "1000000", "--heads", "2"],
        ["--vocab-size", str(10**11)],
        ["--micro-batch", str(10**9)],
        ["--experts", str(10**8)],
        ["--layers", str(10**6)],
        ["--nproc", "512", "--experts", "512", "--ep", "256"],
    ],
)
def test_sizes_that_cannot_fit_are_refused_up_front(capsys, tmp_path, argv):
    err = _refused(capsys, argv, tmp_path)
    assert "memory plan does not fit" in err and "--force" in err, err


# ------------------------------------------------------------------------------------------------
# data
def test_data_that_is_not_a_regular_file_is_refused(capsys, tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        for path, kind in [
            ("/dev/zero", "a character device"),
            (str(fifo), "a FIFO (named pipe)"),
            (str(tmp_path / "zero.txt"), "a character device"),
            (str(tmp_path / "sock"), "a socket"),
        ]:
            line = _refused(capsys, ["--data", path], tmp_path)
            assert line.startswith("micromoe train: error: --data: ") and f"is {kind}, not a regular" in line
    only_special = tmp_path / "folder"
    only_special.mkdir()
    os.mkfifo(only_special / "x.txt")
    assert "holds no .txt/.md files" in _refused(capsys, ["--data", str(only_special)], tmp_path)


# ------------------------------------------------------------------------------------------------
# cost models
def _model_file(tmp_path: Path, **meta_and_coefs) -> str:
    base = CostModel(fixed_us=1.0, max_row_us=0.0, tile=8, c_row=0.01, meta={"hidden": 16, "ffn": 16})
    obj = base.to_json()
    obj.update({k: v for k, v in meta_and_coefs.items() if k != "meta"})
    obj["meta"].update(meta_and_coefs.get("meta", {}))
    path = tmp_path / "model.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_a_cost_model_of_another_shape_is_refused(capsys, tmp_path):
    bad = _model_file(tmp_path, meta={"hidden": 4096, "ffn": 1536})
    line = _refused(capsys, ["--nproc", "2", "--cost-model", bad], tmp_path)
    assert "measured for hidden 4096 x FFN 1536, but the layer is 16 x 16" in line
    assert "measured for hidden 4096" in _refused(capsys, ["--cost-model", "h200-4096x1536"], tmp_path)


@pytest.mark.parametrize(
    ("coefs", "message"),
    [
        ({"c_row": 0.0}, "predicts the same time whatever the rows"),
        ({"c_row": 1e300}, "beyond the 1e+12 us"),
        ({"c_row": 0.0, "max_row_us": 1e308}, "beyond the 1e+12 us"),
    ],
)
def test_a_cost_model_that_predicts_nothing_or_overflows_is_refused_at_load(capsys, tmp_path, coefs, message):
    assert message in _refused(
        capsys, ["--nproc", "2", "--cost-model", _model_file(tmp_path, **coefs)], tmp_path
    )


# ------------------------------------------------------------------------------------------------
# resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *TINY, "--max-steps", "2", "--out", str(out)]) == 0
    return out


def test_resume_with_max_steps_not_above_the_checkpoint_says_so(capsys, finished_run):
    for steps in ("1", "2"):
        code = main(["train", *TINY, "--out", str(finished_run), "--resume", "--max-steps", steps])
        err = capsys.readouterr().err
        assert code == 2 and "the newest checkpoint in" in err and "is at step 2" in err
        assert f"--max-steps {steps} is not above it" in err


def test_resume_on_other_data_needs_allow_data_change(capsys, finished_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("other words entirely. " * 400)
    argv = ["train", *TINY, "--out", str(finished_run), "--resume", "--max-steps", "3", "--data", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not what the run in" in err and "--allow-data-change" in err
    config = json.loads((finished_run / "config.json").read_text())
    assert config["data"]["tokens"] == 1115394 and config["precision"]["master_weights"] == "fp32"
    assert main([*argv, "--allow-data-change"]) == 0
    assert json.loads((finished_run / "config.json").read_text())["data"]["source"] == str(other)


def test_an_empty_out_is_refused_not_taken_as_the_current_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--out", ""]) == 2
    assert "--out is empty; give a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
