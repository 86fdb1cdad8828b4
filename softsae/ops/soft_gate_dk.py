"""The k-derivative of the soft top-k gate, for a straight-through k head without dense GEMMs.

    t = soft_topk_threshold(x, k, alpha)                 # (R,) float64, no autograd
    vals, idx = soft_gate_dk(x, k, alpha)                # sparse: the non-negligible dz_i/dk
    c = soft_gate_dk(x, k, alpha, sparse=False)          # dense (R, n)

For the gate z = x * p(x, k) (docs/math.md section 1) with u_i = (x_i - t)/s and the Laplace
density f_i = e^{-|u_i|}/2, the implicit-function theorem gives dp_i/dk = f_i / sum_j f_j, so

    c_i = dz_i/dk = x_i f_i / sum_j f_j.

A straight-through SoftSAE step (st_mode "k", docs/math.md section 3) needs dL/dk =
sum_i (dL/dz_i) c_i = g . (sum_i c_i W_dec[i]) for the decoder gradient g = dL/dx_hat: one
sparse decode of c, not the dense (B, n) x (n, d) GEMM of dL/dz. ``sparse=True`` keeps the
entries with |u_i| - min_j |u_j| < ``cut`` (and x_i != 0, whose c_i is 0 anyway): a dropped
entry weighs at most e^{-cut} of the largest, so with the default cut of 32 the dropped mass is
below n * 1.3e-14 of the total (2e-10 at n = 16384). Every kept coefficient is formed in
float64 from the float64 threshold; sum_j f_j includes every entry (the zeros of x, all at
the same |u|, in closed form). The width is the largest kept count per row (a host read; this
is meant for CPU tensors, where that costs nothing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softsae import _backends
from softsae.ops import soft_topk as st
from softsae.ops import soft_topk_sparse as sts
from softsae.ops.soft_topk_ops import _fwd_op, _sparse_fwd_impl

DK_CUT = 32.0  # entries with |u| more than this above the row's smallest |u| are dropped


def _prepare(x: Tensor, k, alpha, backend: str) -> tuple[Tensor, Tensor, Tensor, str]:
    """Checked (R, n) rows, k (R,) float64 clamped, s (1,) float64, backend name."""
    _dim, alpha_t = st._check_inputs(x, k, alpha, -1, True)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, n), got shape {tuple(x.shape)}")
    return x.detach().contiguous(), st._rows_k(k, x).detach(), alpha_t, _backends.resolve(backend, x.device)


@torch.no_grad()
def soft_topk_threshold(x: Tensor, k, alpha, backend: str = "auto") -> Tensor:
    """Per-row threshold t (R,) float64 of the soft top-k of x (R, n): sum_i F((x_i - t)/s) = k.

    Every backend with a fused sparse gate (cpu, triton, cuda) finds it without writing the dense
    (R, n) weights: the sparse gate's forward with width 0; the reference backend runs its soft
    top-k forward and keeps its t. Not differentiable.
    """
    x2, k_rows, alpha_t, name = _prepare(x, k, alpha, backend)
    if x2.numel() == 0:
        return x2.new_empty(x2.shape[0], dtype=torch.float64)
    if sts.fused_backend(x2, name) is not None:
        return _sparse_fwd_impl(x2, k_rows, alpha_t, True, 0, name)[2]
    return _fwd_op(x2, k_rows, alpha_t, True, False, name)[1]


@torch.no_grad()
def soft_gate_dk(x: Tensor, k, alpha, backend: str = "auto", sparse: bool = True,
                 cut: float = DK_CUT) -> Tensor | tuple[Tensor, Tensor]:
    """dz/dk of z = x * soft_topk(x, k, alpha) per row, for x (R, n) float (rows on the last axis).

    Returns the dense (R, n) coefficients in x's dtype (``sparse=False``), or padded ``(vals, idx)``
    (R, M): vals float64, idx int64 (-1 = pad), the entries within ``cut`` of the row's peak
    density, in increasing index order. Not differentiable (a coefficient, not a function of k's
    graph): multiply it into the upstream gradient, as softsae.models.SoftSAE does.
    """
    if not (cut > 0):
        raise ValueError(f"cut must be > 0, got {cut}")
    x2, k_rows, alpha_t, name = _prepare(x, k, alpha, backend)
    R, n = x2.shape
    if x2.numel() == 0:
        return x2.new_zeros(R, n) if not sparse else (x2.new_zeros(R, 0, dtype=torch.float64),
                                                       torch.zeros(R, 0, dtype=torch.int64, device=x2.device))
    t = soft_topk_threshold(x2, k_rows, alpha_t, name)
    s = st.scale_of(alpha_t)  # (1,) float64
    if not sparse:
        u = (x2.double() - t[:, None]) / s
        au = u.abs()
        fr = torch.exp(-(au - au.amin(dim=-1, keepdim=True)))
        return (x2.double() * fr / fr.sum(dim=-1, keepdim=True)).to(x2.dtype)
    xw = x2 if x2.dtype in (torch.float32, torch.float64) else x2.float()
    vals, idx, f_sum = dk_terms(xw, t, s, None, cut)
    return vals / f_sum[:, None], idx


@torch.no_grad()
def dk_terms(x: Tensor, t: Tensor, s: Tensor, shift: Tensor | None, cut: float = DK_CUT
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised sparse terms of dz/dk for rows x (R, n) float32/64 with thresholds t (R,) and
    scale s (float64): with fr_i = e^{-(|u_i| - shift)}, returns padded ``(vals, idx)`` (R, M) of
    x_i fr_i (float64; idx -1 = pad) for the entries with |u_i| - shift < cut + 1 and x_i != 0, and
    ``f_sum`` (R,) = sum of fr over every entry of the row (the zeros of x in closed form; entries
    beyond the cut contribute below e^-cut each and are left out). ``shift`` (R,) float64 must be
    at most min_i |u_i| plus a little (every kept exp stays <= about 1): None for the row's own
    minimum, or the minimum over all shards of a sharded row, whose f_sum are then summed
    (softsae.distributed).
    dz_i/dk = vals_i / (total f_sum) (docs/math.md section 3). The width M is read back to the host.
    CPU tensors go to the CPU extension's one-pass kernel (csrc/cpu/soft_gate_dk.cpp) when it is
    built; the tensor formulation below is its reference and serves every other device.
    """
    ext = _backends.cpu_ext() if x.device.type == "cpu" else None
    if ext is not None:
        return ext.soft_gate_dk_terms(x.contiguous(), t.contiguous(), float(s), shift, cut)
    return dk_terms_reference(x, t, s, shift, cut)


