"""The fast path's grouped row layout as a counting sort: two Triton launches instead of a sort.

`rows_layout` computes what `dispatch_fast.device_rows` computes with a stable sort, a
`searchsorted`, a `diff` and a scatter (about nine launches): each flat (token, choice)'s row in
the expert-grouped buffer, stable (by token, then choice, inside an expert), the per-expert
bounds, rows and group ends. The ids are cut into chunks of C consecutive entries:
- `_hist_kernel`: one program per chunk counts its ids per expert (and its ids out of range);
- `_place_kernel`: one program per chunk sums the counts of the chunks before it and of all
  chunks (the group starts), then ranks its ids inside the chunk with a running one-hot prefix
  sum, SB entries at a time, and writes their rows; program 0 also writes bounds, rows and ends.
Ids outside [0, E) go to rows after every group (in index order), as the sort path puts them.
Cost: O(n E) one-hot work plus O(NC^2 E) reads of the small count table (NC chunks, at most
`_MAX_CHUNKS`), so callers use it up to `MAX_ROWS` entries and the sort above that.

Legend: n = T*K flat entries, E experts, EP = E padded to a power of two.
"""

from __future__ import annotations

import torch

from micromoe.runtime.kernels import HAVE_TRITON, next_pow2, triton_device

MAX_ROWS = 1 << 17  # entries (T*K) up to which the counting sort is used
_MAX_CHUNKS = 128
_TILE = 4096  # one-hot elements per step

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _keys(ids_ptr, idx, n, E, EP: tl.constexpr):
        """(one-hot [SB, EP] bool of valid ids, out-of-range mask [SB]) for entries idx."""
        m = idx < n
        e = tl.load(ids_ptr + idx, mask=m, other=0)
        ok = (e >= 0) & (e < E)
        cols = tl.arange(0, EP)
        onehot = (e[:, None] == cols[None, :]) & (ok & m)[:, None]
        return onehot, m & (~ok)

    @triton.jit
    def _hist_kernel(ids_ptr, hist_ptr, n, E, NC, C: tl.constexpr, SB: tl.constexpr, EP: tl.constexpr):
        c = tl.program_id(0)
        acc = tl.zeros([EP], tl.int32)
        bad = tl.zeros([SB], tl.int32)
        for s in range(0, C, SB):
            idx = c * C + s + tl.arange(0, SB)
            onehot, out = _keys(ids_ptr, idx, n, E, EP)
            acc += tl.sum(onehot.to(tl.int32), axis=0)
            bad += out.to(tl.int32)
        tl.store(hist_ptr + c * EP + tl.arange(0, EP), acc)
        tl.store(hist_ptr + NC * EP + c, tl.sum(bad, axis=0))  # out-of-range ids of the chunk

    @triton.jit
    def _place_kernel(
        ids_ptr,
        hist_ptr,
        pos_ptr,
        bounds_ptr,
        rows_ptr,
        ends_ptr,
        n,
        E,
        NC,
        ALIGN: tl.constexpr,
        C: tl.constexpr,
        SB: tl.constexpr,
        EP: tl.constexpr,
        CB: tl.constexpr,
        NCP: tl.constexpr,
    ):
        c = tl.program_id(0)
        cols = tl.arange(0, EP)
        total = tl.zeros([EP], tl.int32)  # ids per expert, all chunks
        before = tl.zeros([EP], tl.int32)  # ids per expert in chunks before this one
        bad_before = tl.zeros([CB], tl.int32)
        for c0 in range(0, NCP, CB):  # NCP = NC padded to a power of two (a constant bound)
            ch = c0 + tl.arange(0, CB)
            tile = tl.load(hist_ptr + ch[:, None] * EP + cols[None, :], mask=(ch < NC)[:, None], other=0)
            total += tl.sum(tile, axis=0)
            before += tl.sum(tl.where((ch < c)[:, None], tile, 0), axis=0)
            bad_before += tl.load(hist_ptr + NC * EP + ch, mask=ch < c, other=0)
        total = tl.where(cols < E, total, 0)
        padded = (total + (ALIGN - 1)) // ALIGN * ALIGN
        ends = tl.cumsum(padded, axis=0)
        base = ends - padded + before  # first row of this chunk's ids of each expert
        trash = tl.sum(padded, axis=0) + tl.sum(bad_before, axis=0)  # rows of bad ids start here
        if c == 0:
            first = tl.cumsum(total, axis=0) - total  # = number of valid ids < e
            tl.store(bounds_ptr + cols, first, mask=cols < E)
            tl.store(bounds_ptr + E, tl.sum(total, axis=0))
            tl.store(rows_ptr + cols, padded, mask=cols < E)
            tl.store(ends_ptr + cols, ends, mask=cols < E)
        run = tl.zeros([EP], tl.int32)  # ids per expert seen so far in this chunk
        run_bad = tl.sum(tl.zeros([SB], tl.int32), axis=0)  # out-of-range ids seen so far
        for s in range(0, C, SB):
            idx = c * C + s + tl.arange(0, SB)
            onehot, out = _keys(ids_ptr, idx, n, E, EP)
            hot = onehot.to(tl.int32)
            rank = tl.cumsum(hot, axis=0) - 1 + (run + base)[None, :]
            row = tl.sum(tl.where(onehot, rank, 0), axis=1)
            bad = out.to(tl.int32)
            row = tl.where(out, trash + run_bad + tl.cumsum(bad, axis=0) - 1, row)
            tl.store(pos_ptr + idx, row, mask=idx < n)
            run += tl.sum(hot, axis=0)
            run_bad += tl.sum(bad, axis=0)


