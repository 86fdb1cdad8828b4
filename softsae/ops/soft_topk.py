"""Soft Top-K (LapSum): public functions, torch.library custom ops, autograd and dispatch.

    p = soft_topk(x, k, alpha)            # weights in (0, 1), same shape as x, sum = k per row
    z = soft_topk_gate(x, k, alpha)       # x * p, fused
    vals, idx = soft_topk_gate(x, k, alpha, sparse=True)   # the exact non-zeros of x * p

The math is in docs/math.md (section 1), the backend contract in docs/design.md. This file
checks arguments, brings the input to a contiguous ``(R, n)`` layout and hands it to one
backend through the custom ops ``softsae::soft_topk_fwd`` / ``softsae::soft_topk_bwd``
(with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them).

Behaviour at the edges (documented and tested):

- ``k`` is clamped into ``[K_EPS, n - K_EPS]`` (``K_EPS = 1e-6``); the gradient w.r.t. k is zero
  where the clamp is active, as for ``torch.clamp``.
- A row holding NaN or +-inf gives NaN weights (and NaN gradients) for that row only.
- Empty tensors return empty results; ``n = 1`` gives ``p = k``.
- Only ``t`` (one float64 per row) is saved for backward, besides the input.
- ``s = max(|alpha|, S_MIN)`` with ``S_MIN = 1e-30`` (so a float32 ``1/s`` stays finite), computed
  on x's device and handed to every backend as a ``(1,)`` float64 tensor; every kernel clamps
  the same way. A CUDA alpha is never read back to the host (no validation of its value);
  the gradient w.r.t. alpha stays on alpha's device.
- Nothing here synchronises the host with a CUDA device, except ``sparse=True`` without
  ``max_count`` (the output width is data-dependent; pass ``max_count`` to avoid it).
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- public API


def _check_inputs(x: Tensor, k, alpha, dim: int, largest: bool) -> tuple[int, Tensor]:
    """Validate arguments; return (normalised dim, alpha as a 0-d float64 tensor on x's device).

    alpha's value is checked (finite, non-zero) only when it is a Python number or a CPU
    tensor: a CUDA alpha is never read back (a zero alpha then acts as s = S_MIN).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x with {x.dim()} dimensions")
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}")
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a 1-element float tensor, got shape "
                             f"{tuple(alpha.shape)} and dtype {alpha.dtype}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_alpha_value(float(alpha.detach()))
        alpha_t = alpha.reshape(()).to(device=x.device, dtype=torch.float64)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        _check_alpha_value(float(alpha))
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy (graph-capturable).
        alpha_t = torch.full((), float(alpha), dtype=torch.float64, device=x.device)
    else:
        raise TypeError(f"alpha must be a float or a 0-d tensor, got {type(alpha).__name__}")
    if isinstance(k, Tensor):
        if not (k.is_floating_point() or k.dtype in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                      torch.uint8)):
            raise TypeError(f"k must be a real tensor or a number, got dtype {k.dtype}")
        if k.device != x.device and k.numel() > 1:
            raise ValueError(f"k is on {k.device} but x is on {x.device}; put them on the same device")
    elif not isinstance(k, (int, float)) or isinstance(k, bool):
        raise TypeError(f"k must be a tensor or a number, got {type(k).__name__}")
    return dim % x.dim(), alpha_t


def _check_alpha_value(a: float) -> None:
    if a == 0.0 or not math.isfinite(a):
        raise ValueError(f"alpha must be finite and non-zero, got {a}")


def _rows_k(k, x_moved: Tensor) -> Tensor:
    """k as a (R,) float64 tensor on x's device, clamped into [K_EPS, n - K_EPS]."""
    batch_shape, n = x_moved.shape[:-1], x_moved.shape[-1]
    rows = math.prod(batch_shape)
    if isinstance(k, Tensor):
        kk = k.to(device=x_moved.device, dtype=torch.float64)
        if kk.numel() == 1:
            kk = kk.reshape(1).expand(rows)
        elif tuple(kk.shape) == tuple(batch_shape) or tuple(kk.shape) == (*batch_shape, 1):
            kk = kk.reshape(rows)
        else:
            raise ValueError(f"k must be a number, a 1-element tensor, or have shape {tuple(batch_shape)} "
                             f"(x without dim) or {(*batch_shape, 1)}; got {tuple(k.shape)}")
    else:
        kk = torch.full((rows,), float(k), dtype=torch.float64, device=x_moved.device)
    return kk.clamp(K_EPS, n - K_EPS)


