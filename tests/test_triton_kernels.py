"""Triton kernels (softsae.kernels) against the float64 references, on CPU tensors.

Runs under TRITON_INTERPRET=1 (set below, before triton is imported), so no GPU is needed;
the interpreter is slow, so shapes stay small. The launchers' keyword overrides (block,
compact, cap) force the chunk loops, the candidate compaction and the compaction-overflow
fallback onto rows short enough for the interpreter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import INTERPRETER_ALPHAS  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests drive CPU tensors through the Triton interpreter", allow_module_level=True)

from softsae.kernels.soft_topk import launch_soft_topk_bwd, launch_soft_topk_fwd  # noqa: E402
from softsae.kernels.sparse_decode import launch_sparse_decode_bwd, launch_sparse_decode_fwd  # noqa: E402

from softsae.ops.soft_topk_ref import laplace_cdf, soft_topk_bwd_ref, soft_topk_fwd_ref  # noqa: E402
from softsae.ops.sparse_decode_ref import sparse_decode_bwd_ref, sparse_decode_fwd_ref  # noqa: E402

ALPHAS = INTERPRETER_ALPHAS

# Code paths of the forward kernel: the row searched in place (one chunk, then several), the
# candidate compaction (several chunks of 64), and compaction overflow (back to the row).
PATHS = {
    "row": {},
    "row_chunks": {"block": 64},
    "compact": {"block": 64, "compact": True, "cap": 256},
    "overflow": {"block": 64, "compact": True, "cap": 8},
}


def make_batch(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that exercise the edge cases, and their k (float64, inside (0, n))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, n, generator=g, dtype=torch.float64) * 3
    x[0] = 0.0  # all-zero row (post-ReLU rows often are)
    x[1] = torch.round(x[1])  # many exact ties
    x[2] = x[2].clamp(min=0)  # post-ReLU: a big group at the minimum
    x[3] = x[3].clamp(-10, 10)
    x[6] = torch.round(x[6] * 4) / 4
    k = torch.rand(8, generator=g, dtype=torch.float64) * n
    k[3] = 1e-6  # k near 0
    k[4] = n - 1e-6  # k near n
    k[5] = min(3.0, n - 1e-6)  # integer k
    k[6] = min(0.5, n - 1e-6)
    return x.to(dtype), k.clamp(1e-6, n - 1e-6)


def check_fwd(x, k, s, largest=True, gate=False, **kw):
    out, t = launch_soft_topk_fwd(x, k, s, largest, gate, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert t.dtype == torch.float64 and t.shape == (x.shape[0],)
    # The float64 solution on the same inputs (the accuracy target of design.md).
    p64, t64 = soft_topk_fwd_ref(x.double(), k, s, largest, False)
    p = launch_soft_topk_fwd(x, k, s, largest, False, **kw)[0].double() if gate else out.double()
    wide = x.dtype == torch.float64
    tol = 1e-9 if wide else 1e-4
    assert (p - p64).abs().max().item() <= tol
    assert torch.all((p.sum(-1) - k).abs() <= tol * k.clamp(min=1))
    assert torch.all((p >= 0) & (p <= 1))
    # t decides the backward's weights: it must be close on the scale s as well.
    assert torch.all((t - t64).abs() <= (1e-8 if wide else 1e-3) * s + 1e-14 * t64.abs())
    if gate:
        ref = x.double() * p64
        assert (out.double() - ref).abs().max().item() <= tol * max(1.0, x.abs().max().item())
    return out, t


# ----------------------------------------------------------------------------- soft top-k forward


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", ALPHAS)
def test_fwd_matches_reference(path, dtype, s):
    x, k = make_batch(150, dtype)
    check_fwd(x, k, s, **PATHS[path])


@pytest.mark.parametrize("largest,gate", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("s", [1e-4, 1.0])
def test_fwd_largest_and_gate(largest, gate, s):
    x, k = make_batch(100, torch.float32, seed=1)
    check_fwd(x, k, s, largest=largest, gate=gate)
    check_fwd(x.double(), k, s, largest=largest, gate=gate, block=32, compact=True, cap=64)


@pytest.mark.parametrize("n", [2, 3, 7, 37])
def test_fwd_small_rows(n):
    x, k = make_batch(n, torch.float32, seed=n)
    for s in (1e-4, 1.0):
        check_fwd(x, k, s)
        check_fwd(x.double(), k, s)


def test_fwd_n1_gives_k_exactly():
    x = torch.tensor([[2.5], [-1.0], [0.0]])
    k = torch.tensor([0.3, 0.5, 1 - 1e-6], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        out, t = launch_soft_topk_fwd(x.to(dtype), k, 1e-2, True, False)
        assert torch.equal(out, k.to(dtype)[:, None])
        _, t64 = soft_topk_fwd_ref(x.double(), k, 1e-2, True, False)
        torch.testing.assert_close(t, t64, rtol=0, atol=1e-12)
        gated, _ = launch_soft_topk_fwd(x.to(dtype), k, 1e-2, True, True)
        assert torch.equal(gated, x.to(dtype) * k.to(dtype)[:, None])


def test_fwd_default_compaction_path():
    """n above the compaction threshold with the launcher's own block sizes."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 2500, generator=g) - 0.5).clamp(min=0)
    k = torch.tensor([20.0, 64.5], dtype=torch.float64)
    for s in (1e-4, 1e-2):
        check_fwd(x, k, s, gate=True)


