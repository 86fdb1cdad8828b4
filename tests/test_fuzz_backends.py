"""Seeded randomised differential tests: every backend that runs on CPU tensors against
``backend="reference"`` (soft_topk / soft_topk_gate forward + backward, sparse_decode forward +
backward). No hypothesis: each case is drawn from ``torch.Generator().manual_seed(seed)``, so a
failure names its seed and ``pytest tests/test_fuzz_backends.py -k "seed-123"`` replays it.

Soft top-k cases draw: dtype float32/float64, n log-uniform in [1, 3000] (plus a few rows of
4096-6000, where the CPU kernel samples the row before compacting candidates), B in [1, 40],
k per row or scalar (uniform in (0, n), integer, within 1e-3 of 0 or of n, small integer), s
log-uniform in [1e-5, 20] (alpha sometimes negative), largest True/False, and one input
distribution: randn, post-ReLU (many exact zeros), heavy ties (rounded), clusters about s wide,
huge magnitude (|x| ~ 1e4 with s <= 1e-2), constant rows, or a NaN/inf in one row.
Triton runs only under TRITON_INTERPRET=1, on tiny shapes (the interpreter is slow). The
float64 reference and the tolerance arithmetic run on one thread (much faster on a small shared
machine); the backend under test keeps the default thread count.

Tolerances (docs/design.md, "Accuracy targets"):

- p: float32 within 1e-4 of the float64 solution on the same (float32) inputs, float64 within
  1e-9, plus a resolution term for large |x| / s. t is a float64 number of size up to
  max|x| + 40 s, so even the exact threshold rounded to float64 moves u = (y - t) / s by up to
  eps64 |t| / (2 s); in float32 the kernels evaluate u = ((y - piv) - off) / s with piv = fp32(t)
  and off = fp32(t - piv) (|t - piv| <= eps32 |t| / 2), and rounding off to float32 moves u by up
  to eps32^2 |t| / (4 s). With |dp/du| <= 1/2, |dp| <= (eps64 + eps32^2) |t| / (4 s); the test
  adds 4x that. At |x| <= 10, s >= 1e-4 the term is < 2e-9 (float32) / 3e-11 (float64), so the
  design numbers stand; at |x| ~ 3e4, s = 1e-5 it is ~4e-5 (float32) / ~7e-7 (float64), and the
  float64 reference itself (logcumsumexp of y / s ~ 3e9) is no more accurate than that.
  The float32 input resolution as such (ulp32(1e4) ~ 1e-3, 100 s at s = 1e-5) does not enter:
  both sides see the same float32 values; it only makes such rows essentially hard (p ~ 0 or 1).
- gate output x p: the p tolerance times |x|, plus rounding of the product.
- sum p = k to 1e-4 max(1, k) (float32) / 1e-9 max(1, k) (float64), plus n times the
  resolution term.
- Gradients, compared with the float64 reference gradients on the same inputs, element by
  element relative to the magnitude of the terms they are made of (with f = 0.5 e^-|u|,
  g = grad or grad * x, A/S the f-weighted mean of g, C/S that of u):
      dx_j:   (f_j / s) (|g_j| + mean_f |g|) + |grad_j| p_j [gate]
      dk:     mean_f |g|
      dalpha: sum over rows of sum_j |g_j| (f_j / s) (|C/S| + |u_j|)
  times rtol + the resolution term (rtol: float32 1e-4, float64 1e-8; t is solved to ~1e-6 s
  resp. ~1e-12 s and a float32 u carries ~eps32 |u|; an error du in u is a relative error du in
  f), plus what flushing f, p < 4 tiny to 0 can change (in A/S: 4 tiny sum|g| / S, with S
  floored at the level below which the CPU kernel rescales), plus rounding of the output.
- sparse_decode: every output is a sum of products; the standard bound
  |fl(sum) - sum| <= gamma_m sum |terms| (gamma_m ~ m eps) is used with m the number of terms.

Known and marked xfail: the Triton float32 path in a gap of ~1e7 s (see
test_regression_wide_gap_integer_k_dk).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from helpers import TOL

import softsae
from softsae.ops.soft_topk import K_EPS
from softsae.ops.soft_topk_ref import soft_topk_bwd_ref, soft_topk_fwd_ref
from softsae.ops.sparse_decode_ref import densify

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AVAILABLE = softsae.available_backends("cpu")
# Compiled / non-reference backends on CPU tensors, exercised on the full random shapes.
BACKENDS = [b for b in _AVAILABLE if b not in ("reference", "triton")]
TRITON = "triton" in _AVAILABLE and _INTERPRET

F32, F64 = torch.float32, torch.float64
EPS = {F32: torch.finfo(F32).eps, F64: torch.finfo(F64).eps}
TINY = {F32: torch.finfo(F32).tiny, F64: torch.finfo(F64).tiny}
# Kernels may flush f = 0.5 e^-|u| (and p) to 0 below about the smallest normal number (the CPU
# kernel at |u| >= 86.5 / 707, i.e. f < 1.2 / 2.2 tiny; GPUs flush subnormals): 4 tiny bounds it.
FLUSH = {F32: 4 * TINY[F32], F64: 4 * TINY[F64]}
# The CPU kernel forms A/S, C/S from rescaled f (exact ratios) once S = sum f drops below this.
S_RESCALED = {F32: 1e-25, F64: 1e-290}
P_TOL = {dtype: tol.p for dtype, tol in TOL.items()}  # design.md's accuracy targets
G_RTOL = {F32: 1e-4, F64: 1e-8}

N_SOFT_CASES = 400
N_DECODE_CASES = 120
N_TRITON_CASES = 32

DISTS = ("randn", "relu", "ties", "clustered", "huge", "constant", "nonfinite")
K_MODES = ("uniform", "integer", "near0", "nearn", "small_int")
_EDGE_N = (1, 2, 3, 15, 16, 17, 31, 32, 33, 1023, 1024, 1025, 1040, 2047, 2048, 2049)


class _Draw:
    """Scalar draws from a seeded torch.Generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def u(self) -> float:
        return float(torch.rand((), generator=self.g, dtype=F64))

    def int(self, lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=self.g))

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def loguniform(self, lo: float, hi: float) -> float:
        return math.exp(math.log(lo) + self.u() * (math.log(hi) - math.log(lo)))

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=F64)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, dtype=F64)


