"""Row permutations with gather-only autograd (no atomic scatter-adds, deterministic).

Legend: T tokens, K top-k, H hidden, N rows. Each function's backward is the adjoint gather or
copy, using an inverse index the caller already has.
"""

from __future__ import annotations

import torch


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def permute_rows(x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x[idx] for a bijection idx (int64 [N]); `inv` is its inverse (x[idx][inv] == x)."""
    return _Gather.apply(x, idx, inv)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_row, row_of_tk, top_k):
        ctx.save_for_backward(row_of_tk)
        ctx.top_k = top_k
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad):
        (row_of_tk,) = ctx.saved_tensors
        g = grad.index_select(0, row_of_tk)
        return g.view(-1, ctx.top_k, g.shape[1]).sum(dim=1), None, None, None


def gather_tokens(
    x: torch.Tensor, token_of_row: torch.Tensor, row_of_tk: torch.Tensor, top_k: int
) -> torch.Tensor:
    """x [T, H] -> [T*K, H] rows in sorted order (each token K times).

    token_of_row: int64 [T*K], the token of each sorted row; row_of_tk: int64 [T*K], the sorted
    row of flat (token, choice) t*K + k. Backward sums each token's K row gradients.
    """
    return _GatherTokens.apply(x, token_of_row, row_of_tk, top_k)


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, num_rows):
        ctx.save_for_backward(idx)
        return x.new_zeros((num_rows, *x.shape[1:])).index_copy_(0, idx, x)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.index_select(0, idx), None, None


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out [num_rows, ...] with out[idx] = x and zeros elsewhere (idx injective)."""
    return _Scatter.apply(x, idx, num_rows)


class _GatherInjective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros((ctx.num_rows, *grad.shape[1:])).index_copy_(0, idx, grad), None


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for an injective idx (rows not picked get zero gradient): the adjoint of scatter_rows."""
    return _GatherInjective.apply(x, idx)
