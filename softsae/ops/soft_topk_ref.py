"""Reference Soft Top-K (LapSum): pure PyTorch, float64, exact. The oracle for every backend.

Conventions (see docs/design.md): ``x`` is a contiguous ``(R, n)`` tensor, ``k`` a float64
``(R,)`` tensor already clamped into ``(0, n)``, ``s = |alpha| > 0`` a Python float or a
1-element float64 tensor on x's device (used as a tensor: nothing is read back to the host).
With ``y = x`` (largest) or ``-x``, ``u = (y - t) / s`` and the Laplace CDF ``F``:

    p = F(u),  sum(p) = k  per row.

The threshold ``t`` is found by the closed form on the sorted row: for ``t`` between the
m-th and (m+1)-th largest value, ``sum F = m - A w / 2 + B / (2 w)`` with ``w = e^{t/s}``,
``A = sum_{i<=m} e^{-y_i/s}`` and ``B = sum_{i>m} e^{y_i/s}``, a quadratic in ``w``. All of it
is done in log space (``logcumsumexp``), so nothing overflows for any ``s``. O(n log n): fine
for an oracle, which is all this is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def laplace_cdf(u: Tensor) -> Tensor:
    """F(u) = e^u / 2 for u < 0, 1 - e^-u / 2 otherwise (elementwise, no overflow)."""
    e = 0.5 * torch.exp(-u.abs())
    return torch.where(u < 0, e, 1.0 - e)


Scale = float | Tensor


def _scale(s: Scale) -> Scale:
    """s as a 0-d tensor (if it is a tensor) so that it broadcasts against (R,) and (R, n)."""
    return s.reshape(()) if isinstance(s, Tensor) else s


def _solve_threshold(y: Tensor, k: Tensor, s: Scale) -> Tensor:
    """Per-row t with sum_i F((y_i - t)/s) = k. y (R, n) float64 finite, k (R,) -> t (R,)."""
    n = y.shape[-1]
    s = _scale(s)
    ys = torch.sort(y, dim=-1, descending=True).values / s  # y_(1) >= ... >= y_(n), in units of s
    neg_inf = torch.full_like(ys[:, :1], -math.inf)
    # log A_m = log sum_{i<=m} e^{-ys_i}, m = 0..n;  log B_m = log sum_{i>m} e^{ys_i}, m = 0..n
    log_a = torch.cat([neg_inf, torch.logcumsumexp(-ys, dim=-1)], dim=-1)
    log_b = torch.cat([torch.logcumsumexp(ys.flip(-1), dim=-1).flip(-1), neg_inf], dim=-1)
    # g at t = y_(j), j = 1..n: j - e^{ys_j + log A_j}/2 + e^{log B_j - ys_j}/2 (both terms bounded).
    j = torch.arange(1, n + 1, dtype=y.dtype, device=y.device)
    g = j - 0.5 * torch.exp(ys + log_a[:, 1:]) + 0.5 * torch.exp(log_b[:, 1:] - ys)
    # g is increasing in j; t lies in segment m = #{j : g(y_(j)) <= k}.
    m = (g <= k[:, None]).sum(dim=-1, keepdim=True)
    la, lb = log_a.gather(1, m).squeeze(1), log_b.gather(1, m).squeeze(1)
    c = k - m.squeeze(1).to(y.dtype)
    # Root of A w^2 / 2 + c w - B / 2 = 0 in log space: q = log(|c| + sqrt(c^2 + A B)).
    log_abs_c = torch.log(c.abs())
    l2 = torch.logaddexp(2.0 * log_abs_c, la + lb)
    q = 0.5 * l2 + torch.log1p(torch.exp(log_abs_c - 0.5 * l2))
    t_over_s = torch.where(c >= 0, lb - q, q - la)
    return t_over_s * s


def soft_topk_fwd_ref(x: Tensor, k: Tensor, s: Scale, largest: bool, gate: bool) -> tuple[Tensor, Tensor]:
    """x (R, n) any float dtype, k (R,) float64 in (0, n), s > 0.

    Returns ``out`` (R, n) in x.dtype (p, or x * p when ``gate``) and ``t`` (R,) float64.
    Rows holding a NaN or an infinity give NaN output and NaN t.
    """
    s = _scale(s)
    y = x.to(torch.float64)
    y = y if largest else -y
    finite = torch.isfinite(y).all(dim=-1)
    t = _solve_threshold(torch.where(finite[:, None], y, 0.0), k.to(torch.float64), s)
    t = torch.where(finite, t, math.nan)
    p = laplace_cdf((y - t[:, None]) / s)
    out = x.to(torch.float64) * p if gate else p
    return out.to(x.dtype), t


def soft_topk_bwd_ref(
    grad: Tensor, x: Tensor, t: Tensor, s: Scale, largest: bool, gate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Implicit-function-theorem gradients. grad, x (R, n); t (R,) float64.

    Returns ``dx`` (R, n) in x.dtype, ``dk`` (R,) float64 and ``ds`` (R,) float64 (per row).
    The ratios A/S and C/S are formed with f rescaled by e^{min|u|}, so they stay exact when
    every f underflows (t in a wide gap between values).
    """
    s = _scale(s)
    sign = 1.0 if largest else -1.0
    x64, go = x.to(torch.float64), grad.to(torch.float64)
    u = (sign * x64 - t[:, None]) / s
    au = u.abs()
    f = 0.5 * torch.exp(-au)
    g = go * x64 if gate else go
    fr = torch.exp(-(au - au.amin(dim=-1, keepdim=True)))  # f up to a per-row factor
    sr = fr.sum(dim=-1)
    a_over_s = (fr * g).sum(dim=-1) / sr
    c_over_s = (fr * u).sum(dim=-1) / sr
    dx = sign * (f / s) * (g - a_over_s[:, None])
    if gate:
        dx = dx + go * laplace_cdf(u)
    ds = (g * (f / s) * (c_over_s[:, None] - u)).sum(dim=-1)
    return dx.to(x.dtype), a_over_s, ds
