"""Fused sparse soft top-k gate: ``(vals, idx)``, the non-zeros of ``x * soft_topk(x, k, alpha)``.

    vals, idx = soft_topk_gate(x, k, alpha, sparse=True)      # CPU tensors take this path

The custom op ``softsae::soft_topk_gate_sparse_fwd`` returns the padded pairs (R, K) and the
thresholds t (R,) without a dense (R, n) output: the CPU backend gates each row into a per-thread
scratch row (the same numbers as the dense gate, docs/math.md section 1) and keeps its non-zeros;
the Triton backend runs its forward kernel for t only, then one program per row writes the
non-zeros with block prefix sums (kernels/soft_topk.py, ``launch_soft_topk_gate_sparse``); the
CUDA backend does the same with its forward kernel (no pass D) and a block-scan kernel
(csrc/cuda/soft_topk.cu, ``soft_topk_gate_sparse_kernel``); the reference backend runs the
dense reference gate and compacts. K is the largest row count, or
``min(max_count, n)`` (rows with more non-zeros keep their lowest indices, as ``nonzero_per_row``).

Backward: the gradient of the pairs is scattered into a dense (R, n) gradient (zero off the
pairs, as autograd through the dense gate + gather gives) and handed to the soft top-k backward
op (``softsae::soft_topk_bwd``, gate=True), so gradients to x, k and alpha equal the dense path's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softsae import _backends
from softsae.ops import soft_topk as st
from softsae.ops.soft_topk_ref import soft_topk_fwd_ref


def _fwd_impl(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, max_count: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    s = st.scale_of(alpha)
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
    vals, idx = st.nonzero_per_row(out, None if max_count < 0 else max_count)
    return vals, idx, t


@torch.library.custom_op("softsae::soft_topk_gate_sparse_fwd", mutates_args=())
def _fwd_op(x: Tensor, k: Tensor, alpha: Tensor, largest: bool, max_count: int,
            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    vals, idx, t = _fwd_impl(x, k, alpha, largest, max_count, backend)
    return vals, idx, t


@_fwd_op.register_fake
def _(x, k, alpha, largest, max_count, backend):
    width = min(max_count, x.shape[1]) if max_count >= 0 else torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape[0], width), x.new_empty(x.shape[0], width, dtype=torch.int64),
            x.new_empty(x.shape[0], dtype=torch.float64))


def _setup_context(ctx, inputs, output):
    x, _k, alpha, largest, _max_count, backend = inputs
    _vals, idx, t = output
    ctx.save_for_backward(x, idx, t, alpha)
    ctx.largest, ctx.backend = largest, backend


def _backward(ctx, dvals, _didx, _dt):
    x, idx, t, alpha = ctx.saved_tensors
    grad = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=x.dtype, device=x.device)
    grad.scatter_(1, torch.where(idx >= 0, idx, x.shape[1]), dvals.to(x.dtype))  # pad -> column n
    dx, dk, ds = st._bwd_op(grad[:, : x.shape[1]].contiguous(), x, t, alpha, ctx.largest, True, ctx.backend)
    dalpha = (torch.sign(alpha) * ds.sum()) if ctx.needs_input_grad[2] else None
    return dx, dk if ctx.needs_input_grad[1] else None, dalpha, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_backend(x: Tensor, backend: str) -> str | None:
    """The backend name when the fused sparse path serves ``x``: the cpu or reference backend on
    CPU tensors, the triton or cuda backend (CUDA tensors; triton also on CPU ones under
    TRITON_INTERPRET=1); else None (the caller gates densely, then compacts)."""
    name = _backends.resolve(backend, x.device)
    if name in ("triton", "cuda"):
        return name
    return name if x.device.type == "cpu" and name in ("cpu", "reference") else None


def soft_topk_gate_sparse(x2: Tensor, k_rows: Tensor, alpha_t: Tensor, largest: bool, max_count: int | None,
                          backend: str) -> tuple[Tensor, Tensor]:
    """(vals, idx) (R, K) for the checked (R, n) rows x2, k_rows (R,) float64 clamped, alpha_t 0-d
    float64 (soft_topk.py prepares them); backend: a name ``fused_backend`` returned."""
    if max_count is not None and (not isinstance(max_count, int) or isinstance(max_count, bool) or max_count < 0):
        raise ValueError(f"max_count must be an int >= 0 or None, got {max_count!r}")
    vals, idx, _t = _fwd_op(x2, k_rows, alpha_t, largest, -1 if max_count is None else max_count, backend)
    return vals, idx
