"""The soft top-k custom ops (dense forward and backward, fused sparse gate forward), their fake
implementations, autograd and backend dispatch: the module below both public entry points
(``softsae.ops.soft_topk`` and ``softsae.ops.soft_topk_sparse``, which check arguments and call these).

    out, t = _fwd_op(x2, k_rows, alpha_t, largest, gate, backend)            # softsae::soft_topk_fwd
    dx, dk, ds = _bwd_op(grad, x2, t, alpha_t, largest, gate, backend)      # softsae::soft_topk_bwd
    vals, idx, t = _sparse_fwd_op(x2, k_rows, alpha_t, largest, max_count, backend)
                                                                   # softsae::soft_topk_gate_sparse_fwd

x2 (R, n) contiguous, k_rows (R,) float64 clamped, alpha_t 0-d float64 on x's device (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from softsae import _backends
from softsae.ops.soft_topk_ref import soft_topk_bwd_ref, soft_topk_fwd_ref

K_EPS = 1e-6
S_MIN = 1e-30  # smallest scale s = |alpha| any backend sees; 1 / S_MIN = 1e30 < float32 max
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Backend signatures; s is a (1,) float64 tensor on x's device (see docs/design.md).
FwdFn = Callable[[Tensor, Tensor, Tensor, bool, bool], tuple[Tensor, Tensor]]
BwdFn = Callable[[Tensor, Tensor, Tensor, Tensor, bool, bool], tuple[Tensor, Tensor, Tensor]]


def _upcast_half(fwd: FwdFn, bwd: BwdFn) -> tuple[FwdFn, BwdFn]:
    """Wrap float32/float64-only kernels so float16/bfloat16 run in float32 and cast back."""

    def fwd_any(x, k, s, largest, gate):
        if x.dtype in (torch.float32, torch.float64):
            return fwd(x, k, s, largest, gate)
        out, t = fwd(x.float(), k, s, largest, gate)
        return out.to(x.dtype), t

    def bwd_any(grad, x, t, s, largest, gate):
        if x.dtype in (torch.float32, torch.float64):
            return bwd(grad, x, t, s, largest, gate)
        dx, dk, ds = bwd(grad.float(), x.float(), t, s, largest, gate)
        return dx.to(x.dtype), dk, ds

    return fwd_any, bwd_any


def _float_s(fwd: Callable, bwd: Callable) -> tuple[FwdFn, BwdFn]:
    """Adapt kernels taking ``s`` as a Python float (the CPU extension; CPU tensors, no sync)."""

    def fwd_f(x, k, s, largest, gate):
        return fwd(x, k, float(s), largest, gate)

    def bwd_f(grad, x, t, s, largest, gate):
        return bwd(grad, x, t, float(s), largest, gate)

    return fwd_f, bwd_f


def _kernels(backend: str) -> tuple[FwdFn, BwdFn]:
    """(fwd, bwd) for a concrete backend name, per the contract in docs/design.md."""
    if backend == "reference":
        return soft_topk_fwd_ref, soft_topk_bwd_ref
    if backend == "cpu":
        ext = _backends.cpu_ext()
        return _upcast_half(*_float_s(ext.soft_topk_fwd, ext.soft_topk_bwd))
    if backend == "cuda":
        ext = _backends.cuda_ext()
        return ext.soft_topk_fwd, ext.soft_topk_bwd
    if backend == "triton":
        from softsae.kernels.soft_topk import launch_soft_topk_bwd, launch_soft_topk_fwd

        return launch_soft_topk_fwd, launch_soft_topk_bwd
    raise ValueError(f"unknown backend {backend!r}")


# ----------------------------------------------------------------------------- custom ops
# alpha travels as a 0-d float64 tensor on x's device so that autograd can return its gradient
# and nothing is read back to the host.


def scale_of(alpha: Tensor) -> Tensor:
    """s = max(|alpha|, S_MIN) as a (1,) float64 tensor on alpha's device (device-side, no sync)."""
    return alpha.detach().to(torch.float64).abs().clamp_min(S_MIN).reshape(1)


def _fwd_impl(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, gate: bool, backend: str) -> tuple[Tensor, Tensor]:
    fwd, _ = _kernels(backend)
    return fwd(x, k, scale_of(alpha), largest, gate)


