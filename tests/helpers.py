"""Shared test helpers: backends to test, input and budget makers, alphas, one tolerance table.

Tolerances mirror docs/design.md ("Accuracy targets"):

- soft top-k weights: float32 within ``TOL[float32].p`` = 1e-4 (absolute) of the float64 solution on
  the same inputs, sums within 1e-4 max(1, k); float64 within 1e-9;
- half precision (float16 / bfloat16, computed in float32) is judged the flash-attention way: its
  error against the float64 truth on the same (rounded) inputs is at most ``HALF_ERR_RATIO`` times
  the error of the truth rounded once to that dtype (plus a small absolute slack);
- sums accumulated in another order than the reference (GPU sparse decode): ``SUM_ORDER_ERR_RATIO``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

import softsae

# Soft top-k scales every backend is tested at (the interpreter-run Triton tests take the subset
# >= 1e-4: at 1e-5 the interpreter takes minutes per case and the compiled paths are the same).
ALPHAS = (1e-5, 1e-4, 1e-2, 1.0, 10.0)
INTERPRETER_ALPHAS = tuple(a for a in ALPHAS if a >= 1e-4)
HALF = (torch.float16, torch.bfloat16)
HALF_ERR_RATIO = 2.0
# Sums of many products accumulated in another order than the reference's (GPU sparse decode):
# error against the float64 truth at most this times the reference's own, in the same dtype.
SUM_ORDER_ERR_RATIO = 3.0


@dataclass(frozen=True)
class Tol:
    """p: |p - p64| bound; sum_rel: |sum p - k| <= sum_rel * max(1, k)."""

    p: float
    sum_rel: float


TOL = {torch.float32: Tol(p=1e-4, sum_rel=1e-4), torch.float64: Tol(p=1e-9, sum_rel=1e-9)}


def cpu_backends(include_triton: bool = False) -> list[str]:
    """Backends that run on CPU tensors here (Triton only under TRITON_INTERPRET=1, and only if asked)."""
    return [b for b in softsae.available_backends("cpu") if include_triton or b != "triton"]


def make_rows(rows: int, n: int, kind: str = "randn", dtype: torch.dtype = torch.float64,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Test rows (rows, n): randn * 3 clamped to [-10, 10]; ``ties`` rounds (many exact ties),
    ``relu`` keeps the positive part of randn * 3 - 2 (a big group at 0). Row 0 is all zeros when
    rows > 1, as post-ReLU SAE rows often are."""
    if kind not in ("randn", "ties", "relu"):
        raise ValueError(f"kind must be randn, ties or relu, got {kind!r}")
    x = torch.randn(rows, n, dtype=torch.float64) * 3
    if kind == "ties" and n > 1:
        x = torch.round(x)
    elif kind == "relu":
        x = (x - 2).clamp(min=0)
    if rows > 1:
        x[0] = 0.0
    return x.clamp(-10, 10).to(device=device, dtype=dtype)


def rand_k(rows: int, n: int, integer_half: bool = False, device: str | torch.device = "cpu") -> torch.Tensor:
    """Budgets (rows,) float64 in [0.01, n - 0.01] (0.5 when n == 1). ``integer_half``: the first
    half of the rows get integer budgets, which put t in gaps between values."""
    if n == 1:
        return torch.full((rows,), 0.5, dtype=torch.float64, device=device)
    k = torch.rand(rows, dtype=torch.float64) * n
    if integer_half:
        k[: rows // 2] = k[: rows // 2].floor().clamp(min=1)
    return k.clamp(0.01, n - 0.01).to(device)


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


def make_sae(arch: str, d: int, n: int, k: int, seed: int = 0, scale: float = 2.5,
             alpha: float | None = None) -> softsae.models.SparseAutoencoder:
    """A softsae model of ``arch`` ("topk", "batchtopk", "softsae"; d inputs, n latents, budget k)
    with random, non-trivial weights, in eval mode: every parameter perturbed by 0.3 N(0, 1), decoder
    rows renormalised, input normalisation shift ~ N(0, 1) and scale ``scale`` (so a wrong fold of
    the normalisation shows in the reconstructions), BatchTopK threshold 0.25. SoftSAE gets
    k_max = 3k and ``alpha`` when given. Seeds torch's global generator with ``seed``."""
    torch.manual_seed(seed)
    soft_kw = {} if alpha is None else {"alpha": alpha}
    model = {"topk": lambda: softsae.TopKSAE(d, n, k), "batchtopk": lambda: softsae.BatchTopKSAE(d, n, k),
             "softsae": lambda: softsae.SoftSAE(d, n, float(k), k_max=3.0 * k, **soft_kw)}[arch]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.normalize_decoder()
        model.set_normalization(torch.randn(d), scale)
        if arch == "batchtopk":
            model.threshold.fill_(0.25)
    return model.eval()


def sae_inputs(d: int, rows: int, seed: int = 1) -> torch.Tensor:
    """(rows, d) float32 activations 3 N(0, 1) + 0.5 (off-centre, not unit scale), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(rows, d, generator=g) + 0.5


# ------------------------------------------------------------------ CPU instruction sets
# softsae._C holds the soft top-k hot loops once per instruction set and picks one at run time
# (csrc/cpu/soft_topk_isa.h); the CPU kernel tests run every one this machine has.
CPU_ISAS = ("portable", "avx2", "avx512")


def _cpu_ext():
    try:
        return importlib.import_module("softsae._C")
    except ImportError:
        return None


def cpu_isa_params() -> list:
    """pytest params, one per instruction set; those this binary or CPU lacks are skipped with why."""
    ext = _cpu_ext()
    have = set(ext.cpu_isa_available()) if ext is not None and hasattr(ext, "cpu_isa_available") else set()
    params = []
    for name in CPU_ISAS:
        why = None
        if ext is None:
            why = "softsae._C is not built"
        elif name not in have:
            why = f"{name} is not compiled into softsae._C or this CPU lacks it (available: {sorted(have)})"
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


@contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run softsae._C's soft top-k on instruction set ``name`` inside the block (restored after)."""
    ext = _cpu_ext()
    if ext is None:
        raise RuntimeError("softsae._C is not built")
    previous = ext.set_cpu_isa(name)
    try:
        yield
    finally:
        ext.set_cpu_isa(previous)


def dense_straight_through_k(z_hard: torch.Tensor, pre: torch.Tensor, k_hat: torch.Tensor, soft) -> torch.Tensor:
    """The st_mode "k" codes written densely (docs/math.md section 3), the oracle of SoftSAE.k_direction:
    the hard codes in value, pre's gradient the hard codes' own, k_hat's the soft gate ``soft(sg(pre), k_hat)``."""
    z_soft = soft(pre.detach(), k_hat)
    return z_hard + (z_soft - z_soft.detach())
