"""Distributed MoE layer (gloo, CPU, 4 and 8 processes) against a single-process dense MoE.

Each launch runs many cases (process start-up dominates the cost). For every case and routing:
forward output, input gradient, router gradient and every expert gradient equal the dense
reference (float32, rel err <= 1e-5); the gathered counts, per-slot loads and planned per-GPU
loads agree; a token-identity probe shows every (token, expert) pair reached exactly one replica of
the right expert; every expert is owned by exactly one rank of each MicroEP group; after SGD steps
the owners of each expert (one per MicroEP group) are bit-identical and match the reference
trained on the same batches; with `gather="step"` and two micro-batches per step the gradients are
those of one step over both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import dense_moe, forced_routing, rel_err, run_workers

from micromoe.plan import Placement, certificate_bound
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    sync_gradients,
)

TOL = 1e-5
HIDDEN, FFN, TOP_K = 8, 16, 2
SKEWS = (0.0, 1.5, float("inf"))  # uniform, Zipf 1.5, every token on experts 0 and 1


@dataclass(frozen=True)
class Case:
    dispatcher: str  # "ep" | "microep"
    ep: int
    merge: int
    placement: str  # "ep" | "symmetric" | "random" | "asymmetric"
    num_experts: int
    skews: tuple[float, ...] = SKEWS


def _placement(case: Case, num_gpus: int) -> Placement:
    e, d = case.num_experts, case.merge
    if case.placement == "ep":
        return Placement.expert_parallel(num_gpus, e, 1)
    if case.placement == "symmetric":
        return Placement.symmetric(num_gpus, e, d)
    if case.placement == "random":
        return Placement.random(num_gpus, e, d, seed=3)
    loads = 1000.0 / np.arange(1, e + 1) ** 1.2
    return Placement.asymmetric(loads, num_gpus, e * d // num_gpus, seed=1)


def _num_tokens(rank: int) -> int:
    return 10 + 3 * rank  # uneven on purpose


def _global_batch(world: int, e: int, skew: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(_num_tokens(r) for r in range(world))
    x = torch.randn(total, HIDDEN, generator=g)
    expert = forced_routing(total, e, TOP_K, skew, g)
    coef = torch.randn(total, HIDDEN, generator=g)  # loss_r = sum(y_r * coef_r)
    return x, expert, coef


def _my_slice(rank: int) -> slice:
    start = sum(_num_tokens(r) for r in range(rank))
    return slice(start, start + _num_tokens(rank))


def _build(rank: int, world: int, case: Case, gather: str = "micro"):
    layout = ParallelLayout(world, world, case.ep, case.merge)
    placement = _placement(case, layout.microep_size)
    groups = build_process_groups(layout, placement, rank)
    torch.manual_seed(0)  # every rank builds the same full layer
    layer = MoELayer(MoEConfig(HIDDEN, FFN, case.num_experts, TOP_K))
    ref = {
        "router": layer.router.weight.detach().clone(),
        "w_gate_up": layer.experts.w_gate_up.detach().clone(),
        "w_down": layer.experts.w_down.detach().clone(),
    }
    apply_expert_parallel(layer, groups, case.dispatcher, gather=gather)
    return groups, layer, ref


def _reference(ref, x, expert, coef, world):
    leaves = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    xr = x.clone().requires_grad_(True)
    y = dense_moe(xr, leaves["router"], leaves["w_gate_up"], leaves["w_down"], expert)
    ((y * coef).sum() / world).backward()  # the DP objective: mean of the ranks' losses
    return y.detach(), xr.grad, {k: v.grad for k, v in leaves.items()}


def _check_case(rank: int, world: int, case: Case) -> None:
    groups, layer, ref = _build(rank, world, case)
    _check_ownership(layer, groups, world)
    sl = _my_slice(rank)
    for i, skew in enumerate(case.skews):
        x, expert, coef = _global_batch(world, case.num_experts, skew, seed=100 + i)
        y_ref, gx_ref, g_ref = _reference(ref, x, expert, coef, world)
        layer.zero_grad(set_to_none=True)
        xr = x[sl].clone().requires_grad_(True)
        y = layer(xr, forced_expert=expert[sl])
        (y * coef[sl]).sum().backward()
        sync_gradients(layer, groups)
        where = f"{case} skew={skew} rank={rank}"
        assert rel_err(y.detach(), y_ref[sl]) <= TOL, f"forward {where}"
        assert rel_err(xr.grad, gx_ref[sl] * world) <= TOL, f"input grad {where}"
        assert rel_err(layer.router.weight.grad, g_ref["router"]) <= TOL, f"router grad {where}"
        for j, e in enumerate(layer.experts.owned):
            for name in ("w_gate_up", "w_down"):
                got = getattr(layer.experts, name).grad[j]
                assert rel_err(got, g_ref[name][e]) <= TOL, f"{name} grad of expert {e} {where}"
        _check_counters(layer, groups, expert, world)
        _check_token_identity(layer, groups, expert, world, rank)


def _check_ownership(layer: MoELayer, groups, world: int) -> None:
    """Each MicroEP group owns every expert exactly once; owners hold the reference's rows."""
    everyone: list = [None] * world
    dist.all_gather_object(everyone, layer.experts.owned)  # collective (world)
    size = groups.layout.microep_size
    for first in range(0, world, size):
        owned = sorted(e for r in range(first, first + size) for e in everyone[r])
        assert owned == list(range(groups.placement.num_experts)), f"group at rank {first} owns {owned}"


