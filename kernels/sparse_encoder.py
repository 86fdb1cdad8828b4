"""Triton sparse encoder backward: gradients of ``pre = x @ W.T + b`` from dpre given as pairs.

Contract: softsae/ops/sparse_encoder.py; math: docs/math.md (section 5). ``dvals (B, K)``,
``idx (B, K)`` int64 (-1 = padding), ``x (B, d)``, ``W (n, d)``, one float dtype; accumulation
in float32 (float64 for float64), outputs in W's dtype.

The sparse decode kernels do the heavy parts: ``dx = sparse_decode_fwd(dvals, idx, W)`` and dW
is the sparse decoder's sorted (or atomic) dW with x in place of the output gradient. The only
new kernel is db: one program per block of latents sums each latent's segment of the pairs in
sorted order (deterministic). dW and db share one stable sort of the pairs by latent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import sparse_decode_config, sparse_encoder_db_config
from .sparse_decode import (
    _acc,
    _dw,
    _on_device,
    launch_sparse_decode_fwd,
    sparse_decode_bwd_dW_sorted_kernel,
)

__all__ = ["launch_sparse_encoder_bwd", "sparse_encoder_bwd_db_sorted_kernel"]


@triton.jit
def sparse_encoder_bwd_db_sorted_kernel(vals_ptr, perm_ptr, seg_ptr, db_ptr, n,
                                        ACC: tl.constexpr, BL: tl.constexpr):
    """Program (block of BL latents): db[i] = sum of vals[perm[p]] over p in [seg[i], seg[i+1]),
    in p order. vals (B*K,) flat; perm (B*K,) int64 pair positions sorted by latent; seg (n+1,)."""
    lat = tl.program_id(0).to(tl.int64) * BL + tl.arange(0, BL)
    lmask = lat < n
    start = tl.load(seg_ptr + lat, mask=lmask, other=0)
    end = tl.load(seg_ptr + lat + 1, mask=lmask, other=0)
    acc = tl.zeros([BL], dtype=ACC)
    longest = tl.max(end - start, axis=0)
    for q in range(0, longest):
        pm = start + q < end
        flat = tl.load(perm_ptr + start + q, mask=pm, other=0)
        acc += tl.load(vals_ptr + flat, mask=pm, other=0.0).to(ACC)
    tl.store(db_ptr + lat, acc.to(db_ptr.dtype.element_ty), mask=lmask)


def _segments(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm (B*K,), seg (n+1,)): pair positions stably sorted by latent (padding last) and each
    latent's segment offsets, found with searchsorted (no host synchronisation)."""
    flat = idx.reshape(-1)
    key = torch.where(flat >= 0, flat, n)
    skey, perm = torch.sort(key, stable=True)
    seg = torch.searchsorted(skey, torch.arange(n + 1, device=skey.device, dtype=skey.dtype))
    return perm, seg


def launch_sparse_encoder_bwd(dvals: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, W: torch.Tensor,
                              need_x: bool, need_W: bool, need_b: bool, deterministic: bool = True,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (B, d), dW (n, d), db (n,) in W.dtype; a grad not needed is an empty tensor."""
    B, K = idx.shape
    n, d = W.shape
    dvals, idx = dvals.contiguous(), idx.to(torch.int64).contiguous()
    x, W = x.contiguous(), W.contiguous()
    acc = _acc(W.dtype)
    dx = launch_sparse_decode_fwd(dvals, idx, W, None) if need_x else x.new_empty(0)
    dW, db = W.new_empty(0), W.new_empty(0)
    if not (need_W or need_b):
        return dx, dW, db
    empty = B == 0 or K == 0 or n == 0
    if need_W:
        if empty or d == 0 or not deterministic:
            dW = _dw(x, dvals, idx, W, acc, sparse_decode_config(max(d, 1), W.dtype), deterministic)
    if need_b and (empty or not deterministic):
        acc_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        valid = (idx >= 0).reshape(-1)
        src = torch.where(valid, dvals.reshape(-1).to(acc_dtype), 0.0)
        db = torch.zeros(n, dtype=acc_dtype, device=W.device).index_add_(0, idx.reshape(-1).clamp(min=0), src)
        db = db.to(W.dtype)
    if empty or not deterministic or not (need_b or (need_W and d > 0)):
        return dx, dW, db
    perm, seg = _segments(idx, n)
    with _on_device(W):
        if need_W and d > 0:
            cfg = sparse_decode_config(d, W.dtype)
            dW = torch.empty((n, d), dtype=W.dtype, device=W.device)
            sparse_decode_bwd_dW_sorted_kernel[(n, triton.cdiv(d, cfg.bd))](
                x, dvals, perm, seg, dW, K, d, ACC=acc, BP=cfg.bk, BD=cfg.bd, num_warps=cfg.num_warps)
        if need_b:
            bcfg = sparse_encoder_db_config()
            db = torch.empty(n, dtype=W.dtype, device=W.device)
            sparse_encoder_bwd_db_sorted_kernel[(triton.cdiv(n, bcfg.bl),)](
                dvals, perm, seg, db, n, ACC=acc, BL=bcfg.bl, num_warps=bcfg.num_warps)
    return dx, dW, db
