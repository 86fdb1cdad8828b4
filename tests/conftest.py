"""Shared test helpers: which backends to test on CPU tensors, tolerances, an independent oracle."""

from __future__ import annotations

import pytest
import torch

import softsae


def cpu_backends(include_triton: bool = False) -> list[str]:
    """Backends that run on CPU tensors here (Triton only under TRITON_INTERPRET=1)."""
    names = softsae.available_backends("cpu")
    return [b for b in names if include_triton or b != "triton"]


def laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0, 0.5 * torch.exp(u), 1 - 0.5 * torch.exp(-u))


def bisection_oracle(y: torch.Tensor, k: torch.Tensor, s: float, iters: int = 200) -> torch.Tensor:
    """float64 soft top-k weights by plain bisection on t: slow, simple, independent of softsae."""
    y = y.double()
    k = k.double()
    lo = y.min(-1).values - 50 * s - 1.0
    hi = y.max(-1).values + 50 * s + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        g = laplace_cdf((y - mid[:, None]) / s).sum(-1)
        lo, hi = torch.where(g > k, mid, lo), torch.where(g > k, hi, mid)
    return laplace_cdf((y - (0.5 * (lo + hi))[:, None]) / s)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