def test_fwd_half_inputs():
    x, k = make_batch(64, torch.float32, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        out, t = launch_soft_topk_fwd(xh, k, 1e-2, True, True)
        ref, t64 = soft_topk_fwd_ref(xh, k, 1e-2, True, True)
        assert out.dtype == dtype
        # computed in float32 from the same half inputs: equal up to the final rounding.
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-2, atol=1e-3)
        assert torch.all((t - t64).abs() <= 1e-3 * 1e-2 + 1e-12 * t64.abs())


def test_fwd_wide_gap_threshold():
    """t in a gap of 10^4 s (weights exactly 0 or 1) or on a tie: t itself must still be right."""
    x = torch.tensor([[0.0, 1.0, 1.0, 3.0], [5.0, -5.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    k = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    # Row 0: the tie at 1 shares the remaining weight, t = 1. Row 1: 1 - e^{-(5-t)/s}/2 +
    # 2 e^{-t/s}/2 = 1 gives t = 2.5 + s ln2 / 2. Row 2: t = 1.5 by symmetry.
    t_exact = torch.tensor([1.0, 2.5 + 1e-4 * math.log(2) / 2, 1.5], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        out, t = check_fwd(x.to(dtype), k, 1e-4)
        # float32: u carries a relative error ~eps |u| = eps * 2.5e4 here.
        torch.testing.assert_close(t, t_exact, rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-7)
        assert torch.equal(out[1:], torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 1]], dtype=dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN
def test_fwd_non_finite_rows():
    x, k = make_batch(40, torch.float32, seed=5)
    x[1, 3] = math.nan
    x[4, 0] = math.inf
    x[5, 7] = -math.inf
    for kw in ({}, PATHS["compact"]):
        out, t = launch_soft_topk_fwd(x, k, 1e-2, True, False, **kw)
        bad = torch.tensor([1, 4, 5])
        assert torch.isnan(out[bad]).all() and torch.isnan(t[bad]).all()
        good = torch.tensor([0, 2, 3, 6, 7])
        p64, t64 = soft_topk_fwd_ref(x[good].double(), k[good], 1e-2, True, False)
        assert (out[good].double() - p64).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- soft top-k backward


def check_bwd(x, k, s, largest, gate, seed=0, **kw):
    """Backward at the reference t, against the float64 reference on the same inputs."""
    _, t = soft_topk_fwd_ref(x.double(), k, s, largest, gate)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    dx, dk, ds = launch_soft_topk_bwd(grad, x, t, s, largest, gate, **kw)
    assert dx.dtype == x.dtype and dk.dtype == torch.float64 and ds.dtype == torch.float64
    rdx, rdk, rds = soft_topk_bwd_ref(grad, x, t, s, largest, gate)
    # Tolerances relative to the size of the terms each result sums: a result that cancels
    # to ~0 is only defined to (precision x those terms).
    x64, g64 = x.double(), grad.double()
    sign = 1.0 if largest else -1.0
    u = (sign * x64 - t[:, None]) / s
    fs = 0.5 * torch.exp(-u.abs()) / s
    g = g64 * x64 if gate else g64
    scale_dx = fs * (g.abs() + rdk.abs()[:, None]) + (g64.abs() * laplace_cdf(u) if gate else 0.0)
    scale_dk = g.abs().amax(-1)
    fr = torch.exp(-(u.abs() - u.abs().amin(-1, keepdim=True)))
    c_over_s = (fr * u).sum(-1, keepdim=True) / fr.sum(-1, keepdim=True)
    scale_ds = (g.abs() * fs * (c_over_s.abs() + u.abs())).sum(-1)
    rtol = 1e-9 if x.dtype == torch.float64 else 1e-4
    tiny = 1e-300 if x.dtype == torch.float64 else 1e-37  # subnormal results carry no digits
    assert torch.all((dx.double() - rdx).abs() <= rtol * scale_dx + tiny)
    assert torch.all((dk - rdk).abs() <= rtol * scale_dk)
    assert torch.all((ds - rds).abs() <= rtol * scale_ds + tiny)
    return dx, dk, ds


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", ALPHAS)
def test_bwd_matches_reference(gate, dtype, s):
    x, k = make_batch(150, dtype, seed=6)
    check_bwd(x, k, s, True, gate)
    check_bwd(x, k, s, False, gate, seed=1, block=64)


def test_bwd_small_rows_and_n1():
    for n in (1, 2, 7):
        x, k = make_batch(n, torch.float32, seed=7)
        for s in (1e-4, 1.0):
            check_bwd(x, k, s, True, True)
            check_bwd(x.double(), k, s, True, False)


def test_bwd_underflowed_weights():
    """Every f underflows (t mid-gap): the ratios still come out exactly, no NaN."""
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    k = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        dx, dk, ds = check_bwd(x.to(dtype), k, 1e-4, True, False)
        assert torch.isfinite(dk).all() and torch.isfinite(ds).all() and torch.isfinite(dx).all()
        grad = torch.tensor([[2.0, 4.0], [1.0, -1.0]], dtype=dtype)
        _, t = launch_soft_topk_fwd(x.to(dtype), k, 1e-4, True, False)
        _, dk, _ = launch_soft_topk_bwd(grad, x.to(dtype), t, 1e-4, True, False)
        torch.testing.assert_close(dk, torch.tensor([3.0, 0.0], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_bwd_fwd_roundtrip_half():
    """The kernel's own t through the kernel's backward (bf16 in, float32 compute)."""
    x, k = make_batch(64, torch.float32, seed=8)
    xh = x.to(torch.bfloat16)
    _, t = launch_soft_topk_fwd(xh, k, 1e-2, True, True)
    grad = torch.randn(xh.shape, dtype=torch.float64).to(torch.bfloat16)
    dx, dk, ds = launch_soft_topk_bwd(grad, xh, t, 1e-2, True, True)
    rdx, rdk, rds = soft_topk_bwd_ref(grad, xh, t, 1e-2, True, True)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.double(), rdx.double(), rtol=2e-2, atol=1e-2 * rdx.double().abs().max().item())
    torch.testing.assert_close(dk, rdk, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bwd_non_finite_rows():
    x, k = make_batch(40, torch.float32, seed=9)
    x[2, 5] = math.nan
    x[3, 0] = -math.inf
    out, t = launch_soft_topk_fwd(x, k, 1e-2, True, True)
    grad = torch.ones_like(x)
    dx, dk, ds = launch_soft_topk_bwd(grad, x, t, 1e-2, True, True)
    for r in (2, 3):
        assert torch.isnan(dx[r]).all() and torch.isnan(dk[r]) and torch.isnan(ds[r])
    good = torch.tensor([0, 1, 4, 5, 6, 7])
    assert torch.isfinite(dx[good]).all() and torch.isfinite(dk[good]).all() and torch.isfinite(ds[good]).all()


# ----------------------------------------------------------------------------- sparse decode


def decode_case(B, K, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(-1, n, (B, K), generator=g)
    if B > 2 and K > 3:
        idx[0, :3] = 4  # duplicates in a row are summed
        idx[1] = -1  # empty row
        vals[1] = math.nan  # padding values are ignored, even NaN
        idx[2, -2:] = -1  # trailing padding
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(d, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    return vals, idx, W, b, grad


def close(a, b, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(1.0, b.double().abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,K,n,d", [(5, 7, 20, 33), (4, 20, 9, 300), (1, 1, 1, 1)])
def test_sparse_decode_fwd(dtype, B, K, n, d):
    vals, idx, W, b, _ = decode_case(B, K, n, d, dtype)
    for bias in (None, b):
        close(launch_sparse_decode_fwd(vals, idx, W, bias), sparse_decode_fwd_ref(vals, idx, W, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,K,n,d", [(5, 7, 20, 33), (4, 20, 9, 300)])
def test_sparse_decode_bwd(dtype, B, K, n, d):
    vals, idx, W, _, grad = decode_case(B, K, n, d, dtype, seed=1)
    rdv, rdw = sparse_decode_bwd_ref(grad, vals, idx, W, True, True, True)
    for det in (True, False):
        dv, dw = launch_sparse_decode_bwd(grad, vals, idx, W, True, True, det)
        close(dv, rdv, dtype)
        close(dw, rdw, dtype)
    # Deterministic path: bitwise reproducible, with or without dvals.
    dw_again = launch_sparse_decode_bwd(grad, vals, idx, W, False, True, True)[1]
    assert torch.equal(launch_sparse_decode_bwd(grad, vals, idx, W, True, True, True)[1], dw_again)
    # Only what is asked for.
    dv, dw = launch_sparse_decode_bwd(grad, vals, idx, W, True, False, True)
    assert dw.numel() == 0
    close(dv, rdv, dtype)
    dv, dw = launch_sparse_decode_bwd(grad, vals, idx, W, False, True, True)
    assert dv.numel() == 0
    close(dw, rdw, dtype)


def test_sparse_decode_empty_k_and_rows():
    W = torch.randn(6, 5)
    b = torch.randn(5)
    vals = torch.empty(3, 0)
    idx = torch.empty(3, 0, dtype=torch.int64)
    close(launch_sparse_decode_fwd(vals, idx, W, b), sparse_decode_fwd_ref(vals, idx, W, b), torch.float32)
    close(launch_sparse_decode_fwd(vals, idx, W, None), torch.zeros(3, 5), torch.float32)
    grad = torch.randn(3, 5)
    for det in (True, False):
        dv, dw = launch_sparse_decode_bwd(grad, vals, idx, W, True, True, det)
        assert dv.shape == (3, 0)
        close(dw, torch.zeros(6, 5), torch.float32)
    # All rows padding.
    vals = torch.randn(2, 4)
    idx = torch.full((2, 4), -1)
    close(launch_sparse_decode_fwd(vals, idx, W, b), b.expand(2, 5).contiguous(), torch.float32)
    for det in (True, False):
        dv, dw = launch_sparse_decode_bwd(torch.randn(2, 5), vals, idx, W, True, True, det)
        close(dv, torch.zeros(2, 4), torch.float32)
        close(dw, torch.zeros(6, 5), torch.float32)


# ------------------------------------------- regressions found by the AOT compile gate (issue 7)
# The interpreter does not specialise integer arguments; the compiler does (== 1 becomes a
# constant, % 16 an alignment attribute). tests/test_compile_gate.py compiles these same
# launches for sm_80 / sm_90; here they run through the interpreter for the numbers.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("largest,gate", [(True, False), (False, True)])
def test_n1_single_row_every_dtype(dtype, largest, gate):
    """n == 1 and R == 1 (both specialised to constants by the compiler): fwd p = k, bwd finite."""
    x = torch.tensor([[1.5]], dtype=dtype)
    k = torch.tensor([0.25], dtype=torch.float64)
    out, t = launch_soft_topk_fwd(x, k, 0.1, largest, gate)
    want = k.to(dtype)[:, None] * (x if gate else 1)
    assert torch.equal(out, want)
    p64, t64 = soft_topk_fwd_ref(x.double(), k, 0.1, largest, False)
    torch.testing.assert_close(t, t64, rtol=0, atol=1e-12)
    dx, dk, ds = launch_soft_topk_bwd(torch.ones_like(x), x, t, 0.1, largest, gate)
    rdx, rdk, rds = soft_topk_bwd_ref(torch.ones(1, 1, dtype=torch.float64), x.double(), t, 0.1, largest, gate)
    tol = 1e-9 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(dx.double(), rdx, rtol=tol, atol=tol)
    torch.testing.assert_close(dk, rdk, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["compact", "overflow"])
def test_fwd_persistent_rows_share_scratch(path):
    """More rows than programs: each program reuses its scratch row for rows p, p + P, ..."""
    x, k = make_batch(150, torch.float32, seed=5)
    x = torch.cat([x, x.flip(0) * 0.5])  # 16 rows, different candidate counts back to back
    k = torch.cat([k, k.flip(0)])
    out1, t1 = check_fwd(x, k, 1e-2, programs=1, **PATHS[path])
    out3, t3 = check_fwd(x, k, 1e-2, programs=3, **PATHS[path])
    assert torch.equal(out1, out3) and torch.equal(t1, t3)  # rows are independent of the schedule


def test_s_as_device_tensor_matches_float():
    """s given as a 0-d / (1,) float64 (or float32) tensor reads the same value in-kernel."""
    x, k = make_batch(60, torch.float32, seed=6)
    out, t = launch_soft_topk_fwd(x, k, 0.03, True, True)
    for s_t in (torch.tensor(0.03, dtype=torch.float64), torch.tensor([0.03], dtype=torch.float64)):
        o2, t2 = launch_soft_topk_fwd(x, k, s_t, True, True)
        assert torch.equal(out, o2) and torch.equal(t, t2)
        bw = launch_soft_topk_bwd(torch.ones_like(x), x, t, 0.03, True, True)
        bw_t = launch_soft_topk_bwd(torch.ones_like(x), x, t, s_t, True, True)
        assert all(torch.equal(a, b) for a, b in zip(bw, bw_t, strict=True))
    s32 = torch.tensor(0.03, dtype=torch.float32)
    o3, t3 = launch_soft_topk_fwd(x, k, s32, True, True)
    o4, t4 = launch_soft_topk_fwd(x, k, float(s32), True, True)
    assert torch.equal(o3, o4) and torch.equal(t3, t4)
    with pytest.raises(ValueError, match="s:"):
        launch_soft_topk_fwd(x, k, torch.tensor([0.1, 0.2]), True, False)
    with pytest.raises(ValueError, match="s:"):
        launch_soft_topk_fwd(x, k, torch.tensor(1), True, False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN-s row
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_s_clamped_to_s_min_in_kernel(dtype):
    """s below S_MIN = 1e-30 acts as S_MIN (float32 1/s stays finite); NaN s gives NaN."""
    from softsae.kernels.soft_topk import S_MIN

    assert S_MIN == 1e-30
    x, k = make_batch(40, dtype, seed=7)
    out_min, t_min = launch_soft_topk_fwd(x, k, S_MIN, True, False)
    assert torch.isfinite(out_min).all() and torch.isfinite(t_min).all()
    for tiny in (1e-300, torch.tensor(1e-40, dtype=torch.float64)):
        out, t = launch_soft_topk_fwd(x, k, tiny, True, False)
        assert torch.equal(out, out_min) and torch.equal(t, t_min)
        dx, dk, ds = launch_soft_topk_bwd(torch.ones_like(x), x, t, tiny, True, False)
        dx2, dk2, ds2 = launch_soft_topk_bwd(torch.ones_like(x), x, t, S_MIN, True, False)
        assert torch.equal(dx, dx2) and torch.equal(dk, dk2) and torch.equal(ds, ds2)
    out, t = launch_soft_topk_fwd(x, k, math.nan, True, False)
    assert torch.isnan(t).all()


@pytest.mark.parametrize("d", [129, 512])
def test_sparse_decode_float64_narrow_tiles(d):
    """float64 takes 128-column tiles (16 x 256 float64 tiles spilled on sm_90): several d-tiles."""
    vals, idx, W, b, grad = decode_case(4, 20, 9, d, torch.float64, seed=2)
    close(launch_sparse_decode_fwd(vals, idx, W, b), sparse_decode_fwd_ref(vals, idx, W, b), torch.float64)
    rdv, rdw = sparse_decode_bwd_ref(grad, vals, idx, W, True, True, True)
    for det in (True, False):
        dv, dw = launch_sparse_decode_bwd(grad, vals, idx, W, True, True, det)
        close(dv, rdv, torch.float64)
        close(dw, rdw, torch.float64)
