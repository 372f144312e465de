"""Fused kernels of the single-device token path: permute, weighted combine, SwiGLU.

Each op is a `torch.autograd.Function` with two bodies that compute the same function: a Triton
kernel (CUDA tensors with Triton installed) and a pure-torch body (everywhere else: the CPU path
and the tests). The choice is automatic per call (`uses_triton`). The Triton bodies make one
memory pass each way and accumulate in float32; the torch bodies accumulate in
max(float32, input dtype), so float64 inputs stay exact enough for `gradcheck`.

Legend: T tokens, K top-k, H hidden, F expert FFN hidden, N rows of the grouped buffer (N >= T*K;
rows that no (token, choice) lands on are zero). `pos`: int32 [T*K], the grouped row of flat
(token, choice) t*K + k, injective.
"""

from __future__ import annotations

import os

import torch

try:  # optional: the GPU fast path; the torch bodies below compute the same function
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    HAVE_TRITON = False

# Triton's interpreter runs the kernels on CPU tensors (kernel debugging without a GPU).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # elements per program: 32 per thread at 4 warps, 16-byte vectors


def triton_device(t: torch.Tensor) -> bool:
    """True when Triton kernels can run on `t`'s device (CUDA, or any under the interpreter)."""
    return HAVE_TRITON and (t.is_cuda or _INTERPRET)