# ----------------------------------------------------------------------------- soft top-k cases


def draw_k(d: _Draw, mode: str, n: int, rows: int) -> torch.Tensor:
    if mode == "uniform":
        k = d.rand(rows) * n
    elif mode == "integer" and n >= 2:
        k = torch.randint(1, n, (rows,), generator=d.g).to(F64)
    elif mode == "small_int" and n >= 2:
        k = torch.randint(1, min(n - 1, 64) + 1, (rows,), generator=d.g).to(F64)
    elif mode == "near0":
        k = d.rand(rows) * 1e-3  # below K_EPS too: the clamp is then active
    elif mode == "nearn":
        k = n - d.rand(rows) * 1e-3
    else:
        k = d.rand(rows) * n
    return k


def draw_x(d: _Draw, dist: str, rows: int, n: int, s: float) -> torch.Tensor:
    if dist == "randn":
        x = (d.randn(rows, n) * d.loguniform(0.01, 3.0)).clamp(-10, 10)
    elif dist == "relu":
        x = (d.randn(rows, n) * 2 - 2 * d.u()).clamp(min=0)  # 50-85% exact zeros
    elif dist == "ties":
        q = d.choice((1.0, 2.0, 4.0))
        x = torch.round(d.randn(rows, n) * 2 * q) / q
    elif dist == "clustered":
        centers = d.randn(d.int(1, 5)) * 3
        pick = torch.randint(0, centers.numel(), (rows, n), generator=d.g)
        x = centers[pick] + d.randn(rows, n) * s * d.loguniform(1e-3, 10.0)
    elif dist == "huge":
        x = d.randn(rows, n) * 1e4
    elif dist == "constant":
        x = (d.randn(rows, 1) * 3).expand(rows, n).clone()
        x[d.rand(rows) < 0.3] = 0.0
    elif dist == "nonfinite":
        x = d.randn(rows, n) * 3
        r, j = d.int(0, rows - 1), d.int(0, n - 1)
        x[r, j] = d.choice((math.nan, math.inf, -math.inf))
    else:
        raise AssertionError(dist)
    if dist not in ("constant", "nonfinite") and rows > 1 and d.u() < 0.2:
        x[d.int(0, rows - 1)] = 0.0  # an all-zero row, as post-ReLU SAE rows often are
    return x


