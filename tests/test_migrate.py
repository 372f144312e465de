"""Expert migration (gloo, CPU, 4 processes) against an identical layer that never migrates.

Two layers are built from one seed and trained the same way with AdamW: `moved` migrates to a new
placement, `kept` stays. Checks: after the move every slot holds its new expert's exact weights and
AdamW moments (bitwise, against `kept`); every replica group holds identical bytes; the layer
computes the same function (and the same function as a dense reference); a training step after
the move equals the same step without it (float tolerance); bad calls raise on every rank before
anything moves. The transfer plan is checked on random layouts without processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import dense_moe, forced_routing, rel_err, run_workers
from _layouts import any_slot_layout
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    sync_gradients,
)
from micromoe.runtime.migrate import _verify_replicas, migrate_layer, plan_transfers

HIDDEN, FFN, TOP_K, EXPERTS, TOKENS = 8, 12, 2, 8, 24
TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# the transfer plan (no processes)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 4))
def test_transfer_plan_fills_every_slot_from_a_holder(seed, num_gpus, num_slots):
    rng = np.random.default_rng(seed)
    old = any_slot_layout(rng, num_gpus, num_slots, 0.8)
    perm = rng.permutation(num_gpus)  # the new layout: old rows permuted and slots relabelled
    new = Placement.from_slots(old.slot_expert[perm][:, rng.permutation(num_slots)], old.num_experts)
    plan = plan_transfers(old, new)
    filled = np.argwhere(new.slot_expert >= 0)
    assert plan.expert.size == len(filled)
    assert sorted(zip(plan.dst_gpu.tolist(), plan.dst_slot.tolist(), strict=True)) == [
        tuple(x) for x in filled.tolist()
    ]
    for e, sg, ss, dg, ds in zip(
        plan.expert, plan.src_gpu, plan.src_slot, plan.dst_gpu, plan.dst_slot, strict=True
    ):
        assert new.slot_expert[dg, ds] == e
        assert old.slot_expert[sg, ss] == e, "the source must hold the expert in the old layout"
        if e in old.slot_expert[dg]:
            assert sg == dg, "a GPU that already holds the expert copies it locally"


def test_transfer_plan_spreads_sends_over_old_hosts():
    old = Placement.from_slots([[0, 1], [0, 2], [3, 1], [3, 2]], 4)
    new = Placement.from_slots([[1, 0], [2, 0], [3, 0], [3, 0]], 4)  # expert 0 on every GPU
    plan = plan_transfers(old, new)
    senders = plan.src_gpu[(plan.expert == 0) & plan.remote].tolist()
    assert sorted(senders) == [0, 1], "the two new replicas of expert 0 come from its two old hosts"


# ------------------------------------------------------------------------------------------------
# distributed


def _batch(world: int, skew: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * TOKENS, HIDDEN, generator=g)
    expert = forced_routing(world * TOKENS, EXPERTS, TOP_K, skew, g)
    coef = torch.randn(world * TOKENS, HIDDEN, generator=g)
    return x, expert, coef


def _train_step(layer, groups, opt, rank, world, seed) -> float:
    """One AdamW step on this rank's share of a global batch; returns the global loss."""
    x, expert, coef = _batch(world, 1.2, seed)
    sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
    opt.zero_grad(set_to_none=True)
    loss = (layer(x[sl], forced_expert=expert[sl]) * coef[sl]).sum() / world
    loss.backward()
    sync_gradients(layer, groups)
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)  # collective (world): the global loss
    return float(total)


def _make(rank, layout, placement):
    groups = build_process_groups(layout, placement, rank)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(HIDDEN, FFN, EXPERTS, TOP_K))
    apply_expert_parallel(layer, groups, "microep")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    return groups, layer, opt


def _bundle(layer, opt, slot) -> list[torch.Tensor]:
    out = []
    for name in ("w_gate_up", "w_down"):
        p = getattr(layer.experts, name)
        out += [p.detach()[slot].clone(), opt.state[p]["exp_avg"][slot].clone()]
        out.append(opt.state[p]["exp_avg_sq"][slot].clone())
    return out


def _by_expert(layer, opt, groups) -> dict[int, list[torch.Tensor]]:
    return {e: _bundle(layer, opt, j) for j, e in enumerate(groups.local_slots) if e >= 0}


def _placements(g: int) -> tuple[Placement, Placement]:
    """(old, new): on 4 GPUs symmetric -> load-aware asymmetric; on 2 GPUs the two halves swap."""
    if g == 2:
        old = Placement.expert_parallel(2, EXPERTS, 1)
        return old, Placement.from_slots(old.slot_expert[::-1], EXPERTS)
    old = Placement.symmetric(g, EXPERTS, 2)
    return old, Placement.asymmetric(1000.0 / np.arange(1, EXPERTS + 1) ** 1.5, g, old.slots_per_gpu, seed=5)


