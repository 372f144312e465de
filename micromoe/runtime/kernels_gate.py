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

from micromoe.runtime.kernels import HAVE_TRITON, next_pow2, uses_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chosen_gates(logits_ptr, ids_ptr, rows, T, E, K: tl.constexpr, KP: tl.constexpr):
        """(offsets [BT, KP] of the flat (row, choice) entries, clamped ids [BT, KP], gates
        [BT, KP] float32, entry mask [BT, KP]) for a block of rows."""
        ks = tl.arange(0, KP)
        m = (rows < T)[:, None] & (ks < K)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        tk = r64 * K + ks[None, :]
        e = tl.minimum(tl.maximum(tl.load(ids_ptr + tk, mask=m, other=0), 0), E - 1)
        lg = tl.load(logits_ptr + r64 * E + e, mask=m, other=0.0).to(tl.float32)
        lg = tl.where((ks < K)[None, :], lg, float("-inf"))  # padded choices weigh 0
        p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        return tk, e, p / tl.sum(p, axis=1)[:, None], m

    @triton.jit
    def _gate_fwd_kernel(
        logits_ptr, ids_ptr, w_ptr, T, E, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        tk, _, w, m = _chosen_gates(logits_ptr, ids_ptr, rows, T, E, K, KP)
        tl.store(w_ptr + tk, w.to(w_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gate_bwd_kernel(
        logits_ptr,
        ids_ptr,
        dw_ptr,
        dl_ptr,
        T,
        E,
        K: tl.constexpr,
        KP: tl.constexpr,
        BT: tl.constexpr,
        EP: tl.constexpr,
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        tk, e, w, m = _chosen_gates(logits_ptr, ids_ptr, rows, T, E, K, KP)
        dw = tl.load(dw_ptr + tk, mask=m, other=0.0).to(tl.float32)
        g = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # softmax backward, [BT, KP]
        cols = tl.arange(0, EP)
        hit = (e[:, :, None] == cols[None, None, :]) & m[:, :, None]  # [BT, KP, EP]
        tile = tl.sum(tl.where(hit, g[:, :, None], 0.0), axis=1)  # repeated ids add up
        mask = (rows < T)[:, None] & (cols < E)[None, :]
        out = dl_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :]
        tl.store(out, tile.to(dl_ptr.dtype.element_ty), mask=mask)


def _blocks(e: int, k: int) -> tuple[int, int, int]:
    """(KP, BT, EP): K and E padded to powers of two, rows per program (about 4K one-hot entries)."""
    kp, ep = next_pow2(k), next_pow2(e)
    return kp, max(1, 4096 // (kp * ep)), ep


class _ChosenSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, out_dtype):
        ctx.save_for_backward(logits, ids)
        t, e = logits.shape
        w = torch.empty(ids.shape, device=logits.device, dtype=out_dtype)
        kp, bt, _ = _blocks(e, ids.shape[1])
        if t:
            _gate_fwd_kernel[(triton.cdiv(t, bt),)](logits, ids, w, t, e, K=ids.shape[1], KP=kp, BT=bt)
        return w

    @staticmethod
    def backward(ctx, dw):
        logits, ids = ctx.saved_tensors
        t, e = logits.shape
        dl = torch.empty_like(logits)
        kp, bt, ep = _blocks(e, ids.shape[1])
        if t:
            grid = (triton.cdiv(t, bt),)
            k = ids.shape[1]
            _gate_bwd_kernel[grid](logits, ids, dw.contiguous(), dl, t, e, K=k, KP=kp, BT=bt, EP=ep)
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
