"""GPU backends ("cuda", "triton") on CUDA tensors against the float64 reference.

Skipped where no GPU is present. Every backend in softsae.available_backends("cuda") other
than the reference is compared with backend="reference" through the public API:

- float32 output within 1e-4 (absolute) of the float64 solution on the same inputs and
  |sum p - k| <= 1e-4 max(1, k); float64 within 1e-9;
- float16/bfloat16 judged the flash-attention way: the error against the float64 truth on
  the same (rounded) inputs is at most a few times the error of the reference run in that
  dtype (which is the truth rounded once);
- gradients w.r.t. x, k and alpha against the float64 reference, sparse decode forward and
  gradients against the dense z @ W + b.
"""

from __future__ import annotations

import pytest
import torch

import softsae
from softsae.ops.soft_topk_ref import soft_topk_bwd_ref, soft_topk_fwd_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in softsae.available_backends("cuda")]
ALPHAS = [1e-5, 1e-4, 1e-2, 1.0, 10.0]
HALF = [torch.float16, torch.bfloat16]
# (rows, n): n = 1 .. 65536, rows = 1 .. 4096; 4096 + 1 crosses the CUDA kernel's in-buffer
# limit (histogram + candidate path), 65536 the shared-memory row cache.
SHAPES = [(1, 1), (5, 2), (64, 7), (16, 1000), (8, 4097), (4096, 64), (2, 65536)]
DEV = "cuda"


def rows(r: int, n: int, kind: str, dtype=torch.float32) -> torch.Tensor:
    """Test rows on the GPU: randn, many exact ties, or post-ReLU; row 0 all zeros if r > 1."""
    x = torch.randn(r, n, dtype=torch.float64) * 3
    if kind == "ties":
        x = x.round()
    elif kind == "relu":
        x = (x - 2).clamp(min=0)
    if r > 1:
        x[0] = 0.0
    return x.clamp(-10, 10).to(DEV, dtype)


