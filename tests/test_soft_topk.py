"""Soft Top-K: the reference against an independent oracle, every CPU backend against the
reference, gradients, edge cases, bad input and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ALPHAS, HALF, HALF_ERR_RATIO, TOL, bisection_oracle, cpu_backends, laplace_cdf, make_rows, rand_k

import softsae
from softsae.ops.soft_topk_ref import soft_topk_fwd_ref

BACKENDS = cpu_backends()

def exact64(x: torch.Tensor, k: torch.Tensor, alpha: float, largest: bool = True) -> torch.Tensor:
    """float64 solution on the given (possibly float32) inputs, via the reference."""
    return softsae.soft_topk(x.double(), k.double(), alpha, largest=largest, backend="reference")


# ----------------------------------------------------------------------------- reference vs oracle


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_reference_matches_bisection_oracle(n, alpha, kind):
    x = make_rows(12, n, kind)
    k = rand_k(12, n)
    p = softsae.soft_topk(x, k, alpha, backend="reference")
    torch.testing.assert_close(p, bisection_oracle(x, k, alpha), atol=TOL[torch.float64].p, rtol=0)
    assert torch.all((p.sum(-1) - k).abs() <= 1e-9 * k.clamp(min=1))


def test_reference_properties_and_hard_limit():
    x = torch.randn(8, 50, dtype=torch.float64)
    k = torch.randint(1, 49, (8,)).double()
    p = softsae.soft_topk(x, k, 1e-6, backend="reference")
    assert torch.all((p >= 0) & (p <= 1))
    order = x.argsort(-1)
    assert torch.all(p.gather(-1, order).diff(dim=-1) >= 0), "p must be monotone in x"
    hard = torch.stack([torch.zeros(50, dtype=torch.float64).scatter_(0, x[i].topk(int(k[i])).indices, 1.0)
                        for i in range(8)])
    torch.testing.assert_close(p, hard, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 64, 1000, 4097])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_float32_accuracy(backend, n, alpha, kind):
    x = make_rows(16, n, kind).float()
    k = rand_k(16, n)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    assert p.dtype == torch.float32
    p64 = exact64(x, k, alpha)
    tol = TOL[torch.float32]
    assert (p.double() - p64).abs().max() <= tol.p
    assert torch.all((p.double().sum(-1) - k).abs() <= tol.sum_rel * k.clamp(min=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 5, 333, 4096])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_float64_accuracy(backend, n, alpha):
    x = make_rows(8, n)
    k = rand_k(8, n)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    torch.testing.assert_close(p, bisection_oracle(x, k, alpha), atol=TOL[torch.float64].p, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("rows", "n"), [(0, 10), (3, 0), (4096, 8), (2, 65536), (256, 16384)])
def test_shapes(backend, rows, n):
    x = torch.randn(rows, n)
    k = (torch.rand(rows) * n).clamp(0.5, max(n - 0.5, 0.5))
    p = softsae.soft_topk(x, k, 1e-4, backend=backend)
    assert p.shape == x.shape
    if rows and n:
        assert torch.all((p.double().sum(-1) - k.double().clamp(1e-6, n - 1e-6)).abs()
                         <= 1e-4 * k.double().clamp(min=1))
        if rows * n <= 4096 * 8 or n == 16384:
            sub = slice(0, 8)
            ref = exact64(x[sub], k[sub], 1e-4)
            assert (p[sub].double() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_no_worse_than_pytorch(backend, dtype):
    """flash-attention habit: error of the kernel on half input vs. the float64 truth on the same
    half input must be no worse than a few times the error PyTorch's own half rounding makes."""
    x = torch.randn(32, 777).to(dtype)
    k = rand_k(32, 777)
    p = softsae.soft_topk(x, k, 0.05, backend=backend)
    assert p.dtype == dtype
    truth = exact64(x, k, 0.05)
    rounding = (truth.to(dtype).double() - truth).abs().max()
    assert (p.double() - truth).abs().max() <= HALF_ERR_RATIO * rounding + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