def _soft_topk(x: Tensor, k, alpha, dim: int, largest: bool, backend: str, gate: bool) -> Tensor:
    dim, alpha_t = _check_inputs(x, k, alpha, dim, largest)
    name = _backends.resolve(backend, x.device)
    xm = x.movedim(dim, -1)
    k_rows = _rows_k(k, xm)
    if xm.numel() == 0:
        # Keep the graph connected so that gradients (zeros) still flow.
        out = xm * 0 if gate else xm * 0 + k_rows.sum() * 0
        return out.movedim(-1, dim)
    x2 = xm.reshape(-1, xm.shape[-1]).contiguous()
    out, _t = _fwd_op(x2, k_rows, alpha_t, largest, gate, name)
    return out.reshape(xm.shape).movedim(-1, dim)


def soft_topk(x: Tensor, k, alpha, dim: int = -1, largest: bool = True, backend: str = "auto") -> Tensor:
    """Soft top-k weights ``p`` (same shape and dtype as ``x``), ``sum(p, dim) = k`` per row.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape; rows run along ``dim``.
        k: per-row budget: a number, or a tensor shaped like ``x`` without ``dim`` (or with a
            size-1 ``dim``). Clamped into ``[1e-6, n - 1e-6]``. Differentiable.
        alpha: the scale ``s = |alpha|`` of the Laplace CDF (float or 1-element tensor,
            differentiable); small alpha approaches the hard top-k mask.
        largest: weight the largest (True) or the smallest (False) entries.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
    """
    return _soft_topk(x, k, alpha, dim, largest, backend, gate=False)


def soft_topk_gate(
    x: Tensor, k, alpha, dim: int = -1, largest: bool = True, backend: str = "auto", sparse: bool = False,
    max_count: int | None = None,
):
    """Fused gate ``x * soft_topk(x, k, alpha)`` (same shape and dtype as ``x``).

    With ``sparse=True`` (``dim`` must be the last axis) returns ``(vals, idx)`` of shape
    ``(*x.shape[:-1], K_max)``: every non-zero of the dense gate output, in increasing index
    order, padded with ``idx = -1`` / ``vals = 0``; ``K_max`` is the largest per-row count,
    which costs a host-device sync on CUDA, or ``max_count`` when given (no sync; rows with
    more non-zeros keep their ``max_count`` lowest indices, so give ``n`` to be exact).
    The set is exact (an entry is listed iff it is non-zero in the dense result), because in
    floating point most soft weights underflow to exactly 0 at small alpha. ``vals`` is
    differentiable. Every backend takes the fused path of softsae/ops/soft_topk_sparse.py (no
    dense (..., n) output; the reference backend compacts its dense result there).
    """
    if sparse:
        from softsae.ops.soft_topk_sparse import fused_backend, soft_topk_gate_sparse

        ndim, alpha_t = _check_inputs(x, k, alpha, dim, largest)
        if ndim != x.dim() - 1:
            raise ValueError(f"sparse=True needs dim=-1 (the rows on the last axis), got dim={dim}")
        fused = fused_backend(x, backend)
        if fused is not None and x.numel() > 0:
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            vals, idx = soft_topk_gate_sparse(x2, _rows_k(k, x), alpha_t, largest, max_count, fused)
            return vals.reshape(*x.shape[:-1], vals.shape[-1]), idx.reshape(*x.shape[:-1], idx.shape[-1])
    z = _soft_topk(x, k, alpha, dim, largest, backend, gate=True)
    if not sparse:
        return z
    return nonzero_per_row(z, max_count)


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