def draw_soft_case(seed: int, max_n: int = 3000, max_rows: int = 40) -> dict:
    d = _Draw(seed)
    dtype = d.choice((F32, F64))
    dist = d.choice(DISTS)
    r = d.u()
    if r < 0.2:
        n = min(d.choice(_EDGE_N), max_n)
    elif r < 0.25 and max_n >= 3000:
        n = d.int(4096, 6000)  # the sampled-threshold path of the CPU kernel
    else:
        n = min(max_n, int(d.loguniform(1.0, max_n + 1.0)))
    rows = d.int(1, 4 if n > 3000 else max_rows)
    s = d.loguniform(1e-5, 1e-2) if dist == "huge" else d.loguniform(1e-5, 20.0)
    alpha = -s if d.u() < 0.25 else s
    if d.u() < 0.7:  # one draw mode per row
        modes = [d.choice(K_MODES) for _ in range(rows)]
        k = torch.cat([draw_k(d, m, n, 1) for m in modes])
    else:
        k = float(draw_k(d, d.choice(K_MODES), n, 1))
    return {
        "dtype": dtype, "dist": dist, "n": n, "rows": rows, "alpha": alpha, "k": k,
        "x": draw_x(d, dist, rows, n, s).to(dtype), "largest": d.u() < 0.6,
        "gate": d.u() < 0.5, "w": d.randn(rows, n).to(dtype),
    }


def _k_rows(k, rows: int, n: int) -> torch.Tensor:
    """k as the backends see it: (rows,) float64 clamped into [K_EPS, n - K_EPS]."""
    kk = k.to(F64) if isinstance(k, torch.Tensor) else torch.full((rows,), float(k), dtype=F64)
    return kk.clamp(K_EPS, (1.0 if n == 1 else n) - K_EPS)


@contextlib.contextmanager
def _threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_the_checks():
    """The reference and the tolerance arithmetic run on one thread: on a small shared machine,
    two-thread OpenMP regions on these small tensors cost ~6x the wall time of one thread. The
    backends under test keep the default thread count (_run), so the row split is exercised."""
    with _threads(1):
        yield


_THREADS = torch.get_num_threads()


def _run(case: dict, backend: str):
    """Forward + backward through the public API: (out, dx, dk or None, dalpha)."""
    x = case["x"].clone().requires_grad_(True)
    k = case["k"].clone().requires_grad_(True) if isinstance(case["k"], torch.Tensor) else case["k"]
    alpha = torch.tensor(case["alpha"], dtype=F64, requires_grad=True)
    fn = softsae.soft_topk_gate if case["gate"] else softsae.soft_topk
    with _threads(_THREADS):
        out = fn(x, k, alpha, largest=case["largest"], backend=backend)
        inputs = [x, alpha] + ([k] if isinstance(k, torch.Tensor) else [])
        grads = torch.autograd.grad(out, inputs, grad_outputs=case["w"])
    dk = grads[2] if len(grads) == 3 else None
    return out.detach(), grads[0], dk, grads[1]


