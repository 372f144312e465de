"""The fused token-path ops (kernels.py) and the device-side row layout (dispatch_fast.py).

On CPU the ops run their pure-torch bodies: these tests pin those bodies to independent reference
ops (values and float64 gradcheck). The Triton bodies are checked against the same references on
the GPU by benchmarks/check_layer_path_gpu.py, and here too when Triton's interpreter is on
(TRITON_INTERPRET=1 with Triton installed: the layout and gate tests then run the kernels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dist import dense_moe, forced_routing, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from micromoe.runtime import MoEConfig, MoELayer
from micromoe.runtime.dispatch_fast import device_rows, fast_combine, fast_dispatch, sorted_rows
from micromoe.runtime.experts import grouped_mm
from micromoe.runtime.idle import HostWaitProbe
from micromoe.runtime.kernels import combine_tokens, permute_tokens, swiglu, triton_device
from micromoe.runtime.kernels_gate import chosen_softmax
from micromoe.runtime.router import TopKRouter


def _random_pos(t: int, k: int, num_rows: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(num_rows, generator=g)[: t * k].to(torch.int32)


@pytest.mark.parametrize("pad", [0, 5])
def test_permute_tokens_matches_index_copy(pad):
    g = torch.Generator().manual_seed(0)
    t, k, h = 6, 3, 5
    x = torch.randn(t, h, generator=g)
    pos = _random_pos(t, k, t * k + pad, g)
    out = permute_tokens(x, pos, k, t * k + pad)
    ref = torch.zeros(t * k + pad, h)
    for tk in range(t * k):
        ref[pos[tk]] = x[tk // k]
    assert torch.equal(out, ref)


def test_combine_tokens_matches_loop():
    g = torch.Generator().manual_seed(1)
    t, k, h, n = 5, 2, 4, 13
    rows = torch.randn(n, h, generator=g)
    w = torch.rand(t, k, generator=g)
    pos = _random_pos(t, k, n, g)
    ref = torch.stack([sum(w[i, j] * rows[pos[i * k + j]] for j in range(k)) for i in range(t)])
    torch.testing.assert_close(combine_tokens(rows, pos, w), ref)


def test_swiglu_matches_silu_times_up():
    h = torch.randn(7, 10)
    torch.testing.assert_close(swiglu(h), F.silu(h[:, :5]) * h[:, 5:])
    with pytest.raises(ValueError, match="swiglu needs"):
        swiglu(torch.randn(3, 5))


@pytest.mark.parametrize("pad", [0, 3])
def test_gradcheck_float64(pad):
    g = torch.Generator().manual_seed(2)
    t, k, h = 4, 2, 3
    pos = _random_pos(t, k, t * k + pad, g)
    x = torch.randn(t, h, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(t * k + pad, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(t, k, generator=g, dtype=torch.float64, requires_grad=True)
    hh = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: permute_tokens(a, pos, k, t * k + pad), (x,))
    assert torch.autograd.gradcheck(lambda r, ww: combine_tokens(r, pos, ww), (rows, w))
    assert torch.autograd.gradcheck(swiglu, (hh,))


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(0, 12),
    e=st.integers(1, 6),
    k=st.integers(1, 3),
    align=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_device_rows_layout(t, e, k, align, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    expert = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    expert = expert.long()
    pos, rows, n, bounds, offs = device_rows(expert, e, align)
    assert offs.tolist() == torch.cumsum(rows, 0).tolist()
    counts = torch.bincount(expert.reshape(-1), minlength=e)
    assert bounds.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    assert rows.tolist() == [(-(-c // align)) * align for c in counts.tolist()]
    assert n >= int(rows.sum()) and n == t * k + e * (align - 1)
    assert len(set(pos.tolist())) == t * k  # injective
    start = torch.cumsum(rows, 0) - rows
    flat = expert.reshape(-1)
    for ex in range(e):
        mine = pos[flat == ex].tolist()  # flat order = (token, choice) order
        assert mine == list(range(int(start[ex]), int(start[ex]) + int(counts[ex])))  # stable


@settings(max_examples=15, deadline=None)
@given(
    t=st.integers(1, 300),
    e=st.integers(1, 40),
    k=st.integers(1, 4),
    align=st.sampled_from([1, 8]),
    seed=st.integers(0, 99),
)
def test_device_rows_equals_sorted_rows(t, e, k, align, seed):
    """Skewed ids, repeats allowed: whichever path device_rows takes (the counting-sort kernel
    under Triton's interpreter) gives the radix-sort path's layout exactly."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, e + 1, dtype=torch.float64) ** -1.5
    expert = torch.multinomial(p, t * k, replacement=True, generator=g).view(t, k)
    got, want = device_rows(expert, e, align), sorted_rows(expert, e, align)
    for a, b in zip(got, want, strict=True):
        assert a == b if isinstance(a, int) else torch.equal(a, b)


@pytest.mark.skipif(
    not triton_device(torch.zeros(1)), reason="needs Triton's interpreter (TRITON_INTERPRET=1)"
)
def test_rows_kernel_bad_ids_stay_inside():
    """Out-of-range ids get distinct rows past every group; valid ids keep the sorted layout."""
    expert = torch.tensor([[0, 1], [1, 7], [-1, 0], [2, 9]])
    for align in (1, 8):
        pos, rows, n, bounds, _ = device_rows(expert, 3, align)
        ref = sorted_rows(expert, 3, align)
        valid = ((expert >= 0) & (expert < 3)).reshape(-1)
        assert torch.equal(pos[valid], ref[0][valid]) and torch.equal(bounds, ref[3])
        assert (
            len(set(pos.tolist())) == 8 and int(pos[~valid].min()) >= int(rows.sum()) and int(pos.max()) < n
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chosen_softmax_matches_float64_reference(dtype):
    """Gates = softmax over each token's chosen logits; repeated ids add their gradients and
    out-of-range ids are clamped (the gate kernels under Triton's interpreter, else torch)."""
    g = torch.Generator().manual_seed(6)
    t, e, k = 23, 10, 3
    logits = (3 * torch.randn(t, e, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[0, 1], ids[1, 0] = ids[0, 0], e + 2
    dw = torch.randn(t, k, generator=g, dtype=torch.float64)
    w = chosen_softmax(logits, ids, dtype)
    (grad,) = torch.autograd.grad(w, logits, dw.to(dtype))
    ref_logits = logits.detach().double().requires_grad_(True)
    chosen = ref_logits.gather(1, ids.clamp(0, e - 1))
    ref = torch.exp(chosen) / torch.exp(chosen).sum(1, keepdim=True)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, dw)
    assert rel_err(w.double(), ref) <= 1e-6 and rel_err(grad.double(), ref_grad) <= 1e-6
    assert torch.all(grad[2:].double().abs().sum(1) > 0) and grad.double().abs().max() > 0


@pytest.mark.parametrize("align", [1, 8])
def test_fast_path_pipeline_matches_dense(align):
    """fast_dispatch -> grouped SwiGLU (fused swiglu) -> fast_combine, on CPU, against the dense
    reference: values and all gradients."""
    g = torch.Generator().manual_seed(3)
    t, h, f, e, k = 19, 8, 6, 5, 2
    x = torch.randn(t, h, generator=g, requires_grad=True)
    router_w = torch.randn(e, h, generator=g, requires_grad=True)
    w_gu = torch.randn(e, h, 2 * f, generator=g, requires_grad=True)
    w_down = torch.randn(e, f, h, generator=g, requires_grad=True)
    expert = forced_routing(t, e, k, 1.0, g)
    gate = torch.softmax(x @ router_w.t(), -1).gather(1, expert)
    gate = gate / gate.sum(-1, keepdim=True)
    tokens, rows, meta = fast_dispatch(x, expert, gate, e, align)
    n_real = int(rows.sum())
    hidden = grouped_mm(tokens[:n_real], w_gu, rows.long())
    out = grouped_mm(swiglu(hidden), w_down, rows.long())
    out = torch.cat([out, out.new_zeros(tokens.shape[0] - n_real, h)])
    y = fast_combine(out, meta)
    coef = torch.randn(t, h, generator=g)
    (y * coef).sum().backward()
    leaves = [a.detach().clone().requires_grad_(True) for a in (x, router_w, w_gu, w_down)]
    y_ref = dense_moe(*leaves, expert)
    (y_ref * coef).sum().backward()
    assert rel_err(y, y_ref) <= 1e-5
    for got, ref in zip((x, router_w, w_gu, w_down), leaves, strict=True):
        assert rel_err(got.grad, ref.grad) <= 1e-5
    assert meta.counts.slot_load.tolist() == torch.bincount(expert.reshape(-1), minlength=e).tolist()


@pytest.mark.parametrize("align", [1, 8])
def test_lazy_counts_flag_bad_input_when_read(align):
    x = torch.randn(3, 4)
    ok = torch.tensor([[0, 1], [1, 2], [2, 0]])
    _, _, meta = fast_dispatch(x, ok, torch.ones(3, 2), 3, align)
    assert meta.slot_load.tolist() == [2, 2, 2] and meta.counts_ge.shape == (1, 3)
    for bad in ([[0, 1], [1, 7], [2, 0]], [[0, 1], [-1, 2], [2, 0]]):  # ids out of [0, 3)
        tokens, _, meta = fast_dispatch(x, torch.tensor(bad), torch.ones(3, 2), 3, align)
        assert tokens.shape[0] == 6 + 3 * (align - 1)  # dispatch itself never syncs or raises
        with pytest.raises(ValueError, match="out of range"):
            _ = meta.slot_load
    w = torch.ones(3, 2)
    w[1, 0] = float("nan")
    _, _, meta = fast_dispatch(x, ok, w, 3, align)
    with pytest.raises(ValueError, match="non-finite"):
        _ = meta.counts_ge


def test_lean_router_gates_equal_normalized_softmax():
    """The router's CUDA-only lean path (gates from the K chosen logits) on CPU, against the full
    path: same experts, same gates and same gradients."""
    torch.manual_seed(4)
    router = TopKRouter(8, 6, 2)
    x = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    router = router.double()
    full = router(x)
    logits = x @ router.weight.t()
    for forced in (None, full.expert):
        lean = router._lean(logits, forced, x.dtype)
        assert torch.equal(lean.expert, full.expert) and lean.probs is None
        torch.testing.assert_close(lean.weight, full.weight, rtol=1e-6, atol=1e-7)
    g_full = torch.autograd.grad(full.weight.pow(2).sum(), (x, router.weight))
    g_lean = torch.autograd.grad(
        router._lean(x @ router.weight.t(), None, x.dtype).weight.pow(2).sum(), (x, router.weight)
    )
    for a, b in zip(g_lean, g_full, strict=True):  # both paths round the softmax to float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_host_wait_probe_and_layer_stats_on_cpu():
    """On CPU the reference path runs: its stats read eagerly, and no GPU idle is reported."""
    probe = HostWaitProbe(torch.device("cpu")).stop()
    assert probe.gpu_idle_ms == 0.0 and probe.host_s >= 0.0
    torch.manual_seed(5)
    layer = MoELayer(MoEConfig(hidden=8, ffn_hidden=6, num_experts=4, top_k=2))
    expert = torch.tensor([[0, 1], [1, 3], [3, 0]])
    layer(torch.randn(3, 8), forced_expert=expert)
    stats = layer.last_stats
    assert stats.gpu_idle_ms == 0.0 and stats.plan is None and stats.route_s >= 0.0
    assert stats.slot_load.tolist() == [2, 2, 0, 2] and stats.counts_ge.tolist() == [[2, 2, 0, 2]]
