"""Sparse decode against the dense reference ``z @ W_dec + b_dec`` (forward and all gradients),
topk_per_row against a brute-force stable sort, and a whole SAE step sparse vs dense."""

from __future__ import annotations

import pytest
import torch
from helpers import HALF, HALF_ERR_RATIO, cpu_backends, cpu_isa_params, use_cpu_isa

import softsae
from softsae.ops.sparse_decode_ref import densify

BACKENDS = cpu_backends()


def make_pairs(B: int, n: int, k_mean: int, pattern: str, dtype=torch.float64):
    """Padded (vals, idx) with per-row k varying; pattern picks where the padding sits."""
    K = max(1, 2 * k_mean) if pattern != "empty" else 0
    idx = torch.randint(0, n, (B, K))
    vals = torch.randn(B, K, dtype=dtype)
    if K:
        ks = torch.randint(0, K + 1, (B,))
        ks[0] = 0  # a row with no active latent
        ks[-1] = K  # a full row
        pad = torch.arange(K)[None, :] >= ks[:, None]
        if pattern == "scattered":  # padding anywhere, not only at the end
            pad = pad[:, torch.randperm(K)]
        if pattern == "duplicates":  # the same latent twice in a row
            idx[:, 1] = idx[:, 0]
        idx = torch.where(pad, -1, idx)
    return vals, idx


def dense_decode(vals, idx, W, b):
    z = densify(vals, idx, W.shape[0])
    return z @ W + (b if b is not None else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["tail", "scattered", "duplicates", "empty"])
@pytest.mark.parametrize(("B", "n", "d", "k_mean"), [(1, 1, 1, 1), (17, 50, 9, 5), (64, 65536, 8, 16),
                                                        (8, 64, 2304, 8), (300, 2000, 130, 40)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_grads_match_dense(backend, pattern, B, n, d, k_mean, with_bias):
    vals, idx = make_pairs(B, n, k_mean, pattern)
    W = torch.randn(n, d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64) if with_bias else None
    leaves = [vals.requires_grad_(), W.requires_grad_()] + ([b.requires_grad_()] if with_bias else [])
    out = softsae.sparse_decode(vals, idx, W, b, backend=backend)
    want = dense_decode(vals, idx, W, b)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, leaves, g)
    want_grads = torch.autograd.grad(want, leaves, g)
    for got, exp in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)
    if idx.numel():
        assert torch.all(got_grads[0][idx == -1] == 0), "padding gets a zero gradient"


@pytest.mark.parametrize("isa", cpu_isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("B", "n", "d", "k_mean"), [(17, 50, 9, 5), (8, 64, 2304, 8), (300, 2000, 130, 40),
                                                        (33, 700, 61, 30)])