def _truth(case: dict):
    """float64 reference on the case's own inputs, plus the term magnitudes for tolerances.

    Calls the reference kernels directly (what backend="reference" runs, once instead of twice:
    the reference dominates the runtime) and applies the public API's few steps itself: k clamped
    into [K_EPS, n - K_EPS] with zero gradient where the clamp is active, dalpha = sign(alpha) *
    sum of the per-row ds.
    """
    x64 = case["x"].to(F64)
    rows, n = x64.shape
    s = abs(case["alpha"])
    largest, gate = case["largest"], case["gate"]
    kr = _k_rows(case["k"], rows, n)
    w = case["w"].to(F64)
    out, t = soft_topk_fwd_ref(x64, kr, s, largest, gate)
    dx, dk_rows, ds_rows = soft_topk_bwd_ref(w, x64, t, s, largest, gate)
    dk = None
    if isinstance(case["k"], torch.Tensor):
        kk = case["k"].to(F64)
        dk = torch.where((kk >= K_EPS) & (kk <= (1.0 if n == 1 else n) - K_EPS), dk_rows, 0.0)
    dalpha = math.copysign(1.0, case["alpha"]) * ds_rows.sum()
    sign = 1.0 if largest else -1.0
    u = (sign * x64 - t[:, None]) / s
    au = u.abs()
    f = 0.5 * torch.exp(-au)
    p = torch.where(u < 0, f, 1 - f)
    g = w * x64 if gate else w
    fr = torch.exp(-(au - au.amin(dim=-1, keepdim=True)))  # f up to a per-row factor
    mean_abs_g = (fr * g.abs()).sum(-1) / fr.sum(-1)
    c_over_s = (fr * u).sum(-1) / fr.sum(-1)
    dx_scale = (f / s) * (g.abs() + mean_abs_g[:, None]) + (w.abs() * p if gate else 0.0)
    ds_terms = g.abs() * (f / s) * (c_over_s.abs()[:, None] + au)
    ds_scale = ds_terms.sum(-1)
    # Flushing f < FLUSH drops terms of A = sum f g: |d(A/S)| <= FLUSH sum|g| / S while S is
    # above the rescaling threshold (below it the ratios come from rescaled f, no flush).
    S = f.sum(-1)
    dtype = case["dtype"]
    dk_flush = FLUSH[dtype] * g.abs().sum(-1) / S.clamp(min=S_RESCALED[dtype])
    ds_flush = (FLUSH[dtype] / s) * torch.where(f > 0, g.abs() * (c_over_s.abs()[:, None] + au), 0.0).sum(-1)
    finite = torch.isfinite(x64).all(-1)
    t_abs = x64.abs().where(torch.isfinite(x64), 0.0).amax(-1) + 40 * s
    return {"out": out, "dx": dx, "dk": dk, "dalpha": dalpha, "k": kr, "finite": finite, "x": x64, "w": w,
            "f": f, "t_abs": t_abs, "dx_scale": dx_scale, "dk_scale": mean_abs_g, "ds_scale": ds_scale,
            "dk_flush": dk_flush, "ds_flush": ds_flush}


def _resolution(dtype: torch.dtype, t_abs: torch.Tensor, s: float) -> torch.Tensor:
    """Per-row resolution term (see top): 4x the bound (eps64 + eps32^2) |t| / (4 s) on |dp|."""
    e = EPS[F64] + (EPS[F32] ** 2 if dtype == F32 else 0.0)
    return e * t_abs / s


def _describe(case: dict, backend: str) -> str:
    k = case["k"]
    kd = f"k[:4]={k[:4].tolist()}" if isinstance(k, torch.Tensor) else f"k={k}"
    return (f"backend={backend} dtype={case['dtype']} dist={case['dist']} rows={case['rows']} "
            f"n={case['n']} alpha={case['alpha']:.3g} largest={case['largest']} gate={case['gate']} {kd}")


def _assert_within(name: str, got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, info: str) -> None:
    got, want = got.to(F64), want.to(F64)
    err = (got - want).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        ratio = (err / tol).reshape(-1)
        worst = ratio.nan_to_num(math.inf).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} outside tolerance; first at flat index {i}: "
            f"got {got.reshape(-1)[i].item()!r}, want {want.reshape(-1)[i].item()!r}, "
            f"tol {tol.reshape(-1)[i].item():.3g}; max err/tol {worst:.3g}\n  {info}"
        )