def uses_triton(t: torch.Tensor) -> bool:
    """True when ops on `t` run the Triton kernels (CUDA, Triton installed, a 16/32-bit float
    dtype: the kernels accumulate in float32, so float64 keeps the torch body)."""
    return triton_device(t) and t.dtype in _KERNEL_DTYPES


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes are powers of two."""
    return 1 << max(0, (n - 1).bit_length())


def _new_rows(like: torch.Tensor, num_rows: int, num_written: int) -> torch.Tensor:
    """[num_rows, H]; zeroed only when some rows are not written (alignment padding)."""
    shape = (num_rows, like.shape[1])
    return like.new_empty(shape) if num_rows == num_written else like.new_zeros(shape)


# ------------------------------------------------------------------------------------------------
# pure-torch bodies (reference semantics)


def _scatter_torch(x: torch.Tensor, pos: torch.Tensor, k: int, num_rows: int) -> torch.Tensor:
    """out[pos[t*K+k]] = x[t]; other rows zero."""
    out = x.new_zeros((num_rows, x.shape[1]))
    return out.index_copy_(0, pos.long(), x.repeat_interleave(k, dim=0))


def _gather_sum_torch(rows: torch.Tensor, pos: torch.Tensor, k: int, weight: torch.Tensor | None):
    """out[t] = sum_k w[t, k] * rows[pos[t*K+k]] (w = 1 when None)."""
    acc = _acc(rows.dtype)
    picked = rows.index_select(0, pos.long()).to(acc).view(-1, k, rows.shape[1])
    if weight is not None:
        picked = picked * weight.to(acc).unsqueeze(2)
    return picked.sum(1).to(rows.dtype)


def _combine_bwd_torch(dy, rows, pos, weight, num_rows):
    """(d_rows [N, H], d_weight [T, K]) of y[t] = sum_k w[t, k] * rows[pos[t*K+k]]."""
    t, k = weight.shape
    acc = _acc(rows.dtype)
    dy_acc = dy.to(acc)
    d_picked = (dy_acc.unsqueeze(1) * weight.to(acc).unsqueeze(2)).to(rows.dtype).view(t * k, -1)
    d_rows = rows.new_zeros((num_rows, rows.shape[1])).index_copy_(0, pos.long(), d_picked)
    picked = rows.index_select(0, pos.long()).to(acc).view(t, k, -1)
    d_weight = (picked * dy_acc.unsqueeze(1)).sum(2).to(weight.dtype)
    return d_rows, d_weight


def _swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.to(_acc(h.dtype)).chunk(2, dim=1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def _swiglu_bwd_torch(h: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    gate, up = h.to(_acc(h.dtype)).chunk(2, dim=1)
    d = d_out.to(gate.dtype)
    sig = torch.sigmoid(gate)
    d_gate = d * up * sig * (1 + gate * (1 - sig))
    d_up = d * gate * sig
    return torch.cat([d_gate, d_up], dim=1).to(h.dtype)


# ------------------------------------------------------------------------------------------------
# Triton bodies (one program per token and column block, or per row block for SwiGLU)

if HAVE_TRITON:

    @triton.jit
    def _scatter_kernel(x_ptr, pos_ptr, out_ptr, H, K: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        cmask = cols < H
        ks = tl.arange(0, KP)
        kmask = ks < K
        row = tl.load(pos_ptr + t * K + ks, mask=kmask, other=0).to(tl.int64)
        x = tl.load(x_ptr + t.to(tl.int64) * H + cols, mask=cmask)
        tile = tl.broadcast_to(x[None, :], (KP, BH))
        tl.store(out_ptr + row[:, None] * H + cols[None, :], tile, mask=kmask[:, None] & cmask[None, :])

    @triton.jit
    def _gather_sum_kernel(
        rows_ptr,
        pos_ptr,
        w_ptr,
        out_ptr,
        H,
        K: tl.constexpr,
        KP: tl.constexpr,
        BH: tl.constexpr,
        HAS_W: tl.constexpr,
    ):  # KP is unused here (one signature for the three token kernels)
        # the K rows are summed in registers (unrolled, K loads in flight): no cross-thread reduction
        t = tl.program_id(0)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        cmask = cols < H
        acc = tl.zeros([BH], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + k).to(tl.int64)
            v = tl.load(rows_ptr + row * H + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _combine_bwd_kernel(
        dy_ptr,
        rows_ptr,
        pos_ptr,
        w_ptr,
        drows_ptr,
        dw_ptr,
        H: tl.constexpr,
        K: tl.constexpr,
        KP: tl.constexpr,
        BH: tl.constexpr,
    ):
        t = tl.program_id(0)
        ks = tl.arange(0, KP)
        kmask = ks < K
        row = tl.load(pos_ptr + t * K + ks, mask=kmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + ks, mask=kmask, other=0.0).to(tl.float32)
        dot = tl.zeros([KP], dtype=tl.float32)
        for h0 in range(0, H, BH):
            cols = h0 + tl.arange(0, BH)
            cmask = cols < H
            m2 = kmask[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + t.to(tl.int64) * H + cols, mask=cmask, other=0.0).to(tl.float32)
            offs = row[:, None] * H + cols[None, :]
            r = tl.load(rows_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            dot += tl.sum(r * dy[None, :], axis=1)
            tl.store(drows_ptr + offs, (w[:, None] * dy[None, :]).to(drows_ptr.dtype.element_ty), mask=m2)
        tl.store(dw_ptr + t * K + ks, dot.to(dw_ptr.dtype.element_ty), mask=kmask)

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, out_ptr, N, F, BN: tl.constexpr, BF: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        m = (rows < N)[:, None] & (cols < F)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g_off = r64 * (2 * F) + cols[None, :]
        g = tl.load(h_ptr + g_off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + g_off + F, mask=m, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(out_ptr + r64 * F + cols[None, :], a.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(h_ptr, d_ptr, dh_ptr, N, F, BN: tl.constexpr, BF: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        m = (rows < N)[:, None] & (cols < F)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g_off = r64 * (2 * F) + cols[None, :]
        g = tl.load(h_ptr + g_off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + g_off + F, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + r64 * F + cols[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        d_gate = d * u * s * (1.0 + g * (1.0 - s))
        d_up = d * g * s
        tl.store(dh_ptr + g_off, d_gate.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dh_ptr + g_off + F, d_up.to(dh_ptr.dtype.element_ty), mask=m)


def _token_blocks(h: int, k: int) -> tuple[int, int]:
    """(KP, BH): K padded to a power of two and a column block of about _TILE / KP elements."""
    kp = next_pow2(k)
    return kp, min(next_pow2(h), max(64, _TILE // kp))


def _scatter(x: torch.Tensor, pos: torch.Tensor, k: int, num_rows: int) -> torch.Tensor:
    if not uses_triton(x):
        return _scatter_torch(x, pos, k, num_rows)
    t, h = x.shape
    out = _new_rows(x, num_rows, t * k)
    kp, bh = _token_blocks(h, k)
    if t:
        _scatter_kernel[(t, triton.cdiv(h, bh))](x, pos, out, h, K=k, KP=kp, BH=bh, num_warps=4)
    return out


def _gather_sum(rows: torch.Tensor, pos: torch.Tensor, k: int, weight: torch.Tensor | None):
    if not uses_triton(rows):
        return _gather_sum_torch(rows, pos, k, weight)
    t, h = pos.numel() // k, rows.shape[1]
    out = rows.new_empty((t, h))
    kp, bh = _token_blocks(h, k)
    if t:
        w = weight if weight is not None else pos  # placeholder pointer, never read
        bh = min(next_pow2(h), 2048)  # one row block per program, K rows summed in registers
        grid = (t, triton.cdiv(h, bh))
        _gather_sum_kernel[grid](rows, pos, w, out, h, K=k, KP=kp, BH=bh, HAS_W=weight is not None)
    return out


def _combine_bwd(dy, rows, pos, weight, num_rows):
    if not uses_triton(rows):
        return _combine_bwd_torch(dy, rows, pos, weight, num_rows)
    t, k = weight.shape
    h = rows.shape[1]
    d_rows = _new_rows(rows, num_rows, t * k)
    d_weight = torch.empty_like(weight)
    kp, bh = _token_blocks(h, k)
    if t:
        _combine_bwd_kernel[(t,)](dy, rows, pos, weight, d_rows, d_weight, h, K=k, KP=kp, BH=bh, num_warps=4)
    return d_rows, d_weight


def _swiglu_blocks(f: int) -> tuple[int, int]:
    bf = min(next_pow2(f), 256)
    return _TILE // bf, bf


def _swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    if not uses_triton(h):
        return _swiglu_torch(h)
    n, f = h.shape[0], h.shape[1] // 2
    out = h.new_empty((n, f))
    bn, bf = _swiglu_blocks(f)
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, bn), triton.cdiv(f, bf))](h, out, n, f, BN=bn, BF=bf, num_warps=4)
    return out


def _swiglu_bwd(h: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    if not uses_triton(h):
        return _swiglu_bwd_torch(h, d_out)
    n, f = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    bn, bf = _swiglu_blocks(f)
    if n:
        grid = (triton.cdiv(n, bn), triton.cdiv(f, bf))
        _swiglu_bwd_kernel[grid](h, d_out.contiguous(), dh, n, f, BN=bn, BF=bf, num_warps=4)
    return dh


# ------------------------------------------------------------------------------------------------
# autograd ops (public)


class _PermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, k, num_rows):
        ctx.save_for_backward(pos)
        ctx.k = k
        return _scatter(x, pos, k, num_rows)

    @staticmethod
    def backward(ctx, d_rows):
        (pos,) = ctx.saved_tensors
        return _gather_sum(d_rows.contiguous(), pos, ctx.k, None), None, None, None


class _CombineTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, pos, weight):
        ctx.save_for_backward(rows, pos, weight)
        return _gather_sum(rows, pos, weight.shape[1], weight)

    @staticmethod
    def backward(ctx, dy):
        rows, pos, weight = ctx.saved_tensors
        d_rows, d_weight = _combine_bwd(dy.contiguous(), rows, pos, weight, rows.shape[0])
        return d_rows, None, d_weight


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _swiglu_fwd(h)

    @staticmethod
    def backward(ctx, d_out):
        (h,) = ctx.saved_tensors
        return _swiglu_bwd(h, d_out)


def permute_tokens(x: torch.Tensor, pos: torch.Tensor, top_k: int, num_rows: int) -> torch.Tensor:
    """Copy each token to its K grouped rows: out[pos[t*K+k]] = x[t]; other rows zero.

    Args:
        x: [T, H] contiguous.
        pos: int32 [T*K] contiguous; injective into [0, num_rows).
        top_k: K.
        num_rows: N >= T*K.

    Returns:
        [N, H] in x's dtype. Backward: dx[t] = sum_k d_out[pos[t*K+k]] (float32 accumulation).
    """
    _check(x, pos, top_k)
    return _PermuteTokens.apply(x.contiguous(), pos, top_k, num_rows)


def combine_tokens(rows: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k weight[t, k] * rows[pos[t*K+k]], one pass (float32 accumulation).

    Args:
        rows: [N, H] expert outputs.
        pos: int32 [T*K]; injective.
        weight: [T, K] gate weights (differentiable).

    Returns:
        [T, H] in rows' dtype. Backward gives d_rows (zero on rows outside pos) and
        d_weight[t, k] = <dy[t], rows[pos[t*K+k]]>.
    """
    _check(weight, pos, weight.shape[1])
    return _CombineTokens.apply(rows.contiguous(), pos, weight.contiguous())


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] for h [N, 2F] (the grouped gate/up projection's output) -> [N, F]."""
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"swiglu needs [N, 2F], got shape {tuple(h.shape)}")
    return _SwiGLU.apply(h.contiguous())


def _check(x: torch.Tensor, pos: torch.Tensor, top_k: int) -> None:
    assert pos.dtype == torch.int32 and pos.dim() == 1 and pos.is_contiguous(), (pos.dtype, pos.shape)
    assert pos.numel() == x.shape[0] * top_k, (pos.numel(), x.shape, top_k)
