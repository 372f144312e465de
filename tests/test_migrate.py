"""Re-placement (gloo, CPU, 4 processes) against an identical layer that is never re-placed.

Two layers are built from one seed and trained the same way with AdamW: `moved` is re-placed,
`kept` stays. Checks: the owners keep the very same master and optimizer-state tensors, byte for
byte (nothing moves); the gather now fills the new slots (each holds its new expert's weights);
the layer computes the same function (and the same as a dense reference); a training step after
the move equals the same step without it (float tolerance), with every gradient equal to the
dense reference's; bad calls (another shape, a plain-EP layer, an optimizer without the layer's
parameters, ranks that disagree) raise on every rank before anything changes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import dense_moe, forced_routing, rel_err, run_workers

from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    sync_gradients,
)
from micromoe.runtime.migrate import _problem, migrate_layer

HIDDEN, FFN, TOP_K, EXPERTS, TOKENS = 8, 12, 2, 8, 24
TOL = 1e-5


def _batch(world: int, skew: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * TOKENS, HIDDEN, generator=g)
    expert = forced_routing(world * TOKENS, EXPERTS, TOP_K, skew, g)
    coef = torch.randn(world * TOKENS, HIDDEN, generator=g)
    return x, expert, coef


def _train_step(layer, groups, opt, rank, world, seed) -> float:
    x, expert, coef = _batch(world, 1.2, seed)
    sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
    opt.zero_grad(set_to_none=True)
    loss = (layer(x[sl], forced_expert=expert[sl]) * coef[sl]).sum()
    loss.backward()
    sync_gradients(layer, groups)
    opt.step()
    return float(loss)


def _make(rank, layout, placement):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(HIDDEN, FFN, EXPERTS, TOP_K))
    groups = build_process_groups(layout, placement, rank)
    apply_expert_parallel(layer, groups, "microep")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    return layer, groups, opt


def _placements(g: int) -> tuple[Placement, Placement]:
    old = Placement.symmetric(g, EXPERTS, 2)
    new = Placement.asymmetric(1000.0 / np.arange(1, EXPERTS + 1) ** 1.5, g, old.slots_per_gpu, seed=3)
    assert new != old
    return old, new


def _snapshot(layer, opt) -> list[tuple[int, bytes]]:
    out = []
    for p in layer.experts.parameters():
        for t in (p, *opt.state[p].values()):
            out.append((id(t), t.detach().numpy().tobytes()))
    return out


def _check_replacement(rank: int, world: int, ep: int, merge: int) -> dict:
    layout = ParallelLayout(world, world, ep, merge)
    old, new = _placements(layout.microep_size)
    moved, groups, opt = _make(rank, layout, old)
    kept, kept_groups, kept_opt = _make(rank, layout, old)
    for seed in range(2):
        assert _train_step(moved, groups, opt, rank, world, seed) == _train_step(
            kept, kept_groups, kept_opt, rank, world, seed
        )
    before = _snapshot(moved, opt)
    groups, stats = migrate_layer(moved, groups, new, optimizer=opt)
    assert groups.placement == new and moved.dispatcher.placement == new
    assert _snapshot(moved, opt) == before, "the owners keep their tensors, bit for bit"
    assert stats.bytes_moved == 0 and stats.slots_changed > 0 and stats.ms > 0
    # the gather fills the new slots: slot j holds the weights of the new placement's expert
    slot_gu, slot_dn = moved.experts.slot_weights()
    everyone = _owned_by_expert(moved, world)
    for j, e in enumerate(groups.local_slots):
        if e >= 0:
            torch.testing.assert_close(slot_gu[j], everyone[e][0], rtol=0, atol=0)
            torch.testing.assert_close(slot_dn[j], everyone[e][1], rtol=0, atol=0)
    # the same function, and a training step equal to the one without the move
    x, expert, coef = _batch(world, 1.2, 7)
    sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
    with torch.no_grad():
        y_moved = moved(x[sl], forced_expert=expert[sl])
        y_kept = kept(x[sl], forced_expert=expert[sl])
    torch.testing.assert_close(y_moved, y_kept, rtol=TOL, atol=TOL)
    loss_moved = _train_step(moved, groups, opt, rank, world, 9)
    loss_kept = _train_step(kept, kept_groups, kept_opt, rank, world, 9)
    assert abs(loss_moved - loss_kept) <= TOL * max(1.0, abs(loss_kept))
    for a, b in zip(moved.parameters(), kept.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    _check_gradients_against_dense(moved, groups, rank, world)
    _check_errors(rank, moved, groups, opt, new)
    return {"bytes_moved": stats.bytes_moved, "slots_changed": stats.slots_changed}


def _owned_by_expert(layer, world: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    ex = layer.experts
    mine = {e: (ex.w_gate_up[j].detach(), ex.w_down[j].detach()) for j, e in enumerate(ex.owned)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)  # collective (world)
    return {e: v for part in everyone for e, v in part.items()}


def _check_gradients_against_dense(layer, groups, rank: int, world: int) -> None:
    """After the move, forward and every gradient equal a dense MoE with the same weights."""
    x, expert, coef = _batch(world, 2.0, 11)
    weights = _owned_by_expert(layer, world)
    w_gu = torch.stack([weights[e][0] for e in range(EXPERTS)]).requires_grad_(True)
    w_dn = torch.stack([weights[e][1] for e in range(EXPERTS)]).requires_grad_(True)
    router = layer.router.weight.detach().clone().requires_grad_(True)
    y_ref = dense_moe(x, router, w_gu, w_dn, expert)
    ((y_ref * coef).sum() / world).backward()
    sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
    layer.zero_grad(set_to_none=True)
    y = layer(x[sl], forced_expert=expert[sl])
    (y * coef[sl]).sum().backward()
    sync_gradients(layer, groups)
    assert rel_err(y.detach(), y_ref[sl].detach()) <= TOL
    for j, e in enumerate(layer.experts.owned):
        assert rel_err(layer.experts.w_gate_up.grad[j], w_gu.grad[e]) <= TOL
        assert rel_err(layer.experts.w_down.grad[j], w_dn.grad[e]) <= TOL
    assert rel_err(layer.router.weight.grad, router.grad) <= TOL


def _check_errors(rank, layer, groups, opt, placement) -> None:
    bad_shape = Placement.symmetric(groups.layout.microep_size, EXPERTS * 2, 2)
    with pytest.raises(ValueError, match="refused on ranks .*GPUs, slots, experts"):
        migrate_layer(layer, groups, bad_shape)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="does not hold this layer's expert parameters"):
        migrate_layer(layer, groups, placement, optimizer=other)
    only_one = placement if rank else Placement.symmetric(groups.layout.microep_size, EXPERTS, 2)
    with pytest.raises(ValueError, match="disagree on the placement|refused on ranks"):
        migrate_layer(layer, groups, only_one)  # rank 0 passes another placement
    assert layer.dispatcher.placement == groups.placement, "a refused call changes nothing"


def _worker(rank: int, world: int) -> list[dict]:
    return [_check_replacement(rank, world, 2, 2), _check_replacement(rank, world, 1, 2)]


@pytest.mark.timeout(240)
def test_replacement_moves_nothing_and_keeps_the_function_4_ranks():
    results = run_workers(_worker, 4)
    assert all(r == results[0] for r in results), "every rank reports the same"


def test_single_device_layer_is_refused():
    layer = MoELayer(MoEConfig(HIDDEN, FFN, EXPERTS, TOP_K))
    p = Placement.symmetric(2, EXPERTS, 2)
    assert "apply_expert_parallel" in _problem(layer, SimpleNamespace(placement=p), p, None)
