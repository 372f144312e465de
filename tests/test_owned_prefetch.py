"""The gather of the next MoE layer's slots, started during the previous layer's forward (gloo, CPU,
4 processes, EP 2 x d 2).

Three stacked MoE layers with prefetch against the same layers without it: the same outputs and
every gradient, bit for bit; only the first layer gathers on demand, the others use the prefetch;
a prefetch made before the masters changed (an optimizer step in between) is discarded and the
slots gathered again, so the forward sees the new weights; a forward rerun inside the backward
(activation checkpointing) does not prefetch.
"""

from __future__ import annotations

import pytest
import torch
from _dist import forced_routing, run_workers
from torch.utils.checkpoint import checkpoint

from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    OwnedExperts,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    link_prefetch,
    sync_gradients,
)

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS = 8, 12, 8, 2, 20


def _stack(rank: int, world: int, prefetch: bool) -> tuple[list[MoELayer], object]:
    layout = ParallelLayout(world, world, 2, 2)
    groups = build_process_groups(layout, Placement.symmetric(4, EXPERTS, 2), rank)
    torch.manual_seed(0)
    layers = [MoELayer(MoEConfig(HIDDEN, FFN, EXPERTS, TOP_K)) for _ in range(3)]
    for layer in layers:
        apply_expert_parallel(layer, groups, "microep")
    if prefetch:
        link_prefetch(layers)
    return layers, groups


def _forward(layers, x, routes, recompute: bool = False):
    for layer, route in zip(layers, routes, strict=True):
        if recompute:
            x = checkpoint(lambda h, lay=layer, r=route: lay(h, forced_expert=r), x, use_reentrant=False)
        else:
            x = layer(x, forced_expert=route)
    return x


def _count_gathers(monkeypatch_store: dict) -> None:
    real = OwnedExperts._start_gather

    def counting(self, *, async_op):
        monkeypatch_store["async" if async_op else "sync"] += 1
        return real(self, async_op=async_op)

    OwnedExperts._start_gather = counting


def _check(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    routes = [forced_routing(TOKENS, EXPERTS, TOP_K, 1.2, g) for _ in range(3)]
    counts = {"sync": 0, "async": 0}
    _count_gathers(counts)
    outs = {}
    for prefetch in (False, True):
        layers, groups = _stack(rank, world, prefetch)
        before = dict(counts)
        y = _forward(layers, x, routes)
        y.square().sum().backward()
        for layer in layers:
            sync_gradients(layer, groups)
        grads = [p.grad.clone() for layer in layers for p in layer.parameters()]
        outs[prefetch] = (y.detach(), grads, {k: counts[k] - before[k] for k in counts})
    (y0, g0, c0), (y1, g1, c1) = outs[False], outs[True]
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert c0 == {"sync": 3, "async": 0}, c0
    assert c1 == {"sync": 1, "async": 2}, "layers 2 and 3 use the prefetched slots"

    # a prefetch made before the masters changed is not used
    layers, _ = _stack(rank, world, prefetch=True)
    plain, _ = _stack(rank, world, prefetch=False)
    layers[1].experts.prefetch()
    with torch.no_grad():
        for stack in (layers, plain):
            stack[1].experts.w_down.mul_(1.5)
        torch.testing.assert_close(_forward(layers, x, routes), _forward(plain, x, routes), rtol=0, atol=0)

    # activation checkpointing: the recomputed forwards inside the backward do not prefetch
    layers, groups = _stack(rank, world, prefetch=True)
    before = dict(counts)
    _forward(layers, x, routes, recompute=True).square().sum().backward()
    used = {k: counts[k] - before[k] for k in counts}
    assert used == {"sync": 1 + 3, "async": 2}, used  # forward as above + one gather per recompute
    return used


@pytest.mark.timeout(240)
def test_prefetch_gives_the_same_results_4_ranks():
    assert all(r == {"sync": 4, "async": 2} for r in run_workers(_check, 4))
