"""Single-process MoE layer (LocalDispatcher, the reference of the dispatcher hierarchy)."""

from __future__ import annotations

import pytest
import torch
from _dist import dense_moe, forced_routing, rel_err

from micromoe.runtime import (
    AllToAllDispatcher,
    EPDispatcher,
    LocalDispatcher,
    MicroEPDispatcher,
    MoEConfig,
    MoELayer,
    grouped_mm,
)


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(hidden=8, ffn_hidden=12, num_experts=6, top_k=2, **kw))


@pytest.mark.parametrize("skew", [0.0, 1.5, float("inf")])
def test_local_layer_matches_dense(skew):
    layer = _layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 15, 8, generator=g, requires_grad=True)
    expert = forced_routing(30, 6, 2, skew, g)
    coef = torch.randn(2, 15, 8, generator=g)
    (layer(x, forced_expert=expert) * coef).sum().backward()
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down)
    ]
    xr = x.detach().clone().requires_grad_(True)
    y_ref = dense_moe(xr.reshape(-1, 8), *leaves, expert)
    (y_ref * coef.reshape(-1, 8)).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-5
    for got, ref in zip(
        (layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down), leaves, strict=True
    ):
        assert rel_err(got.grad, ref.grad) <= 1e-5
    assert layer.last_stats.slot_load.tolist() == torch.bincount(expert.reshape(-1), minlength=6).tolist()


def test_learned_routing_matches_dense_topk():
    layer = _layer()
    x = torch.randn(20, 8)
    y = layer(x)
    expert = torch.topk(torch.softmax(x @ layer.router.weight.t(), -1), 2, dim=-1).indices
    ref = dense_moe(x, layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down, expert)
    assert rel_err(y, ref) <= 1e-5


def test_aux_loss_and_expert_bias():
    layer = _layer(aux_loss_coef=0.01, expert_bias=True)
    x = torch.randn(64, 8)
    layer(x)
    aux = layer.last_stats.aux_loss
    assert aux.item() > 0 and aux.requires_grad
    load = torch.tensor([5.0, 0, 0, 0, 0, 55])  # mean 10
    layer.router.update_expert_bias(load, rate=0.1)
    assert layer.router.expert_bias.tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, -0.1])
    with pytest.raises(ValueError, match="expert_bias=False"):
        _layer().router.update_expert_bias(load)


def test_bad_inputs_raise_clear_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="hidden size 7"):
        layer(torch.randn(4, 7))
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(4, 8), forced_expert=torch.tensor([[0, 6]] * 4))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(bad)
    with pytest.raises(ValueError, match="forced_expert must be"):
        layer(torch.randn(4, 8), forced_expert=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k=7 exceeds"):
        MoEConfig(8, 8, 6, top_k=7)


def test_grouped_mm_fallback_with_empty_groups():
    x = torch.randn(9, 4)
    w = torch.randn(3, 4, 5)
    rows = torch.tensor([4, 0, 5])
    out = grouped_mm(x, w, rows)
    torch.testing.assert_close(out, torch.cat([x[:4] @ w[0], x[4:] @ w[2]]))


class _Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    def mark(self, name: str) -> None:
        self.names.append(name)


def test_timer_is_a_constructor_argument_and_calls_keep_no_state():
    layer = _layer()
    rec = _Recorder()
    layer.dispatcher = LocalDispatcher(6, timer=rec)
    before = dict(vars(layer.dispatcher))
    layer(torch.randn(10, 8))
    assert rec.names == ["start", "permute", "route", "slot_sort", "experts", "combine"]
    assert vars(layer.dispatcher) == before  # per-call state travels in the meta record only


def test_dispatchers_grow_by_capability():
    """Local reference -> abstract all-to-all base -> plain EP and MicroEP as siblings."""
    assert issubclass(AllToAllDispatcher, LocalDispatcher)
    for cls in (EPDispatcher, MicroEPDispatcher):
        assert cls.__bases__ == (AllToAllDispatcher,)
    with pytest.raises(TypeError, match="abstract"):
        AllToAllDispatcher(None, 0, None)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        LocalDispatcher(0)
