"""Soft Top-K (LapSum): public functions, torch.library custom ops, autograd and dispatch.

    p = soft_topk(x, k, alpha)            # weights in (0, 1), same shape as x, sum = k per row
    z = soft_topk_gate(x, k, alpha)       # x * p, fused
    vals, idx = soft_topk_gate(x, k, alpha, sparse=True)   # the exact non-zeros of x * p

The math is in docs/math.md (section 1), the backend contract in docs/design.md. This file
checks arguments, brings the input to a contiguous ``(R, n)`` layout and hands it to one
backend through the custom ops ``softsae::soft_topk_fwd`` / ``softsae::soft_topk_bwd``
(softsae/ops/soft_topk_ops.py, with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them).

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

import torch
from torch import Tensor

from softsae import _backends
from softsae.ops.soft_topk_ops import (  # noqa: F401  (re-exported: K_EPS, S_MIN, nonzero_per_row, the impls)
    _FLOAT_DTYPES,
    K_EPS,
    S_MIN,
    _bwd_impl,
    _fwd_impl,
    _fwd_op,
    nonzero_per_row,
    scale_of,
)
from softsae.ops.soft_topk_sparse import fused_backend, soft_topk_gate_sparse

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
    alpha_t = alpha_tensor(alpha, x.device)
    if isinstance(k, Tensor):
        if not (k.is_floating_point() or k.dtype in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                      torch.uint8)):
            raise TypeError(f"k must be a real tensor or a number, got dtype {k.dtype}")
        if k.device != x.device and k.numel() > 1:
            raise ValueError(f"k is on {k.device} but x is on {x.device}; put them on the same device")
    elif not isinstance(k, (int, float)) or isinstance(k, bool):
        raise TypeError(f"k must be a tensor or a number, got {type(k).__name__}")
    return dim % x.dim(), alpha_t


def alpha_tensor(alpha, device: torch.device) -> Tensor:
    """alpha (a number or a 1-element float tensor) as a 0-d float64 tensor on ``device``; its value is
    checked (finite, non-zero) only when it is a number or a CPU tensor (see :func:`_check_inputs`)."""
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a 1-element float tensor, got shape "
                             f"{tuple(alpha.shape)} and dtype {alpha.dtype}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_alpha_value(float(alpha.detach()))
        return alpha.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        _check_alpha_value(float(alpha))
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy (graph-capturable).
        return torch.full((), float(alpha), dtype=torch.float64, device=device)
    raise TypeError(f"alpha must be a float or a 0-d tensor, got {type(alpha).__name__}")


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