def _check_migration(rank: int, world: int, ep: int, merge: int) -> dict:
    """One migration on a layout (world, EP, d); returns this rank's view of the stats."""
    layout = ParallelLayout(world, world, ep, merge)
    g = layout.microep_size
    old, new = _placements(g)
    assert new != old
    groups, moved, opt = _make(rank, layout, old)
    kept_groups, kept, kept_opt = _make(rank, layout, old)
    for s in range(2):  # non-trivial AdamW moments
        _train_step(moved, groups, opt, rank, world, seed=10 + s)
        _train_step(kept, kept_groups, kept_opt, rank, world, seed=10 + s)
    x, expert, _ = _batch(world, 1.2, seed=99)
    sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
    with torch.no_grad():
        y_before = moved(x[sl], forced_expert=expert[sl])
    state_ids = [id(t) for p in moved.experts.parameters() for t in opt.state[p].values()]
    param_ids = [id(p) for p in moved.parameters()]

    new_groups, stats = migrate_layer(moved, groups, new, optimizer=opt)

    assert [id(p) for p in moved.parameters()] == param_ids, "parameters must be updated in place"
    assert [id(t) for p in moved.experts.parameters() for t in opt.state[p].values()] == state_ids
    assert new_groups.placement == new and moved.dispatcher.placement == new
    # every new slot holds its expert's exact bytes (the kept layer holds them by expert id)
    want = _everyones(_by_expert(kept, kept_opt, kept_groups), world)
    for j, e in enumerate(new_groups.local_slots):
        if e >= 0:
            for got, ref in zip(_bundle(moved, opt, j), want[e], strict=True):
                assert torch.equal(got, ref), f"slot {j} (expert {e}) on rank {rank} has wrong bytes"
    _check_replicas_identical(moved, opt, new_groups, world)
    with torch.no_grad():
        y_after = moved(x[sl], forced_expert=expert[sl])
        y_kept = kept(x[sl], forced_expert=expert[sl])
        w_gate_up = torch.stack([want[e][0] for e in range(EXPERTS)])  # bundle order: see _bundle
        w_down = torch.stack([want[e][3] for e in range(EXPERTS)])
        y_dense = dense_moe(x[sl], kept.router.weight, w_gate_up, w_down, expert[sl])
    assert rel_err(y_after, y_before) <= TOL and rel_err(y_after, y_dense) <= TOL
    assert rel_err(y_kept, y_dense) <= TOL
    # the next step with the moved layer equals the same step without the move
    loss_moved = _train_step(moved, new_groups, opt, rank, world, seed=20)
    loss_kept = _train_step(kept, kept_groups, kept_opt, rank, world, seed=20)
    assert abs(loss_moved - loss_kept) <= TOL * max(1.0, abs(loss_kept))
    after = _everyones(_by_expert(kept, kept_opt, kept_groups), world)
    for j, e in enumerate(new_groups.local_slots):
        if e >= 0:
            for got, ref_t in zip(_bundle(moved, opt, j), after[e], strict=True):
                assert rel_err(got, ref_t) <= 1e-4, f"expert {e} after the next step on rank {rank}"
    _check_replicas_identical(moved, opt, new_groups, world)
    _check_errors(rank, moved, new_groups, opt, new)
    _check_resync(rank, moved, new_groups, opt, world)
    return {
        "bytes": stats.bytes_moved,
        "local": stats.bytes_local,
        "transfers": stats.num_transfers,
        "resynced": stats.num_resynced,
    }


def _everyones(mine: dict[int, list[torch.Tensor]], world: int) -> dict[int, list[torch.Tensor]]:
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)  # collective (world)
    merged = {}
    for part in everyone:
        merged.update(part)
    return merged


def _check_replicas_identical(layer, opt, groups, world: int) -> None:
    mine = {
        e: b"".join(t.numpy().tobytes() for t in _bundle(layer, opt, j))
        for j, e in enumerate(groups.local_slots)
        if e >= 0
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)  # collective (world)
    for rg in groups.replicas:
        assert len({everyone[r][rg.expert] for r in rg.ranks}) == 1, f"replicas of expert {rg.expert} differ"


def _check_errors(rank, layer, groups, opt, placement) -> None:
    g = placement.num_gpus
    wrong_slots = Placement.symmetric(g, EXPERTS * 2, 2)
    with pytest.raises(ValueError, match="GPUs, slots, experts"):
        migrate_layer(layer, groups, wrong_slots, optimizer=opt)
    # one rank passes a different placement: every rank refuses, nothing hangs
    swapped = Placement.from_slots(placement.slot_expert[:, ::-1], EXPERTS)
    assert swapped != placement
    other = swapped if rank == 0 else placement
    with pytest.raises(ValueError, match="disagree on the placement"):
        migrate_layer(layer, groups, other, optimizer=opt)
    assert groups.placement == layer.dispatcher.placement == placement, "a refused call changes nothing"


def _check_resync(rank, layer, groups, opt, world: int) -> None:
    """A replica corrupted on one rank is found by checksum and re-broadcast from its lowest rank."""
    rg = next(r for r in groups.replicas if len(r.ranks) > 1)
    if rank == rg.ranks[-1]:
        with torch.no_grad():
            layer.experts.w_down[rg.slot] += 1.0
    tensors = [layer.experts.w_gate_up, layer.experts.w_down]
    assert _verify_replicas(tensors, groups, layer.experts.w_down.device) >= 1
    _check_replicas_identical(layer, opt, groups, world)


def _worker(rank: int, world: int) -> list[dict]:
    return [_check_migration(rank, world, 2, 2), _check_migration(rank, world, 1, 2)]


@pytest.mark.timeout(240)
def test_migration_moves_weights_and_adam_state_4_ranks():
    results = run_workers(_worker, 4)
    for case in range(2):
        per_rank = [r[case] for r in results]
        assert all(p == per_rank[0] for p in per_rank), "every rank reports the same totals"
        assert per_rank[0]["transfers"] > 0 and per_rank[0]["bytes"] > 0
        assert per_rank[0]["resynced"] == 0
    # 2-GPU MicroEP groups swap halves: all 8 experts move in both groups; a bundle is both
    # projections' weights, exp_avg and exp_avg_sq in float32
    bundle = (HIDDEN * 2 * FFN + FFN * HIDDEN) * 4 * 3
    assert results[0][1] == {"bytes": 16 * bundle, "local": 0, "transfers": 16, "resynced": 0}
