"""Sparse encoder backward: gradients of ``pre = x @ W_enc.T + b_enc`` from a sparse ``dpre``.

    dx, dW, db = sparse_encoder_bwd(dvals, idx, x, W_enc)        # dpre given as (B, K) pairs
    pre = encoder_pre(x, W_enc, b_enc)                           # relu(x W^T + b), sparse backward

When the gate after the encoder is sparse (TopK, BatchTopK, SoftSAE's hard phase, the soft phase
at small alpha), ``dpre`` (B, n) is non-zero only at a few (row, latent) pairs. With those pairs
in the padded layout ``dvals (B, K)``, ``idx (B, K)`` (int, -1 = padding; duplicates summed)::

    dx[b] = sum_j dvals[b, j] W[idx[b, j]]                  (B, d)   = sparse_decode(dvals, idx, W)
    dW[i] = sum over pairs (b, j) of latent i of dvals[b, j] x[b]   (n, d)
    db[i] = sum over the same pairs of dvals[b, j]                  (n,)

at sum_b k_b * d multiply-adds each instead of the two dense B * n * d GEMMs (docs/math.md,
section 5). dW is the sparse decoder's dW with x in place of the output gradient, so every
backend reuses its sparse decode kernels; dW and db share one grouping of the pairs per latent
(a counting sort / stable sort), which makes the default path deterministic and atomic-free.
``deterministic=False`` lets GPU backends use atomics.

``encoder_pre`` is the differentiable encoder used by the models: its forward is the dense
GEMM + ReLU (the selection needs every pre-activation), its backward compacts the incoming
``dpre * (pre > 0)`` to pairs and takes the sparse path when the densest row has at most
``max_density * n`` non-zeros (else the dense GEMMs). Exact either way: the same gradients as
autograd through ``F.relu(F.linear(x, W, b))``. The compaction reads the largest row count back
to the host: free on CPU, one synchronisation per backward on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from softsae import _backends
from softsae.ops.sparse_decode import _FLOAT_DTYPES, _should_validate
from softsae.ops.sparse_encoder_ref import compact_nonzero_ref, sparse_encoder_bwd_ref

# encoder_pre's backward goes sparse when its densest row has <= this fraction of n non-zeros. CPU,
# B = 4096, d = 768, n = 16384 (benchmarks/results/sparse_encoder.md): dense backward 5.7 s; sparse
# op 0.4 s at K = 32, 2.3 s at K = 512 (= n / 32), break-even near n / 14.
MAX_DENSITY = 1.0 / 32

BwdFn = Callable[[Tensor, Tensor, Tensor, Tensor, bool, bool, bool, bool], tuple[Tensor, Tensor, Tensor]]


def _upcast_half(bwd: BwdFn) -> BwdFn:
    """Wrap a float32/float64-only kernel so float16/bfloat16 run in float32 and cast back."""

    def run(dvals, idx, x, W, need_x, need_W, need_b, deterministic):
        if W.dtype in (torch.float32, torch.float64):
            return bwd(dvals, idx, x, W, need_x, need_W, need_b, deterministic)
        dx, dW, db = bwd(dvals.float(), idx, x.float(), W.float(), need_x, need_W, need_b, deterministic)
        return dx.to(x.dtype), dW.to(W.dtype), db.to(W.dtype)

    return run


def _kernel(backend: str) -> BwdFn:
    if backend == "reference":
        return sparse_encoder_bwd_ref
    if backend == "cpu":
        return _upcast_half(_backends.cpu_ext().sparse_encoder_bwd)
    if backend == "cuda":
        return _backends.cuda_ext().sparse_encoder_bwd
    if backend == "triton":
        from softsae.kernels.sparse_encoder import launch_sparse_encoder_bwd

        return launch_sparse_encoder_bwd
    raise ValueError(f"unknown backend {backend!r}")


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("softsae::sparse_encoder_bwd", mutates_args=())
def _bwd_op(
    dvals: Tensor, idx: Tensor, x: Tensor, W: Tensor, need_x: bool, need_W: bool, need_b: bool,
    deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dW, db = _kernel(backend)(dvals, idx, x, W, need_x, need_W, need_b, deterministic)
    # custom ops may not return views of inputs or empty aliases; make fresh tensors.
    return tuple(t.clone() if t.numel() == 0 else t for t in (dx, dW, db))


@_bwd_op.register_fake
def _(dvals, idx, x, W, need_x, need_W, need_b, deterministic, backend):
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    dW = torch.empty_like(W) if need_W else W.new_empty(0)
    db = W.new_empty(W.shape[0]) if need_b else W.new_empty(0)
    return dx, dW, db


# ----------------------------------------------------------------------------- public API


def _check(dvals: Tensor, idx: Tensor, x: Tensor, W_enc: Tensor, validate: bool | None) -> None:
    for name, t in (("dvals", dvals), ("idx", idx), ("x", x), ("W_enc", W_enc)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dvals.dim() != 2 or idx.shape != dvals.shape:
        raise ValueError(f"dvals and idx must both be (B, K) with the same shape, got "
                         f"dvals {tuple(dvals.shape)} and idx {tuple(idx.shape)}")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be (n, d), got shape {tuple(W_enc.shape)}")
    if x.dim() != 2 or x.shape != (dvals.shape[0], W_enc.shape[1]):
        raise ValueError(f"x must be (B, d) = ({dvals.shape[0]}, {W_enc.shape[1]}) to match dvals and W_enc, "
                         f"got {tuple(x.shape)}")
    if W_enc.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"W_enc must be a float tensor, got {W_enc.dtype}")
    for name, t in (("dvals", dvals), ("x", x)):
        if t.dtype != W_enc.dtype:
            raise TypeError(f"{name} ({t.dtype}) and W_enc ({W_enc.dtype}) must have the same dtype")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be int64 or int32, got {idx.dtype}")
    devices = {dvals.device, idx.device, x.device, W_enc.device}
    if len(devices) != 1:
        raise ValueError(f"dvals, idx, x and W_enc must be on one device, got {sorted(map(str, devices))}")
    if idx.numel() and _should_validate(validate, W_enc.device):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= W_enc.shape[0]:
            raise ValueError(f"idx must lie in [-1, {W_enc.shape[0]}) (-1 = padding); found values in [{lo}, {hi}]")


def sparse_encoder_bwd(
    dvals: Tensor, idx: Tensor, x: Tensor, W_enc: Tensor, need_x: bool = True, need_W: bool = True,
    need_b: bool = True, backend: str = "auto", deterministic: bool = True, validate: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``pre = x @ W_enc.T + b_enc`` for ``dpre`` given as pairs.

    dvals (B, K) float, idx (B, K) int (-1 = padding), x (B, d), W_enc (n, d), all one dtype.
    Returns (dx (B, d), dW_enc (n, d), db_enc (n,)) in W_enc's dtype (float16/bfloat16 accumulate
    in float32); a gradient not asked for (``need_*=False``) is an empty tensor.
    ``deterministic=True`` (default): bit-identical results run to run; False allows atomics on
    GPU backends. ``validate`` range-checks idx (a host sync on CUDA), as in sparse_decode.
    """
    _check(dvals, idx, x, W_enc, validate)
    name = _backends.resolve(backend, W_enc.device)
    return _bwd_op(dvals.contiguous(), idx.to(torch.int64).contiguous(), x.contiguous(), W_enc.contiguous(),
                   bool(need_x), bool(need_W), bool(need_b), bool(deterministic), name)


