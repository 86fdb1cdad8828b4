"""Fused sparse soft top-k gate: ``(vals, idx)``, the non-zeros of ``x * soft_topk(x, k, alpha)``.

    vals, idx = soft_topk_gate(x, k, alpha, sparse=True)      # CPU tensors take this path

The custom op ``softsae::soft_topk_gate_sparse_fwd`` (soft_topk_ops.py) returns the padded pairs (R, K) and the
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

from torch import Tensor

from softsae import _backends
from softsae.ops.soft_topk_ops import _sparse_fwd_op


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
    vals, idx, _t = _sparse_fwd_op(x2, k_rows, alpha_t, largest, -1 if max_count is None else max_count, backend)
    return vals, idx