def check_soft_case(case: dict, backend: str) -> None:
    info = _describe(case, backend)
    dtype, s, gate = case["dtype"], abs(case["alpha"]), case["gate"]
    tr = _truth(case)
    out, dx, dk, dalpha = _run(case, backend)
    assert out.dtype == dtype and out.shape == case["x"].shape, info
    assert dx.dtype == dtype, info

    fin = tr["finite"]
    # Non-finite rows: NaN output and NaN gradients for that row only.
    if not bool(fin.all()):
        assert bool(out[~fin].isnan().all()), f"non-finite row must give NaN output\n  {info}"
        assert bool(dx[~fin].isnan().all()), f"non-finite row must give NaN dx\n  {info}"
        assert bool(tr["out"][~fin].isnan().all()), info
    if not bool(fin.any()):
        return
    x64, res = tr["x"][fin], _resolution(dtype, tr["t_abs"][fin], s)[:, None]
    eps = EPS[dtype]

    # Forward.
    p_tol = P_TOL[dtype] + res
    if gate:
        tol = p_tol * x64.abs() + 2 * eps * tr["out"][fin].abs() + TINY[dtype]
    else:
        tol = p_tol.expand_as(x64)
    _assert_within("out", out[fin], tr["out"][fin], tol, info)
    if not gate:
        n = case["n"]
        sum_tol = P_TOL[dtype] * tr["k"][fin].clamp(min=1) + n * res[:, 0]
        _assert_within("sum(p) - k", out[fin].to(F64).sum(-1), tr["k"][fin], sum_tol, info)
        assert bool(((out[fin] >= 0) & (out[fin] <= 1)).all()), f"p outside [0, 1]\n  {info}"

    # Backward. Flush: f, p below the smallest normal number may be 0 in the kernels.
    rtol, fl = G_RTOL[dtype], FLUSH[dtype]
    w, f, dk_flush = tr["w"][fin], tr["f"][fin], tr["dk_flush"][fin]
    flush = (fl / s) * (w.abs() * (x64.abs() if gate else 1.0) + tr["dk_scale"][fin, None]) \
        + (f / s) * dk_flush[:, None] + (w.abs() * fl if gate else 0.0)
    dx_tol = (rtol + res) * tr["dx_scale"][fin] + flush + 2 * eps * tr["dx"][fin].abs()
    _assert_within("dx", dx[fin], tr["dx"][fin], dx_tol, info)
    if dk is not None:
        dk_tol = (rtol + res[:, 0]) * tr["dk_scale"][fin] + dk_flush + TINY[F64]
        _assert_within("dk", dk[fin], tr["dk"][fin], dk_tol, info)
    if bool(fin.all()):
        ds_tol = (rtol + res.max()) * tr["ds_scale"].sum() + tr["ds_flush"].sum() + TINY[F64]
        _assert_within("dalpha", dalpha, tr["dalpha"], ds_tol, info)
    else:
        assert bool(dalpha.isnan()), f"a NaN row makes dalpha NaN (it sums the rows)\n  {info}"


# ----------------------------------------------------------------------------- soft top-k tests


@pytest.mark.skipif(not BACKENDS, reason="no compiled backend for CPU tensors in this install")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(N_SOFT_CASES), ids=lambda s: f"seed-{s}")
def test_soft_topk_random(backend, seed):
    check_soft_case(draw_soft_case(seed), backend)