def rand_k(r: int, n: int) -> torch.Tensor:
    if n == 1:
        return torch.full((r,), 0.3, dtype=torch.float64, device=DEV)
    k = torch.rand(r, dtype=torch.float64) * n
    k[: r // 2] = k[: r // 2].floor().clamp(min=1)  # integer budgets put t in gaps between values
    return k.clamp(0.01, n - 0.01).to(DEV)


def truth(x: torch.Tensor, k: torch.Tensor, alpha: float, largest=True, gate=False) -> torch.Tensor:
    """float64 solution on exactly the values x holds."""
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    return fn(x.double(), k, alpha, largest=largest, backend="reference")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


# ----------------------------------------------------------------------------- soft top-k forward


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("r", "n"), SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["randn", "ties", "relu"])
def test_float32_forward(backend, r, n, alpha, kind):
    x = rows(r, n, kind)
    k = rand_k(r, n)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    assert p.dtype == torch.float32 and p.shape == x.shape
    assert max_err(p, truth(x, k, alpha)) <= 1e-4
    assert torch.all((p.double().sum(-1) - k).abs() <= 1e-4 * k.clamp(min=1))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("r", "n"), [(3, 1), (16, 333), (8, 4097), (2, 65536)])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_float64_forward(backend, r, n, alpha, kind):
    x = rows(r, n, kind, torch.float64)
    k = rand_k(r, n)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    assert p.dtype == torch.float64
    assert max_err(p, truth(x, k, alpha)) <= 1e-9


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("r", "n"), [(64, 7), (32, 777), (8, 4097), (2, 65536)])
@pytest.mark.parametrize("alpha", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("gate", [False, True])
def test_half_forward_no_worse_than_reference(backend, dtype, r, n, alpha, gate):
    x = rows(r, n, "randn", dtype)
    k = rand_k(r, n)
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    out = fn(x, k, alpha, backend=backend)
    assert out.dtype == dtype
    exact = truth(x, k, alpha, gate=gate)
    ref_err = max_err(fn(x, k, alpha, backend="reference"), exact)  # the truth rounded once
    assert max_err(out, exact) <= 3 * ref_err + 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_false_and_gate(backend, gate, dtype):
    x = rows(64, 300, "randn", dtype)
    k = rand_k(64, 300)
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for largest in (True, False):
        out = fn(x, k, 0.05, largest=largest, backend=backend)
        assert max_err(out, truth(x, k, 0.05, largest, gate)) <= tol * (10 if gate else 1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_all_zero_rows_and_extreme_k(backend):
    n = 5000
    x = torch.zeros(4, n, device=DEV)
    x[2:] = torch.randn(2, n, device=DEV)
    k = torch.tensor([1e-6, 64.0, 1e-6, n - 1e-6], dtype=torch.float64, device=DEV)
    for alpha in (1e-5, 1e-2, 10.0):
        p = softsae.soft_topk(x, k, alpha, backend=backend)
        assert max_err(p, truth(x, k, alpha)) <= 1e-4
        assert torch.all((p.double().sum(-1) - k).abs() <= 1e-4 * k.clamp(min=1))
        assert max_err(p[1], torch.full((n,), 64.0 / n, device=DEV)) <= 1e-6  # all ties: k / n each


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_n_equals_one_gives_k(backend):
    x = torch.randn(5, 1, device=DEV)
    k = torch.rand(5, dtype=torch.float64, device=DEV).clamp(0.01, 0.99)
    p = softsae.soft_topk(x, k, 1e-3, backend=backend)
    assert max_err(p[:, 0], k) <= 1e-7


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_give_nan_rows(backend, bad):
    x = torch.randn(4, 3000, device=DEV, requires_grad=False)
    x[1, 17] = bad
    k = torch.full((4,), 10.0, dtype=torch.float64, device=DEV)
    xg = x.clone().requires_grad_(True)
    p = softsae.soft_topk(xg, k, 0.1, backend=backend)
    assert torch.isnan(p[1]).all()
    good = [0, 2, 3]
    assert torch.isfinite(p[good]).all()
    assert max_err(p[good].detach(), truth(x[good], k[good], 0.1)) <= 1e-4
    p.sum().backward()
    assert torch.isnan(xg.grad[1]).all() and torch.isfinite(xg.grad[good]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_forward_is_deterministic(backend):
    x = rows(256, 20000, "relu")
    k = rand_k(256, 20000)
    a = softsae.soft_topk(x, k, 1e-3, backend=backend)
    b = softsae.soft_topk(x, k, 1e-3, backend=backend)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- soft top-k gradients


def grads(backend, x, k, alpha, w, largest, gate):
    """d/dx, d/dk, d/dalpha of sum(w * out) through the public API."""
    x = x.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    (fn(x, k, a, largest=largest, backend=backend).double() * w).sum().backward()
    return x.grad, k.grad, a.grad


def grad_scales(x, k, alpha, w, largest, gate):
    """Sizes of the terms each gradient sums (its results may cancel to ~0): error scales."""
    x64 = x.double()
    _, t = soft_topk_fwd_ref(x64, k, alpha, largest, gate)
    u = ((x64 if largest else -x64) - t[:, None]) / alpha
    f = 0.5 * torch.exp(-u.abs())
    g = w * (x64 if gate else 1)
    dx = (f / alpha * (g.abs() + g.abs().amax(-1, keepdim=True))).amax() + (w.abs().max() if gate else 0)
    dk = g.abs().max()
    da = (g.abs() * f / alpha * (u.abs() + u.abs().amax(-1, keepdim=True))).sum(-1).sum()
    _, _, ds = soft_topk_bwd_ref(w, x64, t, alpha, largest, gate)  # per-row parts of d/dalpha
    return dx.item(), dk.item(), max(da.item(), ds.abs().sum().item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("r", "n"), [(1, 1), (64, 7), (16, 1000), (8, 4097), (2, 65536)])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("largest", "gate"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_float64(backend, r, n, alpha, largest, gate, dtype):
    x = rows(r, n, "randn", dtype)
    k = rand_k(r, n)
    w = torch.randn(r, n, dtype=torch.float64, device=DEV)
    got = grads(backend, x, k, alpha, w, largest, gate)
    want = grads("reference", x.double(), k, alpha, w, largest, gate)
    # float32 flushes terms below its range to 0 (design.md: dx uses the true, underflowed f)
    rtol, floor = (1e-3, 1e-30) if dtype == torch.float32 else (1e-8, 1e-300)
    scales = grad_scales(x, k, alpha, w, largest, gate)
    for name, a, b, scale in zip(("x", "k", "alpha"), got, want, scales, strict=True):
        assert max_err(a, b) <= rtol * scale + floor, name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("gate", [False, True])
def test_half_gradients_no_worse_than_reference(backend, dtype, gate):
    x = rows(32, 777, "randn", dtype)
    k = rand_k(32, 777)
    w = torch.randn(32, 777, dtype=torch.float64, device=DEV).to(dtype).double()
    exact = grads("reference", x.double(), k, 0.05, w, True, gate)
    got = grads(backend, x, k, 0.05, w, True, gate)
    ref = grads("reference", x, k, 0.05, w, True, gate)  # same precision, float64 inside
    for name, a, b, e in zip(("x", "k", "alpha"), got, ref, exact, strict=True):
        assert max_err(a, e) <= 3 * max_err(b, e) + 1e-3 * amax(e), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_when_all_f_underflow(backend, dtype):
    """Clusters of 4 values 1 apart, k = 4, alpha = 1e-3: t sits mid-gap with |u| ~ 500 for
    every element, so every f underflows in float32. The ratios A/S and C/S must still be
    right (design.md), and finite input never gives NaN."""
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0] * 4], dtype=dtype, device=DEV)
    x = x + torch.arange(20, device=DEV) * 1e-3
    k = torch.tensor([4.0], dtype=torch.float64, device=DEV)
    w = torch.randn(1, 20, dtype=torch.float64, device=DEV)
    got = grads(backend, x, k, 1e-3, w, True, False)
    want = grads("reference", x.double(), k, 1e-3, w, True, False)
    assert all(torch.isfinite(g).all() for g in got)
    assert max_err(got[1], want[1]) <= 2e-3 * w.abs().max().item()  # dk = A/S


# ----------------------------------------------------------------------------- sparse decode


def sparse_case(B, K, n, d, dtype, pattern):
    idx = torch.randint(0, n, (B, K))
    if pattern == "padded":
        idx[torch.rand(B, K) < 0.3] = -1
        if B > 1:
            idx[-1] = -1  # a row with no active latent
    elif pattern == "duplicates" and K > 1:
        idx[:, 1] = idx[:, 0]
    vals = torch.randn(B, K).to(DEV, dtype).requires_grad_(True)
    W = torch.randn(n, d).to(DEV, dtype).requires_grad_(True)
    b = torch.randn(d).to(DEV, dtype).requires_grad_(True)
    return vals, idx.to(DEV), W, b


def dense_grads(vals, idx, W, b, go):
    """Dense z @ W + b in float64 and its gradients."""
    v, Wd, bd = (t.detach().double().requires_grad_(True) for t in (vals, W, b))
    z = torch.zeros(v.shape[0], Wd.shape[0], dtype=torch.float64, device=DEV)
    z = z.scatter_add(1, idx.clamp(min=0), torch.where(idx >= 0, v, 0.0))
    out = z @ Wd + bd
    out.backward(go.double())
    return out.detach(), v.grad, Wd.grad, bd.grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("B", "K", "n", "d"), [(1, 1, 1, 1), (7, 5, 40, 37), (64, 32, 4096, 512),
                                                 (300, 64, 100, 768), (5, 0, 10, 16), (3, 600, 50, 24)])
