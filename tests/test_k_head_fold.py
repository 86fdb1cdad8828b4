"""SoftSAE's k head folds the b_dec shift into its first bias (softsae/models.py, SoftSAE.k_hat_norm):
same budgets and the same gradients as the head applied to ``x_n - b_dec`` (docs/math.md, section 3)."""

from __future__ import annotations

import torch

from softsae.models import SoftSAE

D, N = 10, 24


def _model() -> SoftSAE:
    torch.manual_seed(0)
    m = SoftSAE(D, N, 4.0, backend="reference").double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _unfolded(m: SoftSAE, x_n: torch.Tensor) -> torch.Tensor:
    logit = m.k_estimator(x_n - m.b_dec).squeeze(-1)
    if logit.dtype not in (torch.float32, torch.float64):
        logit = logit.float()  # as k_hat_norm: at least float32 from the logit on
    return (m.k_max * torch.sigmoid(logit)).clamp(1.0, float(m.n))


def test_folded_head_matches_the_shifted_head_in_value_and_gradient():
    m = _model()
    x_n = torch.randn(16, D, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(16, dtype=torch.float64)
    params = [m.b_dec, *m.k_estimator.parameters()]
    got = m.k_hat_norm(x_n)
    g_got = torch.autograd.grad((got * w).sum(), params)
    want = _unfolded(m, x_n)
    g_want = torch.autograd.grad((want * w).sum(), params)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):  # the unfolded head's float64 gradients are the oracle
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64 throughout: rounding only
    assert g_got[0].abs().max() > 0  # b_dec really gets the head's gradient


def test_autocast_keeps_the_shift_before_the_gemm():
    m = SoftSAE(D, N, 4.0, backend="reference")
    with torch.no_grad():
        m.b_dec.fill_(100.0)  # a large shift: folded in bf16 it would cancel badly
        m.k_estimator[2].weight.normal_(0, 0.3)
    x_n = 100.0 + 0.1 * torch.randn(8, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.k_hat_norm(x_n)
        want = _unfolded(m, x_n)
    torch.testing.assert_close(got, want)