def _group_counts(groups, expert: torch.Tensor, world: int) -> np.ndarray:
    size = groups.layout.microep_size
    first = groups.rank - groups.microep_rank
    rows = []
    for r in range(first, first + size):
        rows.append(
            np.bincount(expert[_my_slice(r)].reshape(-1).numpy(), minlength=groups.placement.num_experts)
        )
    return np.stack(rows)


def _check_counters(layer: MoELayer, groups, expert: torch.Tensor, world: int) -> None:
    """Gathered counts are the true ones; per-slot loads are the planned ones."""
    stats, me = layer.last_stats, groups.microep_rank
    counts = _group_counts(groups, expert, world)
    np.testing.assert_array_equal(stats.counts_ge, counts)
    slots = np.array(groups.local_slots)
    if stats.plan is None:  # plain EP: a slot computes every row of its expert in the group
        np.testing.assert_array_equal(stats.slot_load, counts.sum(0)[slots])
        return
    plan = stats.plan
    want = np.where(slots >= 0, plan.quota[np.maximum(slots, 0), me], 0)
    np.testing.assert_array_equal(stats.slot_load, want)
    assert stats.slot_load.sum() == plan.gpu_load[me]
    assert plan.max_load == certificate_bound(plan, counts)  # the loads are optimal
    np.testing.assert_array_equal(plan.quota.sum(1), counts.sum(0))


def _check_token_identity(layer: MoELayer, groups, expert: torch.Tensor, world: int, rank: int) -> None:
    """Dispatch (rank, token) labels; each (token, expert) pair must arrive exactly once, at a
    replica of that expert; combine must return sum_k gate_k * x."""
    t = _num_tokens(rank)
    labels = torch.stack([torch.full((t,), float(rank)), torch.arange(t, dtype=torch.float32)], 1)
    gates = torch.full((t, TOP_K), 0.5)
    tokens, rows, meta = layer.dispatcher.dispatch(labels, expert[_my_slice(rank)], gates)
    seen = []
    start = 0
    for j, e in enumerate(groups.local_slots):
        n_real, n_rows = int(meta.row_map.slot_load[j]), int(rows[j])
        block = tokens[start : start + n_real].long()
        assert torch.all(tokens[start + n_real : start + n_rows] == 0), "padding rows must be zero"
        for src, tok in block.tolist():
            assert e in expert[_my_slice(src)][tok].tolist(), f"token {(src, tok)} sent to wrong expert {e}"
            seen.append((src, tok, e))
        start += n_rows
    back = layer.dispatcher.combine(tokens, meta)
    torch.testing.assert_close(back, labels, rtol=0, atol=0)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen)  # collective (world): gather the probes
    group_first = rank - groups.microep_rank
    group_ranks = range(group_first, group_first + groups.layout.microep_size)
    got = sorted(x for part in (everyone[r] for r in group_ranks) for x in part)
    want = sorted(
        (src, tok, int(e))
        for src in group_ranks
        for tok, row in enumerate(expert[_my_slice(src)])
        for e in row
    )
    assert got == want, "some (token, expert) pair was lost or computed twice"