@pytest.mark.parametrize("pattern", ["random", "padded", "duplicates"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
@pytest.mark.parametrize("deterministic", [True, False])
def test_sparse_decode_matches_dense(backend, B, K, n, d, pattern, dtype, deterministic):
    vals, idx, W, b = sparse_case(B, K, n, d, dtype, pattern)
    out = softsae.sparse_decode(vals, idx, W, b, backend=backend, deterministic=deterministic)
    assert out.dtype == dtype and out.shape == (B, d)
    go = torch.randn(B, d, device=DEV).to(dtype)
    out.backward(go)
    want = dense_grads(vals, idx, W, b, go)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for name, a, e in zip(("out", "vals", "W", "b"), (out, vals.grad, W.grad, b.grad), want, strict=True):
            assert max_err(a, e) <= tol * max(1.0, amax(e)), name
    else:  # flash-attention habit: no worse than a few times the reference run in this dtype
        v2, W2, b2 = (t.detach().clone().requires_grad_(True) for t in (vals, W, b))
        ref = softsae.sparse_decode(v2, idx, W2, b2, backend="reference")
        ref.backward(go)
        for name, a, r_, e in zip(("out", "vals", "W", "b"), (out, vals.grad, W.grad, b.grad),
                                  (ref, v2.grad, W2.grad, b2.grad), want, strict=True):
            assert max_err(a, e) <= 3 * max_err(r_, e) + 1e-3 * max(1.0, amax(e)), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sparse_decode_deterministic_dW_is_bitwise_repeatable(backend):
    vals, idx, W, _ = sparse_case(512, 64, 128, 256, torch.float32, "duplicates")  # hot latents
    outs = []
    for _ in range(2):
        W.grad = None
        softsae.sparse_decode(vals, idx, W, backend=backend, deterministic=True).sum().backward()
        outs.append(W.grad.clone())
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sparse_decode_without_bias_and_noncontiguous_inputs(backend):
    vals, idx, W, _ = sparse_case(16, 8, 64, 96, torch.float32, "padded")
    Wt = W.detach().T.contiguous().T  # non-contiguous view of the same values
    out = softsae.sparse_decode(vals.detach(), idx.int(), Wt, None, backend=backend)
    want = softsae.sparse_decode(vals.detach(), idx, W.detach(), None, backend="reference")
    assert max_err(out, want) <= 1e-5
