"""Reference sparse decode: scatter the (values, indices) pairs into a dense z, then matmul.

This is the dense computation ``z @ W_dec`` that every sparse backend must equal. It builds a
(B, n) intermediate on purpose: readable and obviously right, not fast.

Layout: ``vals (B, K)`` and ``idx (B, K)`` int64, index -1 = padding (value ignored).
Half types are accumulated in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def densify(vals: Tensor, idx: Tensor, n: int, dtype: torch.dtype | None = None) -> Tensor:
    """Dense z (B, n) with z[b, idx[b, j]] += vals[b, j] for idx >= 0 (duplicates summed)."""
    dtype = dtype or vals.dtype
    valid = idx >= 0
    z = torch.zeros(vals.shape[0], n, dtype=dtype, device=vals.device)
    src = torch.where(valid, vals.to(dtype), torch.zeros((), dtype=dtype, device=vals.device))
    return z.scatter_add_(1, idx.clamp(min=0), src)


def sparse_decode_fwd_ref(vals: Tensor, idx: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """out (B, d) = densify(vals, idx) @ W (+ b), in vals.dtype."""
    acc = _acc_dtype(W.dtype)
    out = densify(vals, idx, W.shape[0], acc) @ W.to(acc)
    if b is not None:
        out = out + b.to(acc)
    return out.to(W.dtype)


def sparse_decode_bwd_ref(
    grad: Tensor, vals: Tensor, idx: Tensor, W: Tensor, need_vals: bool, need_W: bool,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor]:
    """dvals (B, K) = <grad_b, W[idx]> (0 at padding); dW (n, d) = densify(vals)^T @ grad.

    Grads that are not needed come back as empty tensors. ``deterministic`` is accepted for
    signature parity (the dense reference is always deterministic).
    """
    del deterministic
    acc = _acc_dtype(W.dtype)
    g = grad.to(acc)
    dvals = W.new_empty(0)
    dW = W.new_empty(0)
    if need_vals:
        dz = g @ W.to(acc).T
        dvals = torch.where(idx >= 0, dz.gather(1, idx.clamp(min=0)), 0.0).to(vals.dtype)
    if need_W:
        dW = (densify(vals, idx, W.shape[0], acc).T @ g).to(W.dtype)
    return dvals, dW