def _bwd_impl(
    grad: Tensor, x: Tensor, t: Tensor, alpha: Tensor, largest: bool, gate: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = _kernels(backend)
    return bwd(grad.contiguous(), x, t, scale_of(alpha), largest, gate)


@torch.library.custom_op("softsae::soft_topk_fwd", mutates_args=())
def _fwd_op(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, gate: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, k, alpha, largest, gate, backend)


@_fwd_op.register_fake
def _(x, k, alpha, largest, gate, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.custom_op("softsae::soft_topk_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, x: Tensor, t: Tensor, alpha: Tensor, largest: bool, gate: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(grad, x, t, alpha, largest, gate, backend)


@_bwd_op.register_fake
def _(grad, x, t, alpha, largest, gate, backend):
    r = x.shape[0]
    return torch.empty_like(x), x.new_empty(r, dtype=torch.float64), x.new_empty(r, dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    x, _k, alpha, largest, gate, backend = inputs
    ctx.save_for_backward(x, output[1], alpha)
    ctx.largest, ctx.gate, ctx.backend = largest, gate, backend


def _backward(ctx, grad_out, _grad_t):
    x, t, alpha = ctx.saved_tensors
    dx, dk, ds = _bwd_op(grad_out, x, t, alpha, ctx.largest, ctx.gate, ctx.backend)
    # ds is on x's device, as is alpha (the caller moved it there; autograd moves dalpha back).
    dalpha = (torch.sign(alpha) * ds.sum()) if ctx.needs_input_grad[2] else None
    return dx, dk if ctx.needs_input_grad[1] else None, dalpha, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _sparse_fwd_impl(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, max_count: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    s = scale_of(alpha)
    if backend == "cpu":  # float16 / bfloat16 run in float32, their values rounded back
        xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
        vals, idx, t = _backends.cpu_ext().soft_topk_gate_sparse_fwd(xc, k, float(s), largest, max_count)
        return vals.to(x.dtype), idx, t
    if backend == "triton":
        from softsae.kernels.soft_topk import launch_soft_topk_gate_sparse

        return launch_soft_topk_gate_sparse(x, k, s, largest, None if max_count < 0 else max_count)
    if backend == "cuda":
        return _backends.cuda_ext().soft_topk_gate_sparse_fwd(x.contiguous(), k, s, largest, max_count)
    out, t = soft_topk_fwd_ref(x, k, s, largest, True)
    vals, idx = nonzero_per_row(out, None if max_count < 0 else max_count)
    return vals, idx, t


@torch.library.custom_op("softsae::soft_topk_gate_sparse_fwd", mutates_args=())
def _sparse_fwd_op(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, max_count: int,
            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    vals, idx, t = _sparse_fwd_impl(x, k, alpha, largest, max_count, backend)
    return vals, idx, t


@_sparse_fwd_op.register_fake
def _(x, k, alpha, largest, max_count, backend):
    width = min(max_count, x.shape[1]) if max_count >= 0 else torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape[0], width), x.new_empty(x.shape[0], width, dtype=torch.int64),
            x.new_empty(x.shape[0], dtype=torch.float64))


def _sparse_setup_context(ctx, inputs, output):
    x, _k, alpha, largest, _max_count, backend = inputs
    _vals, idx, t = output
    ctx.save_for_backward(x, idx, t, alpha)
    ctx.largest, ctx.backend = largest, backend


def _sparse_backward(ctx, dvals, _didx, _dt):
    x, idx, t, alpha = ctx.saved_tensors
    grad = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=x.dtype, device=x.device)
    grad.scatter_(1, torch.where(idx >= 0, idx, x.shape[1]), dvals.to(x.dtype))  # pad -> column n
    dx, dk, ds = _bwd_op(grad[:, : x.shape[1]].contiguous(), x, t, alpha, ctx.largest, True, ctx.backend)
    dalpha = (torch.sign(alpha) * ds.sum()) if ctx.needs_input_grad[2] else None
    return dx, dk if ctx.needs_input_grad[1] else None, dalpha, None, None, None


_sparse_fwd_op.register_autograd(_sparse_backward, setup_context=_sparse_setup_context)


def nonzero_per_row(z: Tensor, max_count: int | None = None) -> tuple[Tensor, Tensor]:
    """Padded (vals, idx) of the non-zeros of each row of z (..., n), increasing index order.

    The width is the largest per-row count (read back from the device: a sync on CUDA), or
    ``max_count`` (clipped to n) when given: static, no sync; a row with more non-zeros then
    keeps its ``max_count`` lowest-index ones.
    """
    n = z.shape[-1]
    nz = z != 0
    if max_count is not None:
        if not isinstance(max_count, int) or isinstance(max_count, bool) or max_count < 0:
            raise ValueError(f"max_count must be an int >= 0 or None, got {max_count!r}")
        k_max = min(max_count, n)
    else:
        k_max = int(nz.sum(dim=-1).max()) if z.numel() else 0
    if k_max == 0:
        shape = (*z.shape[:-1], 0)
        return z.new_zeros(shape), torch.zeros(shape, dtype=torch.int64, device=z.device)
    # Rank key: non-zeros get n - i (larger for smaller index), zeros get 0.
    key = torch.where(nz, n - torch.arange(n, device=z.device), 0)
    keys, idx = torch.topk(key, k_max, dim=-1, sorted=True)
    valid = keys > 0
    idx = torch.where(valid, idx, -1)
    vals = torch.where(valid, z.gather(-1, idx.clamp(min=0)), 0)
    return vals, idx