def test_layouts_dim_noncontiguous_largest(backend, gate):
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    x = torch.randn(6, 40, 5, dtype=torch.float64)
    k = torch.rand(6, 5, dtype=torch.float64) * 39 + 0.5
    for largest in (True, False):
        out = fn(x, k, 0.1, dim=1, largest=largest, backend=backend)
        xm = x.transpose(1, 2).reshape(-1, 40)
        p = softsae.soft_topk(xm, k.reshape(-1), 0.1, largest=largest, backend="reference")
        want = (xm * p if gate else p).reshape(6, 5, 40).transpose(1, 2)
        torch.testing.assert_close(out, want, atol=1e-9, rtol=0)
    # non-contiguous input along the last axis, k with a size-1 dim
    xt = torch.randn(40, 7, dtype=torch.float64).T
    assert not xt.is_contiguous()
    out = fn(xt, torch.full((7, 1), 3.0, dtype=torch.float64), 0.1, backend=backend)
    ref = softsae.soft_topk(xt.contiguous(), 3.0, 0.1, backend="reference")
    torch.testing.assert_close(out, xt * ref if gate else ref, atol=1e-9, rtol=0)
    # largest=False equals largest=True on -x
    p_small = softsae.soft_topk(x[:, :, 0], k[:, 0], 0.3, largest=False, backend=backend)
    p_neg = softsae.soft_topk(-x[:, :, 0], k[:, 0], 0.3, backend="reference")
    torch.testing.assert_close(p_small, p_neg, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("alpha", [0.05, 1.0, -0.5])
def test_gradcheck(backend, gate, largest, alpha):
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.7, 2.5, 4.0, 8.2], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, a: fn(x, k, a, largest=largest, backend=backend), (x, k, a))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("alpha", [1e-4, 1e-2, 3.0])
def test_float32_gradients_match_float64(backend, gate, alpha):
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    x32 = (torch.randn(32, 300) * 0.01 * (1 + 100 * alpha)).requires_grad_()
    k = (torch.rand(32) * 290 + 5).requires_grad_()
    a = torch.tensor(alpha, requires_grad=True)
    g = torch.randn(32, 300)
    (fn(x32, k, a, backend=backend) * g).sum().backward()
    x64, k64, a64 = (t.detach().double().requires_grad_() for t in (x32, k, a))
    (fn(x64, k64, a64, backend="reference") * g.double()).sum().backward()
    for got, want in ((x32.grad, x64.grad), (k.grad, k64.grad), (a.grad, a64.grad)):
        scale = want.abs().max().clamp(min=1e-12)
        assert ((got.double() - want).abs().max() / scale) < 2e-3


