"""The router's gate on the fast path: softmax over each token's K chosen logits, one kernel each way.

With normalized gates, gate_k = p_k / sum_j p_j = softmax over the chosen logits (p = softmax of
all logits), so only the K chosen logits are read. Forward: one Triton kernel instead of gather,
upcast, softmax and downcast; backward: one kernel that writes the whole [T, E] logit gradient
(zero off the chosen experts) instead of four elementwise kernels, a memset and a scatter. The
torch body below computes the same function (CPU, float64, no Triton).

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from micromoe.runtime.kernels import HAVE_TRITON, uses_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chosen_stats(logits_ptr, ids_ptr, r64, m, E, K: tl.constexpr, BT: tl.constexpr):
        """(max, sum of exp) over each row's K chosen logits (float32)."""
        mx = tl.full([BT], float("-inf"), tl.float32)
        for k in tl.static_range(K):
            e = tl.minimum(tl.maximum(tl.load(ids_ptr + r64 * K + k, mask=m, other=0), 0), E - 1)
            mx = tl.maximum(mx, tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32))
        den = tl.zeros([BT], tl.float32)
        for k in tl.static_range(K):
            e = tl.minimum(tl.maximum(tl.load(ids_ptr + r64 * K + k, mask=m, other=0), 0), E - 1)
            den += tl.exp(tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32) - mx)
        return mx, den

    @triton.jit
    def _gate_fwd_kernel(logits_ptr, ids_ptr, w_ptr, T, E, K: tl.constexpr, BT: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        m = rows < T
        r64 = rows.to(tl.int64)
        mx, den = _chosen_stats(logits_ptr, ids_ptr, r64, m, E, K, BT)
        for k in tl.static_range(K):
            e = tl.minimum(tl.maximum(tl.load(ids_ptr + r64 * K + k, mask=m, other=0), 0), E - 1)
            lg = tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32)
            w = tl.exp(lg - mx) / den
            tl.store(w_ptr + r64 * K + k, w.to(w_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gate_bwd_kernel(
        logits_ptr, ids_ptr, dw_ptr, dl_ptr, T, E, K: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        m = rows < T
        r64 = rows.to(tl.int64)
        mx, den = _chosen_stats(logits_ptr, ids_ptr, r64, m, E, K, BT)
        s = tl.zeros([BT], tl.float32)  # sum_j w_j dw_j
        for k in tl.static_range(K):
            e = tl.minimum(tl.maximum(tl.load(ids_ptr + r64 * K + k, mask=m, other=0), 0), E - 1)
            w = tl.exp(tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32) - mx) / den
            s += w * tl.load(dw_ptr + r64 * K + k, mask=m, other=0.0).to(tl.float32)
        cols = tl.arange(0, EP)
        tile = tl.zeros([BT, EP], tl.float32)
        for k in tl.static_range(K):
            e = tl.minimum(tl.maximum(tl.load(ids_ptr + r64 * K + k, mask=m, other=0), 0), E - 1)
            w = tl.exp(tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32) - mx) / den
            dl = w * (tl.load(dw_ptr + r64 * K + k, mask=m, other=0.0).to(tl.float32) - s)
            tile += tl.where(cols[None, :] == e[:, None], dl[:, None], 0.0)
        mask = m[:, None] & (cols < E)[None, :]
        tl.store(dl_ptr + r64[:, None] * E + cols[None, :], tile.to(dl_ptr.dtype.element_ty), mask=mask)


def _blocks(e: int) -> tuple[int, int]:
    ep = 1 << max(0, (e - 1).bit_length())
    return max(1, 4096 // ep), ep


class _ChosenSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, out_dtype):
        ctx.save_for_backward(logits, ids)
        t, e = logits.shape
        w = torch.empty(ids.shape, device=logits.device, dtype=out_dtype)
        bt, _ = _blocks(e)
        if t:
            _gate_fwd_kernel[(triton.cdiv(t, bt),)](logits, ids, w, t, e, K=ids.shape[1], BT=bt)
        return w

    @staticmethod
    def backward(ctx, dw):
        logits, ids = ctx.saved_tensors
        t, e = logits.shape
        dl = torch.empty_like(logits)
        bt, ep = _blocks(e)
        if t:
            grid = (triton.cdiv(t, bt),)
            _gate_bwd_kernel[grid](logits, ids, dw.contiguous(), dl, t, e, K=ids.shape[1], BT=bt, EP=ep)
        return dl, None, None


def chosen_softmax(logits_TE: torch.Tensor, expert_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax over each row's K chosen logits, in float32, returned in `out_dtype`.

    Args:
        logits_TE: [T, E] router logits (differentiable).
        expert_TK: int64 [T, K] chosen experts; ids outside [0, E) are clamped.
        out_dtype: dtype of the returned gates.

    Returns:
        [T, K] gates summing to 1 per token; the gradient flows to the chosen logits only.
    """
    if uses_triton(logits_TE):
        return _ChosenSoftmax.apply(logits_TE.contiguous(), expert_TK.contiguous(), out_dtype)
    chosen_TK = logits_TE.gather(1, expert_TK.clamp(0, logits_TE.shape[1] - 1))
    return torch.softmax(chosen_TK.float(), dim=-1).to(out_dtype)
