"""Bad configurations and inputs fail with clear errors on every rank, before any collective
that could hang (gloo, 4 processes, under a timeout); the layer keeps working afterwards."""

from __future__ import annotations

import pytest
import torch
from _dist import dense_moe, forced_routing, rel_err, run_workers

from micromoe.plan import Placement
from micromoe.runtime import (
    MicroEPDispatcher,
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
)

CFG = MoEConfig(hidden=8, ffn_hidden=8, num_experts=8, top_k=2)


def _expect_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    return str(info.value)


class _Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    def mark(self, name: str) -> None:
        self.names.append(name)


def _worker(rank: int, world: int) -> dict[str, str]:
    msgs = {}
    layout = ParallelLayout(world, world, 2, 2)
    msgs["placement"] = _expect_error(
        lambda: build_process_groups(layout, Placement.symmetric(8, 16, 2), rank), "MicroEP group has"
    )
    groups = build_process_groups(layout, Placement.symmetric(4, CFG.num_experts, 2), rank)
    torch.manual_seed(0)
    msgs["ep_merge"] = _expect_error(
        lambda: apply_expert_parallel(MoELayer(CFG), groups, "ep"), "needs merge factor d=1"
    )
    torch.manual_seed(0)
    full = MoELayer(CFG)
    ref = [t.detach().clone() for t in (full.router.weight, full.experts.w_gate_up, full.experts.w_down)]
    msgs["gpus_per_node"] = _expect_error(
        lambda: MicroEPDispatcher(groups.microep, groups.microep_rank, groups.placement, gpus_per_node=3),
        "gpus_per_node=3 does not divide",
    )
    timer = _Recorder()
    layer = apply_expert_parallel(full, groups, "microep", timer=timer)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, CFG.hidden, generator=g)
    expert = forced_routing(6, CFG.num_experts, 2, 1.0, g)

    bad_expert = expert.clone()
    if rank == 1:
        bad_expert[0, 0] = CFG.num_experts
    msgs["expert_id"] = _expect_error(lambda: layer(x, forced_expert=bad_expert), "rank 1 .*out of range")
    bad_x = x.clone()
    if rank == 2:
        bad_x[3, 1] = float("inf")
    msgs["nonfinite"] = _expect_error(lambda: layer(bad_x, forced_expert=expert), "rank 2 .*non-finite")
    wide = torch.randn(6, CFG.hidden + 1) if rank == 0 else x
    msgs["hidden"] = _expect_error(lambda: layer(wide, forced_expert=expert), "rank 0 of the dispatch group")
    timer.names.clear()
    y = layer(x, forced_expert=expert)  # the group is still in step: a good call works
    assert rel_err(y, dense_moe(x, *ref, expert)) <= 1e-5
    phases = [
        "start",
        "count_exchange",
        "permute",
        "route",
        "dispatch_a2a",
        "slot_sort",
        "experts",
        "combine",
    ]
    assert timer.names == phases
    return msgs


@pytest.mark.timeout(180)
def test_errors_raise_on_every_rank_without_hanging():
    msgs = run_workers(_worker, 4, timeout=150)
    assert all("hidden size 9" in m["hidden"] for m in msgs[:1])  # the culprit names its reason
    assert all("rank 0" in m["hidden"] for m in msgs)
    assert all("d*EP = 2*2 = 4" in m["placement"] for m in msgs)