def test_every_cpu_isa_matches_dense(isa, dtype, B, n, d, k_mean):
    """The cpu backend's row loops on each instruction set (they follow the soft top-k's dispatch):
    forward, dvals, dW and (through the sparse encoder backward) dx, dW_enc, db against dense."""
    vals, idx = make_pairs(B, n, k_mean, "scattered", dtype)
    W = torch.randn(n, d, dtype=dtype)
    b = torch.randn(d, dtype=dtype)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}
    leaves = [vals.requires_grad_(), W.requires_grad_(), b.requires_grad_()]
    with use_cpu_isa(isa):
        out = softsae.sparse_decode(vals, idx, W, b, backend="cpu")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want_out = dense_decode(exact[0], idx, exact[1], exact[2])
    want = torch.autograd.grad(want_out, exact, g.double())
    torch.testing.assert_close(out.double(), want_out, **tol)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_low_precision(backend, dtype):
    vals, idx = make_pairs(64, 4096, 32, "scattered", dtype=torch.float32)
    W = torch.randn(4096, 256) / 16
    out = softsae.sparse_decode(vals.to(dtype), idx, W.to(dtype), backend=backend)
    assert out.dtype == dtype
    truth = dense_decode(vals.to(dtype).double(), idx, W.to(dtype).double(), None)
    torch_err = ((densify(vals.to(dtype), idx, 4096) @ W.to(dtype)).double() - truth).abs().max()
    assert (out.double() - truth).abs().max() <= HALF_ERR_RATIO * torch_err + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    vals, idx = make_pairs(6, 12, 3, "duplicates")
    W = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    vals.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, W, b: softsae.sparse_decode(v, idx, W, b, backend=backend),
                                    (vals, W, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_W_and_int32_idx(backend):
    vals, idx = make_pairs(20, 30, 4, "tail")
    Wt = torch.randn(7, 30, dtype=torch.float64).T.requires_grad_()
    out = softsae.sparse_decode(vals, idx.int(), Wt, backend=backend)
    torch.testing.assert_close(out, dense_decode(vals, idx, Wt, None))
    out.sum().backward()
    assert Wt.grad.shape == (30, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_dW_is_bitwise_repeatable(backend):
    vals, idx = make_pairs(512, 64, 16, "duplicates", dtype=torch.float32)
    W = torch.randn(64, 32, requires_grad=True)
    grads = []
    for _ in range(3):
        out = softsae.sparse_decode(vals, idx, W, backend=backend, deterministic=True)
        grads.append(torch.autograd.grad(out.sum(), W)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(2, 3), torch.tensor([[0, 1, 9], [0, 0, 0]]), torch.randn(9, 4)), ValueError, r"idx must lie"),
        ((torch.randn(2, 3), torch.tensor([[0, 1, -2], [0, 0, 0]]), torch.randn(9, 4)), ValueError, r"idx must lie"),
        ((torch.randn(2, 3), torch.zeros(2, 2, dtype=torch.int64), torch.randn(9, 4)), ValueError, "same shape"),
        ((torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int64), torch.randn(9)), ValueError, "W_dec"),
        ((torch.randn(2, 3), torch.zeros(2, 3), torch.randn(9, 4)), TypeError, "idx must be"),
        ((torch.randn(2, 3).double(), torch.zeros(2, 3, dtype=torch.int64), torch.randn(9, 4)), TypeError,
         "same dtype"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        softsae.sparse_decode(*args)


def test_bad_bias():
    with pytest.raises(ValueError, match="b_dec"):
        softsae.sparse_decode(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int64), torch.randn(9, 4),
                              torch.randn(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    vals, idx = make_pairs(16, 40, 4, "tail", dtype=torch.float32)
    W = torch.randn(40, 8, requires_grad=True)

    def f(v, W):
        return softsae.sparse_decode(v, idx, W, backend=backend).square().sum()

    v = vals.requires_grad_()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(v, W), (v, W))
    want = torch.autograd.grad(f(v, W), (v, W))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- topk_per_row


def brute_topk_per_row(z, k):
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices  # ties: lower index first
    K = int(k.max()) if len(k) else 0
    idx = torch.full((z.shape[0], K), -1, dtype=torch.int64)
    for b in range(z.shape[0]):
        idx[b, : int(k[b])] = order[b, : int(k[b])]
    vals = torch.where(idx >= 0, z.gather(1, idx.clamp(min=0)), 0)
    return vals, idx


@pytest.mark.parametrize("kind", ["randn", "ties", "relu"])
def test_topk_per_row_exact(kind):
    z = torch.randn(64, 300)
    if kind == "ties":
        z = torch.round(z * 2) / 2
    if kind == "relu":
        z = torch.relu(z - 1.0)  # many exact zeros tie at the boundary
    k = torch.randint(0, 80, (64,))
    k[0] = 0
    vals, idx = softsae.topk_per_row(z, k)
    want_vals, want_idx = brute_topk_per_row(z, k)
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals, want_vals)


