"""GroupedSwiGLU with chunked weight gradients (`max_group_rows`) computes the same function."""

from __future__ import annotations

import pytest
import torch
from _dist import dense_moe, forced_routing, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.runtime import GroupedSwiGLU, MoEConfig, MoELayer
from micromoe.runtime.experts import chunk_layout

H, F = 6, 5


def _chunks_ref(rows: list[int], c: int) -> list[tuple[int, int, int]]:
    """(slot, start, end) of every chunk, slot by slot; an empty slot has one empty chunk."""
    out, start = [], 0
    for s, n in enumerate(rows):
        cuts = list(range(start, start + n, c)) or [start]
        out += [(s, a, min(a + c, start + n)) for a in cuts]
        start += n
    return out


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=6), c=st.integers(1, 16), spare=st.integers(0, 9)
)
def test_chunk_layout_matches_reference(rows, c, spare):
    n = sum(rows) + spare  # rows past the last slot belong to none
    ends, first, extra, extra_slot = chunk_layout(torch.tensor(rows), n, c)
    ref = _chunks_ref(rows, c)
    num = len(rows) + n // c
    assert len(ref) <= num and ends.shape == (num,) and extra.shape == extra_slot.shape == (n // c,)
    got_ends = ends.tolist()
    assert got_ends[: len(ref)] == [e for _, _, e in ref]
    assert got_ends[len(ref) :] == [sum(rows)] * (num - len(ref))  # unused chunks: empty, at the end
    assert first.tolist() == [next(i for i, r in enumerate(ref) if r[0] == s) for s in range(len(rows))]
    every = sorted(first.tolist() + extra.tolist())
    assert every == list(range(num))  # each chunk once: as a slot's first or as an extra
    for j, s in zip(extra.tolist(), extra_slot.tolist(), strict=True):
        assert s == (ref[j][0] if j < len(ref) else len(rows) - 1)


def _grads(layer: GroupedSwiGLU, x: torch.Tensor, rows: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    y = layer(xx, rows)
    y.backward(gy)
    return [y.detach(), xx.grad, layer.w_gate_up.grad, layer.w_down.grad]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.integers(0, 30), min_size=1, max_size=5),
    c=st.integers(1, 12),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_unchunked_float64(rows, c, fused, seed):
    torch.manual_seed(seed)
    layer = GroupedSwiGLU(len(rows), H, F, dtype=torch.float64)
    layer.fused_swiglu = fused  # no effect on CPU; both settings must agree
    n = sum(rows)
    x, gy = torch.randn(n, H, dtype=torch.float64), torch.randn(n, H, dtype=torch.float64)
    rows_t = torch.tensor(rows)
    want = _grads(layer, x, rows_t, gy)
    layer.max_group_rows = c
    got = _grads(layer, x, rows_t, gy)
    for name, a, b in zip(("out", "x", "w_gate_up", "w_down"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for s, r in enumerate(rows):  # an empty slot's weights get zero gradient
        if r == 0:
            assert not got[2][s].any() and not got[3][s].any()


def test_chunked_layer_matches_dense():
    """The layer with chunks small enough that every routed expert's rows are cut (CPU, float32)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden=8, ffn_hidden=12, num_experts=6, top_k=2), max_group_rows=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 8, generator=g, requires_grad=True)
    expert = forced_routing(30, 6, 2, 1.5, g)
    coef = torch.randn(30, 8, generator=g)
    (layer(x, forced_expert=expert) * coef).sum().backward()
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down)
    ]
    xr = x.detach().clone().requires_grad_(True)
    (dense_moe(xr, *leaves, expert) * coef).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-5
    assert rel_err(layer.experts.w_gate_up.grad, leaves[1].grad) <= 1e-5
    assert rel_err(layer.experts.w_down.grad, leaves[2].grad) <= 1e-5


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_bad_max_group_rows(bad):
    with pytest.raises(ValueError, match="max_group_rows"):
        GroupedSwiGLU(2, H, F, max_group_rows=bad)
