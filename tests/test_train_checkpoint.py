"""Checkpoints on one process: a save killed at any point leaves the previous checkpoint intact,
and resuming from it reproduces the uninterrupted losses exactly (float32, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from micromoe.model import preset
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.parallel import ParallelState
from micromoe.train.trainer import build_run

MODEL = {
    "num_layers": 2,
    "hidden": 32,
    "num_heads": 2,
    "ffn_hidden": 32,
    "seq_len": 16,
    "expert_bias_rate": 1e-2,
}


def _train(out, **flags) -> list[float]:
    tokens, vocab = load_tokens()
    base = {"max_steps": 4, "lr_decay_steps": 4, "eval_interval": 0, "micro_batch": 2, "out": str(out)}
    cfg = resolve("tiny", {**base, **flags})
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    out.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab), peak_flops=None)
    return [r["loss"] for r in train(run)]


class Killed(Exception):
    pass


@pytest.mark.parametrize("where", ["rank file", "before pointer"])
def test_killed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    want = _train(tmp_path / "straight")
    first = _train(tmp_path / "run", max_steps=2)
    assert first == want[:2]
    real_save, real_replace = torch.save, os.replace

    def half_save(obj, path):  # the process dies with half a file on disk
        real_save(obj, path)
        with open(path, "r+b") as fp:
            fp.truncate(os.path.getsize(path) // 2)
        raise Killed

    def replace_then_die(src, dst):
        if str(dst).endswith(ckpt.LATEST):
            raise Killed
        real_replace(src, dst)

    if where == "rank file":
        monkeypatch.setattr(ckpt.torch, "save", half_save)
    else:
        monkeypatch.setattr(ckpt.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        _train(tmp_path / "run", max_steps=4, resume=True)
    monkeypatch.undo()
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert folder.name == "step_00000002" and ckpt.read_meta(folder)["step"] == 2
    # resuming after the kill loses only the steps since the last checkpoint
    rest = _train(tmp_path / "run", max_steps=4, resume=True)
    assert first + rest == want
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]  # the killed run's steps 2-3 were replaced, not duplicated


def test_checkpoint_holds_config_placements_and_data_position(tmp_path):
    _train(tmp_path, max_steps=1)
    folder = ckpt.latest_checkpoint(tmp_path)
    meta = ckpt.read_meta(folder)
    assert meta["step"] == 1 and meta["world"] == 1 and meta["model"]["hidden"] == 32
    assert meta["train"]["max_steps"] == 1 and meta["placements"] == []
    state = ckpt.load_rank_state(folder, 0)
    assert state["data"] == {"seed": 0, "next_step": 1}
    assert set(state) >= {"model", "optimizer", "rng"}
    with pytest.raises(ValueError, match="no file for rank 3"):
        ckpt.load_rank_state(folder, 3)


def test_rank_state_restores_rng_from_cpu_tensors(tmp_path):
    """The loaded RNG states are CPU tensors whatever device the run is on (set_rng_state takes
    nothing else), and restoring them repeats the saved stream."""
    torch.manual_seed(3)
    saved = ckpt.rng_state()
    want = torch.rand(5)
    ckpt.save_checkpoint(tmp_path, 1, {}, {"rng": saved}, rank=0, distributed=False)
    state = ckpt.load_rank_state(ckpt.latest_checkpoint(tmp_path), 0)
    rng = [state["rng"]["torch"], *state["rng"].get("cuda", [])]
    assert all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in rng)
    torch.rand(7)  # move the stream on
    ckpt.set_rng_state(state["rng"])
    torch.testing.assert_close(torch.rand(5), want, rtol=0, atol=0)


def test_compatibility_check_names_the_difference():
    meta = {
        "world": 4,
        "dp": 4,
        "ep": 2,
        "merge": 2,
        "dispatcher": "microep",
        "placement": "symmetric",
        "micro_batch": 4,
        "grad_accum": 2,
        "seed": 0,
        "model": {},
    }
    ckpt.check_compatible(meta, dict(meta))
    changes = (
        ("world", 8),
        ("ep", 4),
        ("placement", "random"),
        ("dispatcher", "ep"),
        ("micro_batch", 8),
        ("grad_accum", 1),
        ("seed", 1),
    )
    for key, value in changes:
        with pytest.raises(ValueError, match=f"{key}="):
            ckpt.check_compatible(meta, {**meta, key: value})


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    _train(tmp_path, max_steps=1)
    tokens, vocab = load_tokens()
    cfg = resolve("tiny", {"max_steps": 2, "out": str(tmp_path), "resume": True, "micro_batch": 2})
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    with pytest.raises(ValueError, match="resharding is not supported"):
        build_run(
            cfg, preset("tiny", **{**MODEL, "hidden": 64}), par, TokenData(tokens, vocab), peak_flops=None
        )
