"""Distributed training on gloo (CPU, float32) against single-process training.

One launch of 4 processes trains the same small model on the same data four ways: plain EP
(EP=2, DP=4), MicroEP (EP=2, d=2, symmetric placement) with aux-loss-free expert bias, MicroEP
with random placements plus an aux loss, and MicroEP with whole blocks recomputed in the backward
(`--ac full`) and the expert slots gathered once per step (`--expert-gather step`, two
micro-batches); then stops and resumes a MicroEP run from a checkpoint.
Each run must reproduce the loss trajectory of one process training the same model with
grad_accum = 4 x the per-rank value (the same global batch: data.py slices it identically).
Tolerance: relative 1e-6 per step (float32 reductions in a different order, through AdamW;
measured differences are about 2e-8), for the losses and for the global gradient norms, clipped at
0.3 (active). The MicroEP run also records its routing and balance.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch
from _dist import run_workers

from micromoe.model import preset
from micromoe.sim import load_trace
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.parallel import ParallelState, resolve_layout
from micromoe.train.trainer import build_run

TOL = 1e-6
STEPS = 4
MODEL = {"num_layers": 2, "hidden": 32, "num_heads": 2, "ffn_hidden": 32, "num_experts": 8, "seq_len": 16}


def _train(rank: int, world: int, flags: dict, model: dict) -> list[tuple[float, float]]:
    """(loss, gradient norm before clipping) per step; clipped at 0.3, which is active."""
    tokens, vocab = load_tokens()
    base = {"max_steps": STEPS, "eval_interval": 0, "micro_batch": 2, "warmup_steps": 2, "grad_clip": 0.3}
    cfg = resolve("tiny", {**base, **flags})
    model_cfg = preset("tiny", **model)
    layout = resolve_layout(cfg, world) if world > 1 else None
    par = ParallelState(rank, world, torch.device("cpu"), layout, cfg.dispatcher)
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, model_cfg, par, TokenData(tokens, vocab, seed=cfg.seed), peak_flops=None)
    records = train(run)
    return [(r["loss"], r["grad_norm"]) for r in records]


def _cases(rank: int, world: int, root: str) -> dict[str, list[float]]:
    bias = {**MODEL, "expert_bias_rate": 1e-2}
    aux = {**MODEL, "aux_loss_coef": 1e-2}
    out = {
        "ep": _train(rank, world, {"dispatcher": "ep", "out": f"{root}/ep"}, bias),
        "microep": _train(
            rank, world, {"out": f"{root}/microep", "record_routing": f"{root}/routing.jsonl"}, bias
        ),
        "random": _train(rank, world, {"placement": "random", "out": f"{root}/random"}, aux),
        "recompute": _train(
            rank,
            world,
            {"out": f"{root}/ac", "ac": "full", "expert_gather": "step", "micro_batch": 1, "grad_accum": 2},
            bias,
        ),
    }
    first = _train(rank, world, {"out": f"{root}/resume", "max_steps": 2, "lr_decay_steps": STEPS}, bias)
    rest = _train(rank, world, {"out": f"{root}/resume", "resume": True, "lr_decay_steps": STEPS}, bias)
    out["resumed"] = first + rest
    return out


@pytest.fixture(scope="module")
def results():
    root = tempfile.mkdtemp(prefix="micromoe_train_dist_")
    dist_runs = run_workers(_cases, 4, root)
    single = {
        "bias": _train(
            0, 1, {"out": f"{root}/single_bias", "grad_accum": 4}, {**MODEL, "expert_bias_rate": 1e-2}
        ),
        "aux": _train(0, 1, {"out": f"{root}/single_aux", "grad_accum": 4}, {**MODEL, "aux_loss_coef": 1e-2}),
    }
    return dist_runs, single, Path(root)


def _close(got: list[tuple[float, float]], want: list[tuple[float, float]], what: str) -> None:
    """Losses and global gradient norms (each expert counted once however many replicas) agree."""
    assert len(got) == len(want) == STEPS, what
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for name, x, y in (("loss", a[0], b[0]), ("grad norm", a[1], b[1])):
            assert abs(x - y) <= TOL * abs(y), f"{what}: step {step} {name} {x} vs {y}"


def test_every_rank_logs_the_same_losses(results):
    dist_runs, _, _ = results
    for case in dist_runs[0]:
        assert all(r[case] == dist_runs[0][case] for r in dist_runs), case


def test_four_processes_match_one_process(results):
    dist_runs, single, _ = results
    _close(dist_runs[0]["ep"], single["bias"], "plain EP vs single process")
    _close(dist_runs[0]["microep"], single["bias"], "MicroEP vs single process")
    _close(dist_runs[0]["random"], single["aux"], "MicroEP random placement + aux loss vs single process")
    _close(dist_runs[0]["recompute"], single["bias"], "--ac full --expert-gather step vs single process")
    assert single["bias"][-1][0] < single["bias"][0][0], "the loss should fall over the first steps"
    assert all(norm > 0.3 for _, norm in single["bias"]), "the test should exercise clipping"


def test_ep_and_microep_same_trajectory(results):
    dist_runs, _, _ = results
    _close(dist_runs[0]["microep"], dist_runs[0]["ep"], "MicroEP vs plain EP")


def test_stop_and_resume_reproduces_losses(results):
    dist_runs, _, _ = results
    _close(dist_runs[0]["resumed"], dist_runs[0]["microep"], "resumed MicroEP run vs uninterrupted")


def test_resume_with_another_global_batch_or_model_is_a_clear_error(tmp_path):
    """Another world size is fine (the checkpoint reshards), another data stream or model is not."""
    cfg = resolve("tiny", {"max_steps": 1, "eval_interval": 0, "out": str(tmp_path), "micro_batch": 2})
    model_cfg = preset("tiny", **MODEL)
    tokens, vocab = load_tokens()
    par = ParallelState(0, 1, torch.device("cpu"), None, "microep")
    train(build_run(cfg, model_cfg, par, TokenData(tokens, vocab), peak_flops=None))
    par4 = ParallelState(0, 4, torch.device("cpu"), resolve_layout(cfg, 4), "microep")
    resumed = dataclasses.replace(cfg, resume=True)
    with pytest.raises(ValueError, match="--global-batch 2 but this run has 8"):
        build_run(resumed, model_cfg, par4, TokenData(tokens, vocab), peak_flops=None)
    with pytest.raises(ValueError, match="another model .differs in hidden"):
        other = dataclasses.replace(model_cfg, hidden=64)
        build_run(resumed, other, par, TokenData(tokens, vocab), peak_flops=None)


def test_log_has_balance_and_routing_log_replays(results):
    _, _, root = results
    recs = [json.loads(line) for line in (root / "microep" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(STEPS))
    for r in recs:
        assert len(r["layer_max_mean_load"]) == len(r["layer_ep_max_mean_load"]) == MODEL["num_layers"]
        assert r["max_mean_load"] >= 1.0 and r["ep_max_mean_load"] >= 1.0 and r["sched_us"] > 0
        assert r["tokens_per_s"] > 0
    ep = [json.loads(line) for line in (root / "ep" / "log.jsonl").read_text().splitlines()]
    for r in ep:  # plain EP executes exactly its own counterfactual
        assert r["layer_max_mean_load"] == r["layer_ep_max_mean_load"]
    trace = load_trace(root / "routing.jsonl")
    # [micro-batches, layers, G = 4 ranks of the MicroEP group, E]; every (token, choice) counted once
    assert trace.counts.shape == (STEPS, MODEL["num_layers"], 4, MODEL["num_experts"])
    per_rank = 2 * MODEL["seq_len"] * 2  # micro_batch x seq_len x top_k
    assert (trace.counts.sum(axis=3) == per_rank).all()