def test_topk_per_row_edges_and_grad():
    z = torch.randn(5, 10, requires_grad=True)
    vals, idx = softsae.topk_per_row(z, 0)
    assert vals.shape == (5, 0)
    vals, idx = softsae.topk_per_row(z, torch.tensor([1.9, 0.0, 10.0, 25.0, 3.0]))  # floored, clamped
    assert (idx >= 0).sum(-1).tolist() == [1, 0, 10, 10, 3]
    vals.sum().backward()
    assert z.grad.sum() == 24
    with pytest.raises(ValueError, match="one value per row"):
        softsae.topk_per_row(z, torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        softsae.topk_per_row(torch.full((2, 3), float("nan")), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_step_sparse_equals_dense(backend):
    """Encode -> hard top-k -> decode: sparse decode gives the dense SAE's loss and gradients."""
    d, n, B = 16, 128, 32
    W_enc = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, d, dtype=torch.float64)
    k = torch.randint(1, 12, (B,))

    def loss(sparse: bool):
        pre = torch.relu((x - b_dec) @ W_enc.T)
        vals, idx = softsae.topk_per_row(pre, k)
        if sparse:
            x_hat = softsae.sparse_decode(vals, idx, W_dec, b_dec, backend=backend)
        else:
            x_hat = densify(vals, idx, n) @ W_dec + b_dec
        return (x - x_hat).square().sum(-1).mean()

    ls, ld = loss(True), loss(False)
    torch.testing.assert_close(ls, ld)
    for a, b in zip(torch.autograd.grad(ls, (W_enc, W_dec, b_dec)), torch.autograd.grad(ld, (W_enc, W_dec, b_dec)),
                    strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- sync-free options


def test_index_validation_flag(monkeypatch):
    vals, W = torch.randn(2, 3), torch.randn(5, 4)
    bad = torch.tensor([[0, 1, 5], [0, -1, 2]])
    with pytest.raises(ValueError, match="idx must lie in"):
        softsae.sparse_decode(vals, bad, W)  # CPU: checked by default
    with pytest.raises(ValueError, match="idx must lie in"):
        softsae.sparse_decode(vals, bad, W, validate=True)
    with pytest.raises(TypeError, match="validate"):
        softsae.sparse_decode(vals, bad.clamp(max=4), W, validate="yes")
    from softsae.ops.sparse_decode import _should_validate

    cuda = torch.device("cuda")
    monkeypatch.delenv("SOFTSAE_CHECK_INDICES", raising=False)
    assert not _should_validate(None, cuda) and _should_validate(True, cuda) and _should_validate(None, W.device)
    assert not _should_validate(False, W.device)
    monkeypatch.setenv("SOFTSAE_CHECK_INDICES", "1")
    assert _should_validate(None, cuda)


@pytest.mark.parametrize("kind", ["randn", "ties", "relu", "constant"])
@pytest.mark.parametrize("k_max", [None, 1, 7, 299, 300])
def test_topk_per_row_cpu_path_equals_exact_path(kind, k_max):
    """The CPU path (one narrow topk, boundary-tie rows redone exactly) equals the dense tie rule."""
    from softsae.ops.topk_per_row import _topk_exact

    torch.manual_seed(1)
    z = {"randn": torch.randn(48, 300), "ties": torch.round(torch.randn(48, 300) * 2) / 2,
         "relu": torch.relu(torch.randn(48, 300) - 1.5), "constant": torch.ones(48, 300)}[kind]
    k = torch.randint(0, 301, (48,))
    k[:3] = torch.tensor([0, 300, 1])
    vals, idx = softsae.topk_per_row(z, k, k_max=k_max)
    width = idx.shape[1]
    want_vals, want_idx = _topk_exact(z, k.clamp(0, width), width)
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals, want_vals)


def test_topk_per_row_static_k_max():
    torch.manual_seed(0)
    z = torch.randn(6, 30)
    k = torch.tensor([0, 1, 4, 7, 30, 3])
    vals, idx = softsae.topk_per_row(z, k)
    v9, i9 = softsae.topk_per_row(z, k, k_max=32)  # wider than n: clipped to n
    assert i9.shape == (6, 30)
    assert torch.equal(i9[:, : idx.shape[1]], idx) and (i9[:, idx.shape[1]:] == -1).all()
    v3, i3 = softsae.topk_per_row(z, k, k_max=3)  # narrower: each row keeps its 3 largest
    want_v, want_i = softsae.topk_per_row(z, k.clamp(max=3))
    assert torch.equal(i3, want_i) and torch.equal(v3, want_v)
    assert softsae.topk_per_row(z, 5)[1].shape == (6, 5)
    with pytest.raises(ValueError, match="k_max"):
        softsae.topk_per_row(z, k, k_max=-2)
    nan = torch.full((2, 3), float("nan"))
    softsae.topk_per_row(nan, 1, check_nan=False)  # opt-out: no check, no error
    with pytest.raises(ValueError, match="NaN"):
        softsae.topk_per_row(nan, 1)