def test_gradient_when_all_f_underflow():
    """t in a gap far wider than alpha: every f underflows, yet dk must stay exact and finite."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    for backend in BACKENDS:
        p = softsae.soft_topk(x, k, 1e-4, backend=backend)
        g = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
        dx, dk = torch.autograd.grad((p * g).sum(), (x, k))
        assert torch.isfinite(dx).all() and torch.isfinite(dk).all()
        # nearest elements to t (1.0 and 2.0) are equidistant: dk = mean of their g = 2.5
        torch.testing.assert_close(dk, torch.tensor([2.5], dtype=torch.float64))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_is_clamped(backend):
    x = torch.randn(3, 6, dtype=torch.float64)
    k = torch.tensor([-1.0, 0.0, 99.0], dtype=torch.float64, requires_grad=True)
    p = softsae.soft_topk(x, k, 0.1, backend=backend)
    torch.testing.assert_close(p.sum(-1), torch.tensor([1e-6, 1e-6, 6 - 1e-6], dtype=torch.float64))
    p.sum().backward()
    assert torch.all(k.grad == 0), "the clamp is active, so dk must be 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_equals_one_and_empty(backend):
    x = torch.randn(5, 1)
    k = torch.tensor([0.1, 0.5, 0.9, 2.0, 0.0])
    p = softsae.soft_topk(x, k, 0.5, backend=backend)
    torch.testing.assert_close(p[:, 0], k.clamp(1e-6, 1 - 1e-6))
    for shape in ((0, 4), (4, 0), (0, 0)):
        xe = torch.randn(shape, requires_grad=True)
        out = softsae.soft_topk_gate(xe, 1.0, 0.1, backend=backend)
        assert out.shape == shape
        out.sum().backward()
        assert xe.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rows_give_nan_rows(backend, bad):
    x = torch.randn(4, 20)
    x[1, 3] = bad
    x.requires_grad_()
    p = softsae.soft_topk(x, 5.0, 0.1, backend=backend)
    assert torch.isnan(p[1]).all()
    assert torch.isfinite(p[[0, 2, 3]]).all()
    torch.testing.assert_close(p[[0, 2, 3]].double(), exact64(x[[0, 2, 3]].detach(), torch.full((3,), 5.0), 0.1),
                               atol=1e-5, rtol=0)
    p.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2, 3]]).all()


def test_sparse_gate_is_exact():
    x = torch.relu(torch.randn(16, 500))
    k = torch.rand(16) * 40 + 1
    z = softsae.soft_topk_gate(x, k, 1e-3)
    vals, idx = softsae.soft_topk_gate(x, k, 1e-3, sparse=True)
    assert idx.shape[1] == int((z != 0).sum(-1).max())
    dense = torch.zeros_like(z).scatter_add_(1, idx.clamp(min=0), torch.where(idx >= 0, vals, 0))
    torch.testing.assert_close(dense, z, atol=0, rtol=0)
    assert torch.all((idx[:, 1:] > idx[:, :-1]) | (idx[:, 1:] == -1)), "increasing index order"
    assert torch.all(vals[idx == -1] == 0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: softsae.soft_topk(torch.arange(5), 2, 0.1), TypeError, "x must be"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), torch.ones(4), 0.1), ValueError, "k must"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, 0.0), ValueError, "alpha"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, math.nan), ValueError, "alpha"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, "big"), TypeError, "alpha"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, torch.ones(2)), ValueError, "alpha"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, 0.1, dim=2), ValueError, "dim"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, 0.1, backend="tpu"), ValueError, "backend"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), 2, 0.1, backend="cuda"), ValueError, "backend"),
        (lambda: softsae.soft_topk(torch.randn(3, 5), "2", 0.1), TypeError, "k must"),
        (lambda: softsae.soft_topk(torch.tensor(1.0), 1, 0.1), ValueError, "x must"),
        (lambda: softsae.soft_topk_gate(torch.randn(3, 5), 1, 0.1, dim=0, sparse=True), ValueError, "sparse"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="same device"):
        softsae.soft_topk(torch.randn(3, 5), torch.ones(3, device="cuda"), 0.1)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def f(x, k, a):
        return (softsae.soft_topk_gate(x, k, a, backend=backend) ** 2).sum()

    x = torch.randn(8, 64, requires_grad=True)
    k = (torch.rand(8) * 10 + 1).requires_grad_()
    a = torch.tensor(0.05, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, k, a)
    grads = torch.autograd.grad(loss, (x, k, a))
    want = torch.autograd.grad(f(x, k, a), (x, k, a))
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, exp)


def test_reference_saves_only_threshold():
    """The forward keeps t in float64 (R,), nothing of size n beyond the input."""
    x = torch.randn(4, 50)
    out, t = soft_topk_fwd_ref(x, torch.full((4,), 3.0, dtype=torch.float64), 0.1, True, False)
    assert t.dtype == torch.float64 and t.shape == (4,)
    torch.testing.assert_close(laplace_cdf((x.double() - t[:, None]) / 0.1).float(), out)


def test_torch_compile_inductor_auto_backend():
    """Default compiler (inductor) with backend="auto": no graph break, same values and grads."""

    def f(x, k, a):
        z = softsae.soft_topk_gate(x, k, a)
        return (z * torch.sigmoid(x)).sum()

    x = torch.randn(8, 64, requires_grad=True)
    k = (torch.rand(8) * 10 + 1).requires_grad_()
    a = torch.tensor(0.05, requires_grad=True)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, k, a), (x, k, a))
    want = torch.autograd.grad(f(x, k, a), (x, k, a))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- scale clamp, alpha, sparse width


@pytest.mark.parametrize("backend", cpu_backends())
def test_tiny_alpha_is_clamped_to_s_min(backend):
    """s = max(|alpha|, S_MIN = 1e-30) on every backend: 1e-35 behaves exactly like 1e-30."""
    from softsae.ops.soft_topk import S_MIN, scale_of

    assert S_MIN == 1e-30
    s = scale_of(torch.tensor(-1e-35))
    assert s.shape == (1,) and s.dtype == torch.float64 and s.item() == S_MIN
    x = torch.randn(6, 300)
    k = torch.full((6,), 7.0)
    p = softsae.soft_topk(x, k, 1e-35, backend=backend)
    assert torch.isfinite(p).all()
    assert torch.equal(p, softsae.soft_topk(x, k, 1e-30, backend=backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_alpha_tensor_validation_and_gradient_device(backend):
    x = torch.randn(4, 50, requires_grad=True)
    with pytest.raises(ValueError, match="alpha must be finite and non-zero"):
        softsae.soft_topk(x, 3.0, torch.tensor(0.0), backend=backend)  # a CPU tensor is checked
    with pytest.raises(ValueError, match="alpha must be finite and non-zero"):
        softsae.soft_topk(x, 3.0, float("nan"), backend=backend)
    a = torch.tensor([-0.1], dtype=torch.float32, requires_grad=True)  # (1,) float32, negative
    softsae.soft_topk(x, 3.0, a, backend=backend).pow(2).sum().backward()
    a64 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    softsae.soft_topk(x.detach(), 3.0, a64, backend="reference").pow(2).sum().backward()
    assert a.grad.shape == (1,) and a.grad.dtype == torch.float32
    assert a.grad.item() == pytest.approx(-a64.grad.item(), rel=1e-4, abs=1e-6)  # sign(alpha)


def test_sparse_gate_static_width():
    torch.manual_seed(0)
    x = torch.randn(5, 40).relu()
    vals, idx = softsae.soft_topk_gate(x, 4.0, 1e-3, sparse=True)
    width = idx.shape[1]
    v2, i2 = softsae.soft_topk_gate(x, 4.0, 1e-3, sparse=True, max_count=width + 3)
    assert i2.shape == (5, width + 3)
    assert torch.equal(i2[:, :width], idx) and (i2[:, width:] == -1).all() and torch.equal(v2[:, :width], vals)
    v3, i3 = softsae.soft_topk_gate(x, 4.0, 1e-3, sparse=True, max_count=1)  # narrower: lowest indices kept
    assert torch.equal(i3, idx[:, :1])
    with pytest.raises(ValueError, match="max_count"):
        softsae.soft_topk_gate(x, 4.0, 1e-3, sparse=True, max_count=-1)