def uses_rows_kernel(expert_TK: torch.Tensor) -> bool:
    """True when `rows_layout` runs for these ids (Triton on their device, at most MAX_ROWS)."""
    return triton_device(expert_TK) and 0 < expert_TK.numel() <= MAX_ROWS


def _blocks(n: int, e: int) -> tuple[int, int, int, int, int]:
    """(EP, SB, C, NC, CB): padded experts, entries per step, per chunk, chunks, count rows per step."""
    ep = next_pow2(e)
    sb = max(16, _TILE // ep)
    c = max(sb, next_pow2(-(-n // _MAX_CHUNKS)))
    nc = -(-n // c)
    return ep, sb, c, nc, max(1, _TILE // ep)


def rows_layout(
    expert_TK: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos int32 [T*K], rows int32 [E], bounds int32 [E+1], ends int32 [E]) on the ids' device.

    Args:
        expert_TK: int64 [T, K] expert ids (ids outside [0, E) get rows past every group).
        num_experts: E.
        align: rows per expert padded to a multiple of this (padding rows are not written).

    Returns:
        pos[t*K+k]: the grouped row of (t, k); rows[e]: expert e's rows, padded; bounds[j]:
        number of valid ids < j; ends = cumsum(rows) (the grouped GEMM's group ends).
    """
    ids = expert_TK.reshape(-1).contiguous()
    n, e, dev = ids.numel(), num_experts, ids.device
    ep, sb, c, nc, cb = _blocks(n, e)
    i32 = {"device": dev, "dtype": torch.int32}
    hist = torch.empty(nc * ep + nc, **i32)
    pos, bounds = torch.empty(n, **i32), torch.empty(e + 1, **i32)
    rows, ends = torch.empty(e, **i32), torch.empty(e, **i32)
    _hist_kernel[(nc,)](ids, hist, n, e, nc, C=c, SB=sb, EP=ep)
    _place_kernel[(nc,)](
        ids, hist, pos, bounds, rows, ends, n, e, nc, ALIGN=align, C=c, SB=sb, EP=ep, CB=cb, NCP=next_pow2(nc)
    )
    return pos, rows, bounds, ends
