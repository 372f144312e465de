"""Adaptive replacement's rules in real training runs (4 gloo processes, EP=2, d=2, top-1, 8 experts).

The routing is skewed on purpose: a forward pre-hook sets each router's aux-loss-free selection bias
to +1 on one "hot" expert before every micro-batch, so every token picks it (softmax probabilities
are < 1). Which expert is hot follows the layer's micro-batch count, the same on every rank.

- shift: expert 0 is hot for the first 4 micro-batches, then expert 5. The cold start places the
  layers for expert 0 after 2 micro-batches; after the shift the realized score passes the
  threshold and the realized-imbalance trigger (2 consecutive micro-batches) re-places them, long
  before any interval check is due. The losses equal those of the same run without replacement.
- swing: the hot expert alternates every step (2 micro-batches). With a zero cooldown a layer is
  re-placed for the swing 2 micro-batches after its cold start; a cooldown of 3 micro-batches
  blocks the triggers that fall inside it, so replacements are further apart than the cooldown.
Every event names its rule and gives its reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import run_workers

from micromoe.model import preset
from micromoe.plan import cost as cost_models
from micromoe.plan.cost import CostModel
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.parallel import ParallelState, resolve_layout
from micromoe.train.trainer import build_run

MODEL = {"num_layers": 2, "hidden": 16, "num_heads": 2, "ffn_hidden": 16, "num_experts": 8, "seq_len": 16}
MODEL |= {"top_k": 1, "expert_bias_rate": 1e-9}  # the bias exists; its own updates are negligible
BASE = {"eval_interval": 0, "micro_batch": 2, "grad_accum": 2, "warmup_steps": 2, "save": False}
BASE |= {"replace_threshold": 1.05, "replace_window": 1}
THRESHOLD = 1.05


def _shift(calls: int) -> int:
    return 0 if calls < 4 else 5


def _swing(calls: int) -> int:
    return 0 if (calls // 2) % 2 == 0 else 5


def _train(rank: int, world: int, root: str, name: str, hot, flags: dict) -> dict:
    """Train with the hot-expert hook; returns the log's losses and events and the hook's checks."""
    tokens, vocab = load_tokens()
    cfg = resolve("tiny", {**BASE, **flags, "out": f"{root}/{name}"})
    layout = resolve_layout(cfg, world)
    par = ParallelState(rank, world, torch.device("cpu"), layout, cfg.dispatcher)
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab, seed=0), peak_flops=None)
    for layer in run.model.moe_layers():
        calls = [0]

        def skew(module, args, calls=calls) -> None:
            bias = torch.zeros_like(module.router.expert_bias)
            bias[hot(calls[0])] = 1.0
            module.router.expert_bias.copy_(bias)
            calls[0] += 1

        layer.register_forward_pre_hook(skew)
    records = train(run)
    return {
        "loss": [r["loss"] for r in records],
        "events": [
            {k: v for k, v in e.items() if k != "ms"} for r in records for e in r.get("replacements", [])
        ],
        "checks": list(getattr(run.replacer, "checks", [])),
    }


def _check_run_passes_seed_and_cost(rank: int, world: int, root: str) -> None:
    """build_run gives the hook the run's seed and the dispatchers' resolved cost model."""
    tokens, vocab = load_tokens()
    # a bundled model's coefficients, recorded as measured for this test's layer shape (a model
    # of another shape is refused)
    bundled = cost_models.load("h200-2048x768")
    path = f"{root}/cost-model-rank{rank}.json"
    meta = {**bundled.meta, "hidden": MODEL["hidden"], "ffn": MODEL["ffn_hidden"]}
    CostModel(**{**bundled.__dict__, "meta": meta}).save(path)
    flags = {**BASE, "replace_interval": 1, "seed": 7, "cost_model": path, "out": f"{root}/cost"}
    cfg = resolve("tiny", flags)
    par = ParallelState(rank, world, torch.device("cpu"), resolve_layout(cfg, world), cfg.dispatcher)
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab, seed=7), peak_flops=None)
    policy = run.replacer.policy
    assert policy.seed == 7
    assert policy.cost is not None and policy.cost == run.model.moe_layers()[0].dispatcher.cost_model


def _check_auto_cost_shared_across_microep_groups(rank: int, world: int, root: str) -> None:
    """EP=1, d=2: two MicroEP groups, each calibrating its own "auto" model for its dispatchers;
    the world-wide policy must score with one model (rank 0's) on every rank, else ranks choose
    different placements."""
    tokens, vocab = load_tokens()
    flags = {**BASE, "replace_interval": 1, "ep": 1, "cost_model": "auto", "out": f"{root}/auto"}
    cfg = resolve("tiny", flags)
    par = ParallelState(rank, world, torch.device("cpu"), resolve_layout(cfg, world), cfg.dispatcher)
    assert par.layout.num_microep_groups == 2
    run = build_run(cfg, preset("tiny", **MODEL), par, TokenData(tokens, vocab, seed=0), peak_flops=None)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, run.replacer.policy.cost.to_json())  # collective (world)
    assert all(c == everyone[0] for c in everyone), "every rank's policy scores with rank 0's model"
    ours = run.model.moe_layers()[0].dispatcher.cost_model
    assert rank >= 2 or run.replacer.policy.cost == ours  # group 0 calibrated rank 0's model


def _cases(rank: int, world: int, root: str) -> dict:
    _check_run_passes_seed_and_cost(rank, world, root)
    _check_auto_cost_shared_across_microep_groups(rank, world, root)
    trigger = {"replace_interval": 100, "replace_trigger_after": 2, "replace_cooldown": 2, "max_steps": 4}
    swing = {"replace_interval": 100, "replace_trigger_after": 1, "replace_warmup": 1, "max_steps": 6}
    return {
        "shift": _train(rank, world, root, "shift", _shift, trigger),
        "shift_off": _train(rank, world, root, "shift_off", _shift, {"replace_interval": 0, "max_steps": 4}),
        "flap": _train(rank, world, root, "flap", _swing, {**swing, "replace_cooldown": 0}),
        "cooldown": _train(rank, world, root, "cooldown", _swing, {**swing, "replace_cooldown": 3}),
    }


@pytest.fixture(scope="module")
def runs() -> dict:
    results = run_workers(_cases, 4, tempfile.mkdtemp(prefix="micromoe_policy_"))
    for case in results[0]:  # every rank logs the same events and takes the same decisions
        assert all(r[case]["events"] == results[0][case]["events"] for r in results), case
        assert all(r[case]["checks"] == results[0][case]["checks"] for r in results), case
    return results[0]


def _check_reasons(events: list[dict]) -> None:
    opening = {"cold-start": "cold start: ", "realized": "realized score > ", "interval": "interval check"}
    for e in events:
        for rule in e["rule"].split("+"):
            assert rule in opening, e
        assert e["reason"].startswith(opening[e["rule"].split("+")[0]]), e
        assert e["bytes_moved"] == 0 and e["slots_changed"] > 0 and e["new_score"] < e["old_score"], e


@pytest.mark.timeout(300)
def test_realized_imbalance_triggers_a_replacement(runs):
    events = runs["shift"]["events"]
    _check_reasons(events)
    # micro-batches 1-2 (step 0): cold start for expert 0; 5-6 (step 2): hot expert 5, realized trigger
    assert [(e["step"], e["layer"], e["rule"]) for e in events] == [
        (0, 0, "cold-start"),
        (0, 1, "cold-start"),
        (2, 0, "realized"),
        (2, 1, "realized"),
    ]
    for e in events[2:]:
        assert e["micro_batches"] == 6 and f"realized score > {THRESHOLD} for 2 consecutive" in e["reason"]
        assert e["old_score"] > 1.5  # every token on the new hot expert's few replicas
    over = [c for c in runs["shift"]["checks"] if c["step"] == 2 and c["layer"] == 0]
    assert [c["realized"] > THRESHOLD for c in over] == [True, True]
    after = [c["realized"] for c in runs["shift"]["checks"] if c["step"] == 3]
    assert after and max(after) <= THRESHOLD, "the new placement balances the skewed loads"
    for a, b in zip(runs["shift"]["loss"], runs["shift_off"]["loss"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), "replacement changes where experts run, never the losses"


def test_cooldown_prevents_flapping(runs):
    cooldown = 3
    for case in ("flap", "cooldown"):
        _check_reasons(runs[case]["events"])
    flap = [e["micro_batches"] for e in runs["flap"]["events"] if e["layer"] == 0]
    held = [e["micro_batches"] for e in runs["cooldown"]["events"] if e["layer"] == 0]
    gaps = [b - a for a, b in zip(flap, flap[1:], strict=False)]
    assert gaps and min(gaps) <= cooldown, f"without a cooldown the layer follows the swing at once: {flap}"
    assert held[0] == flap[0] == 1, (held, flap)  # the same cold start
    assert all(b - a > cooldown for a, b in zip(held, held[1:], strict=False)), held
    blocked = [
        c
        for c in runs["cooldown"]["checks"]
        if c["reason"].startswith("cooldown") and c["realized"] > THRESHOLD and c["layer"] == 0
    ]
    assert blocked, "the cooldown held back micro-batches whose realized score was over the threshold"