def compact_nonzero(grad: Tensor, pre: Tensor | None = None, backend: str = "auto",
                    max_width: int = -1) -> tuple[Tensor, Tensor, int]:
    """(vals, idx, K): padded (B, K) non-zeros of ``grad * (pre > 0)`` (of ``grad`` if pre is None),
    increasing index per row; K = the largest row count (a host read-back on CUDA). When
    ``max_width >= 0`` and K > max_width, vals and idx come back empty (0, 0) and K is only known
    to exceed max_width (the CPU kernel stops counting there: one pass, no second one)."""
    name = _backends.resolve(backend, grad.device)
    if name == "cpu" and grad.dtype in (torch.float32, torch.float64) and (pre is None or pre.dtype == grad.dtype):
        pre = None if pre is None else pre.contiguous()
        return _backends.cpu_ext().sparse_encoder_compact(grad.contiguous(), pre, int(max_width))
    return compact_nonzero_ref(grad, pre, int(max_width))


class _EncoderPre(torch.autograd.Function):
    """relu(x @ W.T + b) with a backward that goes sparse when the incoming gradient is."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None, backend: str, deterministic: bool,
                max_density: float) -> Tensor:
        pre = F.relu(F.linear(x, W, b))
        ctx.save_for_backward(x, W, pre)
        ctx.backend, ctx.deterministic, ctx.max_density = backend, deterministic, max_density
        ctx.has_b = b is not None
        ctx.b_dtype = b.dtype if b is not None else None
        return pre

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W, pre = ctx.saved_tensors
        need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_b and ctx.needs_input_grad[2]
        dx = dW = db = None
        if not (need_x or need_W or need_b):
            return None, None, None, None, None, None
        wd = W.dtype
        max_width = int(ctx.max_density * W.shape[0])
        vals, idx, width = compact_nonzero(grad.to(pre.dtype), pre, ctx.backend, max_width)
        if width <= max_width:
            gx, gW, gb = sparse_encoder_bwd(vals.to(wd), idx, x.to(wd), W, need_x, need_W, need_b,
                                            backend=ctx.backend, deterministic=ctx.deterministic, validate=False)
        else:  # dense: as autograd through F.relu(F.linear(x, W, b)) computes it
            g = torch.where(pre > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(wd)
            gx = g @ W if need_x else None
            gW = g.T @ x.to(wd) if need_W else None
            gb = g.sum(0) if need_b else None
        if need_x:
            dx = gx.to(x.dtype)
        if need_W:
            dW = gW
        if need_b:
            db = gb.to(ctx.b_dtype)
        return dx, dW, db, None, None, None


def encoder_pre(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None = None, backend: str = "auto", deterministic: bool = True,
    max_density: float | None = None,
) -> Tensor:
    """``relu(x @ W_enc.T + b_enc)`` (B, n) whose backward takes the sparse encoder path whenever
    ``dpre * (pre > 0)`` has at most ``max_density * n`` non-zeros in every row (else the dense
    GEMMs); None: the module's ``MAX_DENSITY``. x (B, d), W_enc (n, d), b_enc (n,) or None.
    Gradients equal autograd's through ``F.relu(F.linear(x, W_enc, b_enc))`` up to summation order."""
    if max_density is None:
        max_density = MAX_DENSITY
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (B, d) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(W_enc, Tensor) or W_enc.dim() != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"W_enc must be (n, d) with d = {x.shape[1]}, got {getattr(W_enc, 'shape', None)}")
    if b_enc is not None and (not isinstance(b_enc, Tensor) or b_enc.shape != (W_enc.shape[0],)):
        raise ValueError(f"b_enc must be None or ({W_enc.shape[0]},), got {getattr(b_enc, 'shape', None)}")
    if not (isinstance(max_density, (int, float)) and 0 <= max_density <= 1):
        raise ValueError(f"max_density must be a number in [0, 1], got {max_density!r}")
    name = _backends.resolve(backend, W_enc.device)
    return _EncoderPre.apply(x, W_enc, b_enc, name, bool(deterministic), float(max_density))
