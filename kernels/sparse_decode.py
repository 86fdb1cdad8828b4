"""Triton sparse decode: ``out[b] = sum_j vals[b, j] * W[idx[b, j]] (+ bias)`` and its backward.

Contract: docs/design.md ("sparse_decode backends"); math: docs/math.md (section 2).
``vals (B, K)`` fp16/bf16/fp32/fp64, ``idx (B, K)`` int64 with -1 = padding (its value is
ignored, its dval is 0), ``W (n, d)``; duplicated indices in a row are summed. Accumulation
is float32 (float64 when W is float64); outputs take W's dtype (dvals: vals' dtype).

dW without atomics: the launcher stable-sorts the (b, j) pairs by latent (padding last),
finds each latent's segment with ``searchsorted`` (no host synchronisation), and one program
per (latent, d-tile) sums its segment in sorted order, writing zeros for unused latents.
The result is bitwise reproducible run to run. ``deterministic=False`` uses atomic adds.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launch_config import SparseDecodeConfig, sparse_decode_config

__all__ = [
    "launch_sparse_decode_bwd",
    "launch_sparse_decode_fwd",
    "sparse_decode_bwd_dvals_kernel",
    "sparse_decode_bwd_dW_atomic_kernel",
    "sparse_decode_bwd_dW_sorted_kernel",
    "sparse_decode_fwd_kernel",
]


@triton.jit
def _load_pairs(idx_ptr, vals_ptr, row, K, k0, BK: tl.constexpr, ACC: tl.constexpr):
    """Pairs k0 .. k0 + BK of a row: (ix (BK,) int64, -1 past K; valid = ix >= 0; vals in ACC, 0 where invalid)."""
    kk = k0 + tl.arange(0, BK)
    ix = tl.load(idx_ptr + row * K + kk, mask=kk < K, other=-1)
    valid = ix >= 0
    v = tl.load(vals_ptr + row * K + kk, mask=valid, other=0.0).to(ACC)
    return ix, valid, v


@triton.jit
def sparse_decode_fwd_kernel(vals_ptr, idx_ptr, w_ptr, b_ptr, out_ptr, K, d,
                             HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                             BK: tl.constexpr, BD: tl.constexpr):
    """Program (row, d-tile). vals (B, K), idx (B, K) int64, W (n, d), b (d,), out (B, d)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < d
    acc = tl.zeros([BD], dtype=ACC)
    for k0 in range(0, K, BK):
        ix, valid, v = _load_pairs(idx_ptr, vals_ptr, row, K, k0, BK, ACC)
        w = tl.load(w_ptr + ix[:, None] * d + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    tl.store(out_ptr + row * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def sparse_decode_bwd_dvals_kernel(grad_ptr, idx_ptr, w_ptr, dvals_ptr, K, d,
                                   ACC: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Program (row, K-tile): dvals[b, j] = <grad[b], W[idx[b, j]]>, 0 at padding."""
    row = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    kmask = kk < K
    ix = tl.load(idx_ptr + row * K + kk, mask=kmask, other=-1)
    valid = ix >= 0
    acc = tl.zeros([BK], dtype=ACC)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < d
        g = tl.load(grad_ptr + row * d + cols, mask=cmask, other=0.0).to(ACC)
        w = tl.load(w_ptr + ix[:, None] * d + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(w * g[None, :], axis=1)
    acc = tl.where(valid, acc, 0.0)
    tl.store(dvals_ptr + row * K + kk, acc.to(dvals_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def sparse_decode_bwd_dW_sorted_kernel(grad_ptr, vals_ptr, perm_ptr, seg_ptr, dw_ptr, K, d,
                                       ACC: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr):
    """Program (latent i, d-tile): dW[i] = sum over its sorted pairs p of vals[p] * grad[p // K].

    perm: (B*K,) int64 flat pair positions sorted by latent; seg: (n+1,) int64 offsets.
    """
    lat = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < d
    start = tl.load(seg_ptr + lat)
    end = tl.load(seg_ptr + lat + 1)
    acc = tl.zeros([BD], dtype=ACC)
    for p0 in range(start, end, BP):
        pp = p0 + tl.arange(0, BP)
        pm = pp < end
        flat = tl.load(perm_ptr + pp, mask=pm, other=0)
        v = tl.load(vals_ptr + flat, mask=pm, other=0.0).to(ACC)
        brow = flat // K
        g = tl.load(grad_ptr + brow[:, None] * d + cols[None, :],
                    mask=pm[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * g, axis=0)
    tl.store(dw_ptr + lat * d + cols, acc.to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def sparse_decode_bwd_dW_atomic_kernel(grad_ptr, vals_ptr, idx_ptr, dw_ptr, K, d,
                                       ACC: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Program (row, d-tile): dW[idx[b, j]] += vals[b, j] * grad[b] with atomics (dw: ACC)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < d
    g = tl.load(grad_ptr + row * d + cols, mask=cmask, other=0.0).to(ACC)
    for k0 in range(0, K, BK):
        ix, valid, v = _load_pairs(idx_ptr, vals_ptr, row, K, k0, BK, ACC)
        tl.atomic_add(dw_ptr + ix[:, None] * d + cols[None, :], v[:, None] * g[None, :],
                      mask=valid[:, None] & cmask[None, :], sem="relaxed")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_sparse_decode_fwd(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
                             b: torch.Tensor | None) -> torch.Tensor:
    """vals (B, K), idx (B, K) int64 in [-1, n), W (n, d), b (d,) or None -> out (B, d) in W.dtype."""
    B, K = idx.shape
    d = W.shape[1]
    out = torch.empty((B, d), dtype=W.dtype, device=W.device)
    if B == 0 or d == 0:
        return out
    if K == 0:
        out.zero_()
        if b is not None:
            out += b.to(W.dtype)
        return out
    vals, idx, W = vals.contiguous(), idx.to(torch.int64).contiguous(), W.contiguous()
    cfg = sparse_decode_config(d, W.dtype)
    bias = b.contiguous() if b is not None else W
    with _on_device(W):
        sparse_decode_fwd_kernel[(B, triton.cdiv(d, cfg.bd))](
            vals, idx, W, bias, out, K, d, HAS_BIAS=b is not None, ACC=_acc(W.dtype),
            BK=cfg.bk, BD=cfg.bd, num_warps=cfg.num_warps)
    return out


def launch_sparse_decode_bwd(grad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
                             need_vals: bool, need_W: bool, deterministic: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (B, d), vals (B, K), idx (B, K) int64, W (n, d).

    Returns dvals (B, K) in vals.dtype and dW (n, d) in W.dtype; a grad that is not needed
    comes back as an empty tensor.
    """
    B, K = idx.shape
    n, d = W.shape
    dvals = vals.new_empty(0)
    dW = W.new_empty(0)
    grad, vals, idx, W = grad.contiguous(), vals.contiguous(), idx.to(torch.int64).contiguous(), W.contiguous()
    acc = _acc(W.dtype)
    cfg = sparse_decode_config(max(d, 1), W.dtype)
    with _on_device(W):
        if need_vals:
            dvals = torch.zeros((B, K), dtype=vals.dtype, device=vals.device)
            if B > 0 and K > 0 and d > 0:
                sparse_decode_bwd_dvals_kernel[(B, triton.cdiv(K, cfg.bk))](
                    grad, idx, W, dvals, K, d, ACC=acc, BK=cfg.bk, BD=cfg.bd, num_warps=cfg.num_warps)
        if need_W:
            dW = _dw(grad, vals, idx, W, acc, cfg, deterministic)
    return dvals, dW


def _dw(grad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, acc: tl.dtype,
        cfg: SparseDecodeConfig,
        deterministic: bool) -> torch.Tensor:
    """dW (n, d) in W.dtype: sorted segment sums (deterministic) or atomics."""
    B, K = idx.shape
    n, d = W.shape
    if B == 0 or K == 0 or n == 0 or d == 0:
        return torch.zeros((n, d), dtype=W.dtype, device=W.device)
    if deterministic:
        flat = idx.reshape(-1)
        key = torch.where(flat >= 0, flat, n)  # padding sorts last, outside every segment
        skey, perm = torch.sort(key, stable=True)
        seg = torch.searchsorted(skey, torch.arange(n + 1, device=skey.device, dtype=skey.dtype))
        dW = torch.empty((n, d), dtype=W.dtype, device=W.device)
        sparse_decode_bwd_dW_sorted_kernel[(n, triton.cdiv(d, cfg.bd))](
            grad, vals, perm, seg, dW, K, d, ACC=acc, BP=cfg.bk, BD=cfg.bd, num_warps=cfg.num_warps)
    else:
        acc_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        dw_acc = torch.zeros((n, d), dtype=acc_dtype, device=W.device)
        sparse_decode_bwd_dW_atomic_kernel[(B, triton.cdiv(d, cfg.bd))](
            grad, vals, idx, dw_acc, K, d, ACC=acc, BK=cfg.bk, BD=cfg.bd, num_warps=cfg.num_warps)
        dW = dw_acc if dw_acc.dtype == W.dtype else dw_acc.to(W.dtype)
    return dW