def _check_training(rank: int, world: int, case: Case, gather: str = "micro", micro: int = 1) -> None:
    """SGD steps with synced gradients (`micro` micro-batches per step): the owners of every expert
    stay bit-identical and follow the reference."""
    groups, layer, ref = _build(rank, world, case, gather=gather)
    ref = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.values(), lr=0.5, momentum=0.9)
    sl = _my_slice(rank)
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        for m in range(micro):
            x, expert, coef = _global_batch(world, case.num_experts, 1.5, seed=200 + 10 * step + m)
            (layer(x[sl], forced_expert=expert[sl]) * coef[sl]).sum().backward()
            y = dense_moe(x, ref["router"], ref["w_gate_up"], ref["w_down"], expert)
            ((y * coef).sum() / world).backward()
        sync_gradients(layer, groups)
        opt.step()
        ref_opt.step()
    digests = {"router": hashlib.sha256(layer.router.weight.detach().numpy().tobytes()).hexdigest()}
    for j, e in enumerate(layer.experts.owned):
        w = [layer.experts.w_gate_up[j], layer.experts.w_down[j]]
        digests[e] = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in w)).hexdigest()
        assert rel_err(layer.experts.w_down[j].detach(), ref["w_down"][e].detach()) <= 1e-4
        assert rel_err(layer.experts.w_gate_up[j].detach(), ref["w_gate_up"][e].detach()) <= 1e-4
    assert rel_err(layer.router.weight.detach(), ref["router"].detach()) <= 1e-4
    everyone: list = [None] * world
    dist.all_gather_object(everyone, digests)  # collective (world): compare the owners' copies
    for e in range(case.num_experts):
        found = {d[e] for d in everyone if e in d}
        assert len(found) == 1, f"the owners of expert {e} differ"
    assert len({everyone[r]["router"] for r in range(world)}) == 1, "dense weights differ across DP"


def _worker(rank: int, world: int, cases: list[Case], train_cases: list[Case]) -> int:
    for case in cases:
        _check_case(rank, world, case)
    for case in train_cases:
        _check_training(rank, world, case)
        _check_training(rank, world, case, gather="step", micro=2)
    return len(cases)


CASES_4 = [
    Case("ep", 4, 1, "ep", 8),
    Case("ep", 2, 1, "ep", 8, skews=(1.5,)),
    Case("microep", 2, 2, "symmetric", 8),
    Case("microep", 2, 2, "random", 8),
    Case("microep", 2, 2, "asymmetric", 8),
    Case("microep", 1, 4, "symmetric", 8),
]
CASES_8 = [
    Case("microep", 4, 2, "symmetric", 16, skews=(0.0, float("inf"))),
    Case("microep", 2, 4, "random", 8, skews=(1.5,)),
    Case("microep", 2, 2, "asymmetric", 8, skews=(1.5,)),
    Case("ep", 8, 1, "ep", 16, skews=(1.5,)),
]


@pytest.mark.timeout(300)
def test_layer_matches_dense_4_ranks():
    train = [Case("microep", 2, 2, "symmetric", 8), Case("ep", 2, 1, "ep", 8)]
    assert run_workers(_worker, 4, CASES_4, train) == [len(CASES_4)] * 4


@pytest.mark.timeout(300)
def test_layer_matches_dense_8_ranks():
    train = [Case("microep", 2, 2, "asymmetric", 8)]
    assert run_workers(_worker, 8, CASES_8, train) == [len(CASES_8)] * 8
