"""MicroEP dispatcher planning for predicted time (gloo, CPU, 4 processes): the layer still equals
the dense reference, every rank runs the same time plan, and "auto" gives every rank the model
calibrated on the group's first rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import dense_moe, forced_routing, rel_err, run_workers

from micromoe.plan import Placement, schedule
from micromoe.plan.cost import CostModel
from micromoe.runtime import MoEConfig, MoELayer, ParallelLayout, apply_expert_parallel, build_process_groups
from micromoe.runtime import cost_select as cs
from micromoe.runtime.cost_select import load_cost_spec

HIDDEN, FFN, TOP_K, EXPERTS = 8, 16, 2, 8
# tiles of 4 rows and a large per-group cost: the time plan consolidates fragments the token plan splits
MODEL = CostModel(fixed_us=1.0, max_row_us=0.0, tile=4, c_row=0.01, c_tile=2.0, c_active=5.0)


def _worker(rank: int, world: int) -> list[dict]:
    return [_one(rank, world, spec) for spec in (MODEL, "auto")]


def _one(rank: int, world: int, spec) -> dict:
    layout = ParallelLayout(world, world, 2, 2)
    placement = Placement.symmetric(layout.microep_size, EXPERTS, 2)
    groups = build_process_groups(layout, placement, rank)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(HIDDEN, FFN, EXPERTS, TOP_K))
    ref = [layer.router.weight.detach().clone(), layer.experts.w_gate_up.detach().clone()]
    ref.append(layer.experts.w_down.detach().clone())
    apply_expert_parallel(layer, groups, "microep", cost_model=spec)
    model = layer.dispatcher.cost_model
    g = torch.Generator().manual_seed(7)
    per_rank = 24
    x = torch.randn(world * per_rank, HIDDEN, generator=g)
    expert = forced_routing(world * per_rank, EXPERTS, TOP_K, 1.2, g)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    y = layer(x[sl], forced_expert=expert[sl]).detach()
    y_ref = dense_moe(x, *ref, expert)[sl].detach()
    plan = layer.last_stats.plan
    counts = plan.counts.copy()
    want = schedule(counts, placement, cost=model)
    return {
        "err": rel_err(y, y_ref),
        "model": model.to_json(),
        "quota": plan.replica_quota.tobytes(),
        "same_as_planner": bool(np.array_equal(plan.replica_quota, want.replica_quota)),
        "token_quota": schedule(counts, placement).replica_quota.tobytes(),
        "predicted": plan.predicted_us.tolist(),
    }


def test_layer_plans_time_and_matches_dense():
    by_rank = run_workers(_worker, 4)  # one launch for both specs (process start-up dominates)
    for i, spec in enumerate((MODEL, "auto")):
        out = [r[i] for r in by_rank]
        assert all(r["err"] <= 1e-5 for r in out), spec
        assert all(r["same_as_planner"] for r in out), spec
        assert len({r["quota"] for r in out}) == 1, spec  # the identical plan on every rank
        assert all(r["model"] == out[0]["model"] for r in out), spec  # "auto": rank 0's model everywhere
        if spec is MODEL:
            assert out[0]["model"] == MODEL.to_json()
            assert out[0]["quota"] != out[0]["token_quota"]  # the time plan differs from the token plan


def test_cost_spec_errors():
    assert load_cost_spec(None) is None and load_cost_spec(MODEL) is MODEL
    with pytest.raises(ValueError, match="apply_expert_parallel"):
        load_cost_spec("auto")
    with pytest.raises(ValueError, match="neither a file nor a bundled name"):
        load_cost_spec("no-such-model")
    with pytest.raises(ValueError, match="cost must be"):
        load_cost_spec(3.5)


def _calibration_fails_on_rank0(rank: int, world: int) -> str:
    if rank == 0:

        def boom(*args, **kwargs):
            raise RuntimeError("out of memory while timing")

        cs.calibrate_cost_model = boom  # this worker process only
    try:
        cs.resolve_cost_model(
            "auto", hidden=HIDDEN, ffn=FFN, device=torch.device("cpu"), group=dist.group.WORLD, num_slots=2
        )
    except (RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_auto_calibration_failure_raises_on_every_rank():
    """A calibration that fails on the group's first rank fails every rank (the others would
    otherwise wait in the broadcast forever)."""
    out = run_workers(_calibration_fails_on_rank0, 2, timeout=60)
    assert out[0] == "RuntimeError: out of memory while timing"
    assert (
        out[1].startswith("ValueError: cost_model='auto' failed on the group's first rank")
        and "out of memory" in out[1]
    )
