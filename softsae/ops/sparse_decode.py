"""Sparse decoder gather with per-row k: ``x_hat = sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec``.

    x_hat = sparse_decode(vals, idx, W_dec, b_dec=None, backend="auto", deterministic=True)

Padded layout: ``vals (B, K)`` and ``idx (B, K)``; ``idx = -1`` marks padding (its value is
ignored). This is the product ``z @ W_dec + b_dec`` with z the dense (B, n) matrix those pairs
describe, computed without ever forming z: forward gathers only the active rows of W_dec;
backward computes ``dvals`` as gathered dot products and ``dW_dec`` by grouping the pairs per
latent (a counting sort), so the default path is deterministic and atomic-free.
``deterministic=False`` lets GPU backends use atomics instead. The math is in
docs/math.md (section 2), the backend contract in docs/design.md.

Index range checking reads ``idx.min()``/``idx.max()`` back to the host, so it runs by
default only for CPU tensors; on CUDA it is off (no host-device sync, CUDA-graph safe) unless
``validate=True`` or the environment variable ``SOFTSAE_CHECK_INDICES=1``. Out-of-range
indices on an unchecked CUDA call are undefined behaviour of the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from softsae import _backends
from softsae.ops.sparse_decode_ref import sparse_decode_bwd_ref, sparse_decode_fwd_ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels(backend: str) -> tuple[Callable, Callable]:
    if backend == "reference":
        return sparse_decode_fwd_ref, sparse_decode_bwd_ref
    if backend == "cpu":
        ext = _backends.cpu_ext()
        return _upcast_half_fwd(ext.sparse_decode_fwd), _upcast_half_bwd(ext.sparse_decode_bwd)
    if backend == "cuda":
        ext = _backends.cuda_ext()
        return ext.sparse_decode_fwd, ext.sparse_decode_bwd
    if backend == "triton":
        from softsae.kernels.sparse_decode import launch_sparse_decode_bwd, launch_sparse_decode_fwd

        return launch_sparse_decode_fwd, launch_sparse_decode_bwd
    raise ValueError(f"unknown backend {backend!r}")


def _upcast_half_fwd(fwd):
    def run(vals, idx, W, b):
        if W.dtype in (torch.float32, torch.float64):
            return fwd(vals, idx, W, b)
        out = fwd(vals.float(), idx, W.float(), None if b is None else b.float())
        return out.to(W.dtype)

    return run


def _upcast_half_bwd(bwd):
    def run(grad, vals, idx, W, need_vals, need_W, deterministic):
        if W.dtype in (torch.float32, torch.float64):
            return bwd(grad, vals, idx, W, need_vals, need_W, deterministic)
        dvals, dW = bwd(grad.float(), vals.float(), idx, W.float(), need_vals, need_W, deterministic)
        return dvals.to(vals.dtype), dW.to(W.dtype)

    return run


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("softsae::sparse_decode_fwd", mutates_args=())
def _fwd_op(vals: Tensor, idx: Tensor, W: Tensor, b: Tensor | None, backend: str, deterministic: bool) -> Tensor:
    fwd, _ = _kernels(backend)
    return fwd(vals, idx, W, b)


@_fwd_op.register_fake
def _(vals, idx, W, b, backend, deterministic):
    return W.new_empty(vals.shape[0], W.shape[1])


@torch.library.custom_op("softsae::sparse_decode_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, vals: Tensor, idx: Tensor, W: Tensor, need_vals: bool, need_W: bool,
    deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    _, bwd = _kernels(backend)
    dvals, dW = bwd(grad.contiguous(), vals, idx, W, need_vals, need_W, deterministic)
    # custom ops may not return views of inputs or empty aliases; make fresh tensors.
    return dvals.clone() if dvals.numel() == 0 else dvals, dW.clone() if dW.numel() == 0 else dW


@_bwd_op.register_fake
def _(grad, vals, idx, W, need_vals, need_W, deterministic, backend):
    dvals = torch.empty_like(vals) if need_vals else vals.new_empty(0)
    dW = torch.empty_like(W) if need_W else W.new_empty(0)
    return dvals, dW


def _setup_context(ctx, inputs, output):
    vals, idx, W, b, backend, deterministic = inputs
    ctx.save_for_backward(vals, idx, W)
    ctx.backend, ctx.deterministic = backend, deterministic
    ctx.has_b = b is not None


def _backward(ctx, grad):
    vals, idx, W = ctx.saved_tensors
    need_vals, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dvals = dW = None
    if need_vals or need_W:
        dv, dw = _bwd_op(grad, vals, idx, W, need_vals, need_W, ctx.deterministic, ctx.backend)
        dvals = dv if need_vals else None
        dW = dw if need_W else None
    db = grad.sum(0) if ctx.has_b and ctx.needs_input_grad[3] else None
    return dvals, None, dW, db, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _should_validate(validate: bool | None, device: torch.device) -> bool:
    """Range-check idx? Explicit flag, else env SOFTSAE_CHECK_INDICES=1, else only on CPU."""
    if torch.compiler.is_compiling():
        return False
    if validate is not None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool or None, got {type(validate).__name__}")
        return validate
    return device.type == "cpu" or os.environ.get("SOFTSAE_CHECK_INDICES", "0") == "1"


def _check(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None, validate: bool | None = None) -> None:
    for name, t in (("vals", vals), ("idx", idx), ("W_dec", W_dec)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if vals.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(f"vals and idx must both be (B, K) with the same shape, got "
                         f"vals {tuple(vals.shape)} and idx {tuple(idx.shape)}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be (n, d), got shape {tuple(W_dec.shape)}")
    if W_dec.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"W_dec must be a float tensor, got {W_dec.dtype}")
    if vals.dtype != W_dec.dtype:
        raise TypeError(f"vals ({vals.dtype}) and W_dec ({W_dec.dtype}) must have the same dtype")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be int64 or int32, got {idx.dtype}")
    devices = {vals.device, idx.device, W_dec.device}
    if b_dec is not None:
        if not isinstance(b_dec, Tensor):
            raise TypeError(f"b_dec must be a tensor or None, got {type(b_dec).__name__}")
        if b_dec.shape != (W_dec.shape[1],):
            raise ValueError(f"b_dec must have shape ({W_dec.shape[1]},) to match W_dec, got {tuple(b_dec.shape)}")
        if b_dec.dtype != W_dec.dtype:
            raise TypeError(f"b_dec ({b_dec.dtype}) and W_dec ({W_dec.dtype}) must have the same dtype")
        devices.add(b_dec.device)
    if len(devices) != 1:
        raise ValueError(f"vals, idx, W_dec and b_dec must be on one device, got {sorted(map(str, devices))}")
    if idx.numel() and _should_validate(validate, W_dec.device):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= W_dec.shape[0]:
            raise ValueError(f"idx must lie in [-1, {W_dec.shape[0]}) (-1 = padding); found values in [{lo}, {hi}]")


def sparse_decode(
    vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None,
    backend: str = "auto", deterministic: bool = True, validate: bool | None = None,
) -> Tensor:
    """Decode padded sparse codes. vals (B, K) float, idx (B, K) int (-1 = pad), W_dec (n, d).

    Returns (B, d) in W_dec's dtype (float16/bfloat16 accumulate in float32). Gradients flow
    to vals, W_dec and b_dec. ``deterministic=True`` (default) gives bit-identical dW_dec on
    every run; False allows atomics on GPU backends. ``validate`` range-checks idx (a host
    sync on CUDA): None = on for CPU tensors, on CUDA only if ``SOFTSAE_CHECK_INDICES=1``.
    """
    _check(vals, idx, W_dec, b_dec, validate)
    name = _backends.resolve(backend, W_dec.device)
    idx64 = idx.to(torch.int64).contiguous()
    return _fwd_op(vals.contiguous(), idx64, W_dec.contiguous(), b_dec, name, bool(deterministic))
