"""Direct tests of the compiled CPU extension ``softsae._C`` (skipped when it is not built).

Each kernel is checked against the pure-PyTorch references (softsae/ops/*_ref.py) run in
float64, with the tolerances of docs/design.md; argument errors must raise, never crash.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOL as SOFT_TOL
from helpers import cpu_isa_params, use_cpu_isa

C = pytest.importorskip("softsae._C")

from softsae.ops.soft_topk_ref import soft_topk_bwd_ref, soft_topk_fwd_ref  # noqa: E402
from softsae.ops.sparse_decode_ref import sparse_decode_bwd_ref, sparse_decode_fwd_ref  # noqa: E402

TOL = {dtype: tol.p for dtype, tol in SOFT_TOL.items()}  # design.md's accuracy targets
ARG_ERRORS = (RuntimeError, ValueError, TypeError)


def _rows(r: int, n: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(r, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = torch.rand(r, generator=g, dtype=torch.float64) * (n - 2e-6) + 1e-6
    return x, k


def _check_fwd(x: torch.Tensor, k: torch.Tensor, s: float, largest: bool) -> None:
    tol = TOL[x.dtype]
    out, t = C.soft_topk_fwd(x, k, s, largest, False)
    ref, _ = soft_topk_fwd_ref(x.double(), k, s, largest, False)  # float64 solution on the same input
    assert out.dtype == x.dtype and out.shape == x.shape and t.dtype == torch.float64
    assert torch.isfinite(t).all()
    assert (out.double() - ref).abs().max().item() <= tol
    assert ((out.double().sum(1) - k).abs() <= tol * k.clamp(min=1)).all()
    assert ((out >= 0) & (out <= 1)).all()
    gated, t2 = C.soft_topk_fwd(x, k, s, largest, True)
    torch.testing.assert_close(t2, t, rtol=0, atol=0)
    torch.testing.assert_close(gated, x * out, rtol=4 * torch.finfo(x.dtype).eps, atol=0)



@pytest.fixture(params=cpu_isa_params())
def isa(request):
    """Every soft top-k test below runs once per instruction set this machine supports."""
    with use_cpu_isa(request.param):
        yield request.param


# ------------------------------------------------------------------------- instruction sets


def test_cpu_isa_api():
    have = C.cpu_isa_available()
    assert have[0] == "portable" and C.cpu_isa() in have
    assert list(have) == [n for n in ("portable", "avx2", "avx512") if n in have]
    before = C.cpu_isa()
    try:
        for name in have:
            C.set_cpu_isa(name)
            assert C.cpu_isa() == name
        with pytest.raises(ValueError, match="cpu_isa_available"):
            C.set_cpu_isa("sse9")
    finally:
        C.set_cpu_isa(before)
    assert C.cpu_isa() == before


def test_cpu_isa_env_caps_the_default():
    import subprocess
    import sys

    code = "import softsae._C as C; print(C.cpu_isa())"
    for name in C.cpu_isa_available():
        env = {**__import__("os").environ, "SOFTSAE_CPU_ISA": name}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert res.stdout.strip() == name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_isas_agree(dtype):
    # Same math in every variant: results agree to the accuracy contract, not bit for bit.
    x, k = _rows(6, 4097, dtype, seed=11)
    grad = torch.randn(6, 4097, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    tol = TOL[dtype]
    for s in (1e-5, 1e-3, 1.0):
        res = {}
        for name in C.cpu_isa_available():
            with use_cpu_isa(name):
                out, t = C.soft_topk_fwd(x, k, s, True, False)
                res[name] = (out, t, *C.soft_topk_bwd(grad, x, t, s, True, False))
        base = res["portable"]
        for name, r in res.items():
            assert (r[0].double() - base[0].double()).abs().max().item() <= tol, name
            t_tol = (1e-4 if dtype == torch.float32 else 1e-9) * s
            assert (r[1] - base[1]).abs().max().item() <= t_tol, name
            scale = base[2].double().abs().max().item() + 1e-30
            assert (r[2].double() - base[2].double()).abs().max().item() <= 1e3 * tol * scale, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_via_float32_upcast(isa, dtype):
    # The op layer runs float16/bfloat16 through the float32 kernels; the float32 result rounded
    # to the half dtype once, so it is within one half-ulp-scale step of the float64 truth.
    from softsae.ops.soft_topk import soft_topk

    x, k = _rows(3, 4097, torch.float32, seed=4)
    xh = x.to(dtype)
    for s in (1e-4, 1e-1, 1.0):
        out = soft_topk(xh, k, s, backend="cpu")
        ref, _ = soft_topk_fwd_ref(xh.double(), k, s, True, False)
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max().item() <= torch.finfo(dtype).eps + TOL[torch.float32]


# ------------------------------------------------------------------------- soft top-k fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 4097])
@pytest.mark.parametrize("s", [1e-5, 1e-4, 1e-2, 1.0, 10.0])
def test_fwd_matches_reference(isa, dtype, n, s):
    x, k = _rows(3, n, dtype, seed=n)
    for largest in (True, False):
        _check_fwd(x, k, s, largest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwd_edge_rows(isa, dtype):
    n = 300
    g = torch.Generator().manual_seed(1)
    ties = (torch.randn(1, n, generator=g, dtype=torch.float64) * 4).round().div(2).to(dtype)
    for s in (1e-5, 1e-3, 1.0):
        for kv in (1.0, 7.5, 150.0, n - 1e-6, 1e-6):
            _check_fwd(ties, torch.tensor([kv], dtype=torch.float64), s, True)
        zeros = torch.zeros(3, n, dtype=dtype)
        _check_fwd(zeros, torch.tensor([1e-6, 3.0, n - 1e-6], dtype=torch.float64), s, True)
        relu = (torch.randn(2, 4096, generator=g, dtype=torch.float64) - 2).clamp(min=0).to(dtype)
        _check_fwd(relu, torch.tensor([20.0, 3000.0], dtype=torch.float64), s, True)


def test_fwd_n1_is_k_exactly(isa):
    x = torch.tensor([[0.3], [-2.0], [0.0]])
    k = torch.tensor([0.25, 1e-6, 1 - 1e-6], dtype=torch.float64)
    out, t = C.soft_topk_fwd(x, k, 0.1, True, False)
    assert torch.equal(out[:, 0], k.float())
    assert torch.isfinite(t).all()


def test_fwd_nonfinite_rows_are_nan_and_isolated(isa):
    x, k = _rows(4, 5000, torch.float32)
    x[1, 17] = math.nan
    x[3, 4000] = math.inf
    out, t = C.soft_topk_fwd(x, k, 1e-3, True, False)
    assert out[1].isnan().all() and out[3].isnan().all() and t[[1, 3]].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all() and torch.isfinite(t[[0, 2]]).all()
    dx, dk, ds = C.soft_topk_bwd(torch.ones_like(x), x, t, 1e-3, True, False)
    assert dx[1].isnan().all() and dk[1].isnan() and ds[1].isnan()
    assert torch.isfinite(dx[[0, 2]]).all() and torch.isfinite(dk[[0, 2]]).all()


def test_fwd_large_row_small_scale(isa):
    x, _ = _rows(2, 65536, torch.float32, scale=1.0)
    _check_fwd(x, torch.tensor([64.5, 220.0], dtype=torch.float64), 1e-4, True)


def test_threads_do_not_change_results(isa):
    x, k = _rows(64, 2000, torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = C.soft_topk_fwd(x, k, 1e-3, True, True)
        torch.set_num_threads(2)
        b = C.soft_topk_fwd(x, k, 1e-3, True, True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------- soft top-k bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 5, 100, 3000])
@pytest.mark.parametrize("s", [1e-5, 1e-2, 1.0])
@pytest.mark.parametrize("gate", [False, True])
def test_bwd_matches_reference(isa, dtype, n, s, gate):
    x, k = _rows(4, n, dtype, seed=7 * n)
    grad = torch.randn(4, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    for largest in (True, False):
        _, t = C.soft_topk_fwd(x, k, s, largest, gate)
        dx, dk, ds = C.soft_topk_bwd(grad, x, t, s, largest, gate)
        assert torch.isfinite(dx).all() and torch.isfinite(dk).all() and torch.isfinite(ds).all()
        rdx, rdk, rds = soft_topk_bwd_ref(grad.double(), x.double(), t, s, largest, gate)
        # Compare against the size of the terms each result is made of (a difference of large
        # terms may legitimately be ~0 in the reference and round-off here).
        x64, g64 = x.double(), grad.double()
        u = ((x64 if largest else -x64) - t[:, None]) / s
        f = 0.5 * torch.exp(-u.abs())
        gg = g64 * x64 if gate else g64
        rel = 1e-5 if dtype == torch.float32 else 1e-12
        sdx = (f / s * gg.abs()).amax(1, keepdim=True) + (g64.abs().amax(1, keepdim=True) if gate else 0)
        sds = (gg.abs() * f / s * (u.abs() + 1)).sum(1)
        assert ((dx.double() - rdx).abs() <= rel * sdx + 1e-300).all()
        assert ((dk - rdk).abs() <= rel * gg.abs().amax(1)).all()
        assert ((ds - rds).abs() <= rel * sds + 1e-300).all()


def test_bwd_threshold_in_underflow_gap(isa):
    # t = 0.5 sits 5000 s from every value: all f underflow, the ratios must still be exact.
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        out, t = C.soft_topk_fwd(x.to(dtype), torch.tensor([2.0], dtype=torch.float64), 1e-4, True, False)
        assert abs(t.item() - 0.5) < 1e-9
        dx, dk, ds = C.soft_topk_bwd(g.to(dtype), x.to(dtype), t, 1e-4, True, False)
        assert dk.item() == pytest.approx(3.0, rel=1e-6)
        assert ds.item() == 0.0 and (dx == 0).all()


class _SoftTopK(torch.autograd.Function):
    """The raw kernels as an autograd Function, for gradcheck without the Python layer."""

    @staticmethod
    def forward(ctx, x, k, s, largest, gate):
        out, t = C.soft_topk_fwd(x, k, float(s), largest, gate)
        ctx.save_for_backward(x, t, s)
        ctx.largest, ctx.gate = largest, gate
        return out

    @staticmethod
    def backward(ctx, grad):
        x, t, s = ctx.saved_tensors
        dx, dk, ds = C.soft_topk_bwd(grad.contiguous(), x, t, float(s), ctx.largest, ctx.gate)
        return dx, dk, ds.sum().reshape(s.shape), None, None


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("s", [0.05, 1.0])
def test_gradcheck_float64(isa, largest, gate, s):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.5, 4.0, 7.25], dtype=torch.float64, requires_grad=True)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _SoftTopK.apply(a, b, c, largest, gate), (x, k, st),
                                    eps=1e-6 * s, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- sparse decode


def _pairs(b: int, kk: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(b, kk, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, n, (b, kk), generator=g)
    if kk:
        lens = torch.randint(0, kk + 1, (b,), generator=g)
        lens[0] = 0  # a row with no active latent
        idx = torch.where(torch.arange(kk)[None, :] < lens[:, None], idx, -1)
        if kk >= 2:
            idx[1:, 1] = torch.where(idx[1:, 0] >= 0, idx[1:, 0], idx[1:, 1])  # duplicates
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(d, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    return vals, idx, W, bias, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 5, 20, 33), (64, 16, 300, 128), (5, 0, 10, 8), (3, 4, 6, 1)])
def test_sparse_decode_matches_reference(dtype, shape):
    vals, idx, W, bias, grad = _pairs(*shape, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for b in (None, bias):
        out = C.sparse_decode_fwd(vals, idx, W, b)
        ref = sparse_decode_fwd_ref(vals.double(), idx, W.double(), None if b is None else b.double())
        torch.testing.assert_close(out.double(), ref, **tol)
    dvals, dW = C.sparse_decode_bwd(grad, vals, idx, W, True, True, True)
    rdv, rdW = sparse_decode_bwd_ref(grad.double(), vals.double(), idx, W.double(), True, True, True)
    torch.testing.assert_close(dvals.double(), rdv, **tol)
    torch.testing.assert_close(dW.double(), rdW, **tol)
    assert (dvals[idx < 0] == 0).all()
    dv_only, dw_none = C.sparse_decode_bwd(grad, vals, idx, W, True, False, True)
    assert dw_none.numel() == 0 and torch.equal(dv_only, dvals)
    dv_none, dw_only = C.sparse_decode_bwd(grad, vals, idx, W, False, True, False)
    assert dv_none.numel() == 0 and torch.equal(dw_only, dW)


def test_sparse_decode_dW_is_deterministic_across_threads():
    vals, idx, W, _, grad = _pairs(256, 32, 500, 64, torch.float32, seed=2)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, a = C.sparse_decode_bwd(grad, vals, idx, W, False, True, True)
        torch.set_num_threads(2)
        _, b = C.sparse_decode_bwd(grad, vals, idx, W, False, True, True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- argument checks


def test_soft_topk_argument_errors_raise():
    x, k = _rows(3, 10, torch.float32)
    t = torch.zeros(3, dtype=torch.float64)
    bad_fwd = [
        (x.half(), k, 0.1), (x.long(), k, 0.1), (x.t(), k, 0.1), (x[0], k[:1], 0.1), (x, k.float(), 0.1),
        (x, k[:2], 0.1), (x, k, 0.0), (x, k, -1.0), (x, k, math.nan), (x, k, math.inf),
        (x, torch.full((3,), 10.0, dtype=torch.float64), 0.1), (x, torch.zeros(3, dtype=torch.float64), 0.1),
        (x, torch.full((3,), math.nan, dtype=torch.float64), 0.1), (x[:, ::2], k, 0.1),
    ]
    for args in bad_fwd:
        with pytest.raises(ARG_ERRORS):
            C.soft_topk_fwd(*args, True, False)
    bad_bwd = [
        (x.double(), x, t), (x[:2], x, t), (x, x, t[:2]), (x, x, t.float()), (x.t().contiguous().t(), x, t),
        (x[:, :5], x, t),
    ]
    for grad, xx, tt in bad_bwd:
        with pytest.raises(ARG_ERRORS):
            C.soft_topk_bwd(grad, xx, tt, 0.1, True, False)
    with pytest.raises(ARG_ERRORS):
        C.soft_topk_bwd(x, x, t, 0.0, True, False)
    with pytest.raises(ARG_ERRORS):
        C.soft_topk_fwd("x", k, 0.1, True, False)


def test_sparse_decode_argument_errors_raise():
    vals, idx, W, bias, grad = _pairs(4, 3, 10, 6, torch.float32)
    bad_fwd = [
        (vals.double(), idx, W, None), (vals, idx.int(), W, None), (vals, idx[:, :2], W, None),
        (vals, idx + 100, W, None), (vals, idx - 5, W, None), (vals, idx, W.t(), None),
        (vals, idx, W, bias[:3]), (vals, idx, W, bias.double()), (vals[0], idx[0], W, None),
        (vals.half(), idx, W.half(), None),
    ]
    for args in bad_fwd:
        with pytest.raises(ARG_ERRORS):
            C.sparse_decode_fwd(*args)
    with pytest.raises(ARG_ERRORS):
        C.sparse_decode_bwd(grad[:2], vals, idx, W, True, True, True)
    with pytest.raises(ARG_ERRORS):
        C.sparse_decode_bwd(grad.double(), vals, idx, W, True, True, True)
    with pytest.raises(ARG_ERRORS):
        C.sparse_decode_bwd(grad, vals, idx + 100, W, True, True, True)


def test_empty_inputs():
    out, t = C.soft_topk_fwd(torch.empty(0, 5), torch.empty(0, dtype=torch.float64), 0.1, True, False)
    assert out.shape == (0, 5) and t.shape == (0,)
    out = C.sparse_decode_fwd(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.long), torch.randn(4, 2), None)
    assert out.shape == (0, 2)
    dv, dW = C.sparse_decode_bwd(torch.empty(0, 2), torch.empty(0, 3), torch.empty(0, 3, dtype=torch.long),
                                 torch.randn(4, 2), True, True, True)
    assert dv.shape == (0, 3) and torch.equal(dW, torch.zeros(4, 2))


def test_bench_cpu_isa_smoke(tmp_path):
    # benchmarks/bench_cpu_isa.py (the per-ISA table in benchmarks/results/cpu_isa.md) runs end to end.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu_isa.md"
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "benchmarks/bench_cpu_isa.py"), "--shapes", "8x512", "--alphas", "1e-3",
                    "1", "--reps", "1", "--out", str(out)], env=env, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "## 8 x 512, 1 thread(s)" in text
    for isa in C.cpu_isa_available():
        assert f"softsae {isa} fwd+bwd" in text