@pytest.mark.skipif(not TRITON, reason="triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(N_TRITON_CASES), ids=lambda s: f"seed-{s}")
def test_soft_topk_random_triton(seed):
    check_soft_case(draw_soft_case(10_000 + seed, max_n=48, max_rows=3), "triton")


# ----------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if TRITON else []))
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("largest", [True, False])
def test_regression_many_ties_at_row_max_newton(backend, dtype, largest):
    """More than kSortMax = 1024 candidates, more than k of them tied at the row maximum (post-ReLU
    rows with largest=False: every exact zero is the maximum of -x). The CPU kernel's Newton
    solver starts at t0 = L = that maximum, where f has its kink at u = 0; it took the Halley
    step there as exact although its curvature was from the t < max side: sum p was 345, not 62
    (fixed in csrc/cpu/soft_topk.cpp, solve_newton: strict t > zmax for the exact shortcut)."""
    n = 2000
    x = torch.full((3, n), 0.0, dtype=F64)
    x[:, 1400:] = torch.rand(3, n - 1400, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.5
    x = x if not largest else -x  # the tied zeros are the top of y
    k = torch.tensor([62.0, 62.5, 600.0], dtype=F64)
    case = {"dtype": dtype, "dist": "relu", "n": n, "rows": 3, "alpha": 0.03, "k": k,
            "x": x.to(dtype), "largest": largest, "gate": False,
            "w": torch.randn(3, n, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)}
    p = softsae.soft_topk(case["x"], k, 0.03, largest=largest, backend=backend)
    torch.testing.assert_close(p.double().sum(-1), k, atol=P_TOL[dtype] * 600, rtol=0)
    check_soft_case(case, backend)
    check_soft_case(dict(case, gate=True), backend)


_TRITON_WIDE_GAP = pytest.mark.xfail(
    strict=True,
    reason="known: with t in a wide gap (integer k, every f underflowed) the Triton kernels do not place t "
    "at the exact midpoint (float32: u = (y - t) / s is evaluated in float32, off by ~eps32 |u|, i.e. ~0.1 "
    "at |u| ~ 1e7 and ~1e-3 already at |u| ~ 1e4, e.g. |x| ~ 3, s ~ 5e-5; float64: the search stops "
    "~2.5e-5 s off) and the backward's rescaled weights e^(min|u| - |u|) inherit it: dk = A/S is off by "
    "up to ~10% (float32) / 3e-5 (float64). p is unaffected (0 or 1). Not fixed here: needs float64 u / "
    "a tighter stop in the forward's gap comparison and in the backward's rescaled sums for such rows.",
)
_WIDE_GAP_BACKENDS = BACKENDS + ([pytest.param("triton", marks=_TRITON_WIDE_GAP)] if TRITON else [])


@pytest.mark.parametrize("backend", _WIDE_GAP_BACKENDS)
@pytest.mark.parametrize(
    ("x", "w", "k", "s", "dtype", "largest"),
    [
        # t sits mid-gap between -20.69 and -4140.29, |u| ~ 5e6 at both: every f underflows.
        ([-20.687326431274414, -4140.2939453125], [-0.9739875197410583, -0.271878182888031], 1.0,
         3.8235861956588553e-4, F32, True),
        ([-7447.7919921875, -9592.2783203125, -30302.96875],
         [-0.800642728805542, 1.1662101745605469, 0.16725461184978485], 2.0, 0.002888884829743925, F32, True),
        ([-6439.962641738431, 19912.697749992472, -15986.057042400405, 14276.562991976516, 7228.391934244936,
          7508.094460252181, -8018.578081503094, 16405.408820072094, -6769.096938384631],
         [0.28568798953880997, 1.1981703897690053, 1.7996670217297024, 0.16447011992505506, 0.7555991442899703,
          0.7858788846402943, -0.3196765833206675, 1.9137357878267265, -0.04239878978927223], 3.0,
         0.001388544359769552, F64, False),
    ],
    ids=["n2-f32", "n3-f32", "n9-f64-smallest"],
)
def test_regression_wide_gap_integer_k_dk(backend, x, w, k, s, dtype, largest):
    """Integer k, t in a gap of ~1e5-1e7 s: every f underflows and dk = A/S must come from f
    rescaled by e^(min|u|) (docs/design.md). Exactly, t is the gap's midpoint and both neighbours
    weigh the same, so dk is the mean of their upstream gradients. The CPU kernel formed the
    rescaled weights of float32 rows from a float32 u (error ~eps32 |u| ~ 1): dk = -0.5370 instead
    of -0.6229 in the n2 case (fixed in csrc/cpu/soft_topk.cpp, bwd_row: that rare path now forms
    u in float64)."""
    xt = torch.tensor([x], dtype=dtype, requires_grad=True)
    kk = torch.tensor([k], dtype=F64, requires_grad=True)
    p = softsae.soft_topk(xt, kk, s, largest=largest, backend=backend)
    (dk,) = torch.autograd.grad(p, [kk], torch.tensor([w], dtype=dtype))
    order = (torch.tensor(x, dtype=F64) * (1 if largest else -1)).argsort(descending=True)
    wa, wb = w[int(order[int(k) - 1])], w[int(order[int(k)])]
    assert abs(dk.item() - 0.5 * (wa + wb)) <= G_RTOL[dtype] * max(abs(wa), abs(wb))
    case = {"dtype": dtype, "dist": "huge", "n": len(x), "rows": 1, "alpha": s, "k": torch.tensor([k], dtype=F64),
            "x": xt.detach(), "largest": largest, "gate": False, "w": torch.tensor([w], dtype=dtype)}
    check_soft_case(case, backend)


# ----------------------------------------------------------------------------- sparse decode


def draw_decode_case(seed: int, max_b: int = 40, max_k: int = 64, max_n: int = 300, max_d: int = 96) -> dict:
    d = _Draw(seed)
    dtype = d.choice((F32, F64))
    B, K = d.int(0, max_b), d.int(0, max_k)
    n, dim = d.int(1, max_n), d.int(1, max_d)
    # Indices from a small pool when duplicates are wanted, else from the whole dictionary.
    pool = d.int(1, min(n, 4)) if d.u() < 0.3 else n
    idx = torch.randint(0, pool, (B, K), generator=d.g)
    idx[d.rand(B, K) < d.u()] = -1  # random padding density
    if B > 0 and d.u() < 0.5:
        idx[d.int(0, B - 1)] = -1  # an empty row
    vals = d.randn(B, K)
    vals[idx < 0] = d.choice((0.0, 7.0, math.nan))  # padded values must be ignored
    W = d.randn(n, dim)
    b = d.randn(dim) if d.u() < 0.5 else None
    return {"dtype": dtype, "vals": vals.to(dtype), "idx": idx if d.u() < 0.8 else idx.to(torch.int32),
            "W": W.to(dtype), "b": None if b is None else b.to(dtype), "grad": d.randn(B, dim).to(dtype)}


def _decode(case: dict, backend: str, dtype: torch.dtype | None = None):
    dtype = dtype or case["dtype"]
    vals = case["vals"].to(dtype).requires_grad_(True)
    W = case["W"].to(dtype).requires_grad_(True)
    b = None if case["b"] is None else case["b"].to(dtype).requires_grad_(True)
    with _threads(_THREADS if backend != "reference" else 1):
        out = softsae.sparse_decode(vals, case["idx"], W, b, backend=backend)
        inputs = [vals, W] + ([b] if b is not None else [])
        if out.numel() == 0:
            return out.detach(), None, None, None
        grads = torch.autograd.grad(out, inputs, grad_outputs=case["grad"].to(dtype), allow_unused=True)
    return out.detach(), grads[0], grads[1], grads[2] if b is not None else None


def check_decode_case(case: dict, backend: str) -> None:
    dtype = case["dtype"]
    eps = EPS[dtype]
    info = (f"backend={backend} dtype={dtype} vals={tuple(case['vals'].shape)} W={tuple(case['W'].shape)} "
            f"bias={case['b'] is not None} idx={case['idx'].dtype}")
    out, dvals, dW, db = _decode(case, backend)
    ref, rdvals, rdW, rdb = _decode(case, "reference", F64)
    B, K = case["vals"].shape
    dim = case["W"].shape[1]
    assert out.shape == (B, dim) and out.dtype == dtype, info
    if out.numel() == 0:
        return
    idx = case["idx"].to(torch.int64)
    valid = idx >= 0
    av = torch.where(valid, case["vals"].to(F64).abs(), 0.0)  # NaN at padding must not leak
    aW, ag = case["W"].to(F64).abs(), case["grad"].to(F64).abs()
    z_abs = densify(av, idx, case["W"].shape[0], F64)
    ab = 0.0 if case["b"] is None else case["b"].to(F64).abs()
    # gamma_m bound per output, m = the number of terms summed.
    out_tol = 2 * (K + 2) * eps * (z_abs @ aW + ab) + TINY[dtype]
    _assert_within("out", out, ref, out_tol, info)
    if K > 0:
        dv_tol = 2 * (dim + 2) * eps * torch.where(valid, (ag @ aW.T).gather(1, idx.clamp(min=0)), 0.0) + TINY[dtype]
        _assert_within("dvals", dvals, rdvals, dv_tol, info)
        assert bool((dvals[~valid] == 0).all()), f"padding must get dval 0\n  {info}"
    dW_tol = 2 * (B * K + 2) * eps * (z_abs.T @ ag) + TINY[dtype]
    _assert_within("dW", dW, rdW, dW_tol, info)
    if db is not None:
        _assert_within("db", db, rdb, 2 * (B + 2) * eps * ag.sum(0) + TINY[dtype], info)
    # deterministic=True (the default): bit-identical dW on a second run.
    _, _, dW2, _ = _decode(case, backend)
    assert torch.equal(dW, dW2), f"dW differs between two runs\n  {info}"


@pytest.mark.skipif(not BACKENDS, reason="no compiled backend for CPU tensors in this install")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(N_DECODE_CASES), ids=lambda s: f"seed-{s}")
def test_sparse_decode_random(backend, seed):
    check_decode_case(draw_decode_case(seed), backend)


@pytest.mark.skipif(not TRITON, reason="triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(N_TRITON_CASES // 2), ids=lambda s: f"seed-{s}")
def test_sparse_decode_random_triton(seed):
    check_decode_case(draw_decode_case(20_000 + seed, max_b=4, max_k=6, max_n=12, max_d=16), "triton")