@torch.no_grad()
def dk_terms_reference(x: Tensor, t: Tensor, s: Tensor, shift: Tensor | None, cut: float = DK_CUT
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``dk_terms`` in tensor ops (any device; the reference of the CPU kernel)."""
    R = x.shape[0]
    # Candidate mask in x's precision with one unit of margin; the kept values are then exact.
    dist = (x - t.to(x.dtype)[:, None]).abs_()
    if shift is None:
        shift = dist.amin(dim=-1).double() / s
    keep = dist < ((shift + cut + 1.0) * s).to(x.dtype)[:, None]
    keep &= x != 0
    rows, cols = keep.nonzero(as_tuple=True)
    xv = x[rows, cols].double()
    fr = torch.exp(-((xv - t[rows]).abs() / s - shift[rows]))
    f_sum = torch.zeros(R, dtype=torch.float64, device=x.device).index_add_(0, rows, fr)
    # The zeros of x share u = -t/s: their density, counted only in rows where it is within the cut
    # (elsewhere it is below e^-cut of the row's peak, as every dropped entry).
    zero_f = torch.exp(-(t.abs() / s - shift))
    near = zero_f > math.exp(-(cut + 1.0))
    if bool(near.any()):
        n_zero = torch.zeros(R, dtype=torch.float64, device=x.device)
        n_zero[near] = (x[near] == 0).sum(dim=-1, dtype=torch.float64)
        f_sum += n_zero * zero_f
    counts = torch.bincount(rows, minlength=R)
    width = int(counts.max()) if R else 0
    pos = torch.arange(rows.numel(), device=x.device) - (counts.cumsum(0) - counts)[rows]
    vals = torch.zeros(R, width, dtype=torch.float64, device=x.device)
    idx = torch.full((R, width), -1, dtype=torch.int64, device=x.device)
    vals[rows, pos] = xv * fr
    idx[rows, pos] = cols
    return vals, idx, f_sum
