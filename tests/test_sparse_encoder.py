"""Sparse encoder backward (``softsae::sparse_encoder_bwd``) against the dense reference
``dx = dpre @ W, dW = dpre.T @ x, db = dpre.sum(0)``; ``encoder_pre``'s sparse backward against
autograd through ``relu(linear)``; and the SAE models' encoder gradients sparse vs dense.

Triton runs under ``TRITON_INTERPRET=1`` (on smaller shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import HALF, HALF_ERR_RATIO, cpu_backends

import softsae
from softsae.ops import sparse_encoder as se
from softsae.ops.sparse_decode_ref import densify
from softsae.ops.sparse_encoder_ref import compact_nonzero_ref, sparse_encoder_bwd_ref

BACKENDS = cpu_backends(include_triton=True)
COMPILED = [b for b in BACKENDS if b != "reference"]


def make_pairs(B: int, n: int, K: int, pattern: str = "scattered", dtype=torch.float64):
    """Padded (dvals, idx) (B, K) with per-row counts 0..K: padding at the tail or scattered,
    or duplicated latents in a row (summed). Row 0 is empty and the last row full when B > 1."""
    idx = torch.randint(0, max(n, 1), (B, K))
    vals = torch.randn(B, K, dtype=dtype)
    if K:
        ks = torch.randint(0, K + 1, (B,))
        if B > 1:
            ks[0], ks[-1] = 0, K
        pad = torch.arange(K)[None, :] >= ks[:, None]
        if pattern == "scattered":
            pad = pad[:, torch.randperm(K)]
        if pattern == "duplicates" and K > 1:
            idx[:, 1] = idx[:, 0]
        if pattern == "distinct":  # K distinct latents per row (topk-like), K <= n
            idx = torch.stack([torch.randperm(n)[:K] for _ in range(B)]) if B else idx
        idx = torch.where(pad, -1, idx)
    return vals, idx


def dense_grads(dvals, idx, x, W):
    g = densify(dvals, idx, W.shape[0])
    return g @ W, g.T @ x, g.sum(0)


SHAPES = [  # (B, n, d, K)
    (1, 1, 1, 0), (1, 1, 1, 1), (2, 2, 3, 2), (3, 2, 1, 1), (5, 7, 5, 7), (17, 33, 9, 4),
    (4, 4097, 16, 3), (64, 300, 130, 40), (33, 65, 17, 65),
]


def _small(backend, B, n, d, K):
    return backend != "triton" or B * max(K, 1) * max(d, 1) <= 20000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["tail", "scattered", "duplicates", "distinct"])
@pytest.mark.parametrize(("B", "n", "d", "K"), SHAPES)
def test_matches_dense(backend, pattern, B, n, d, K):
    if not _small(backend, B, n, d, K) or (pattern == "distinct" and K > n):
        pytest.skip("shape too big for the interpreter / K > n")
    dvals, idx = make_pairs(B, n, K, pattern)
    x = torch.randn(B, d, dtype=torch.float64)
    W = torch.randn(n, d, dtype=torch.float64)
    got = softsae.ops.sparse_encoder.sparse_encoder_bwd(dvals, idx, x, W, backend=backend)
    for g, w, name in zip(got, dense_grads(dvals, idx, x, W), ("dx", "dW", "db"), strict=True):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)])
def test_only_requested_grads(backend, need):
    dvals, idx = make_pairs(9, 20, 4)
    x, W = torch.randn(9, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    got = se.sparse_encoder_bwd(dvals, idx, x, W, *need, backend=backend)
    want = dense_grads(dvals, idx, x, W)
    for flag, g, w in zip(need, got, want, strict=True):
        if flag:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_low_precision(backend, dtype):
    B, n, d, K = (16, 512, 64, 8) if backend == "triton" else (64, 4096, 256, 32)
    dvals, idx = make_pairs(B, n, K, "distinct", dtype=torch.float32)
    x, W = torch.randn(B, d), torch.randn(n, d) / 16
    dvals, x, W = dvals.to(dtype), x.to(dtype), W.to(dtype)
    got = se.sparse_encoder_bwd(dvals, idx, x, W, backend=backend)
    truth = dense_grads(dvals.double(), idx, x.double(), W.double())
    own = sparse_encoder_bwd_ref(dvals, idx, x, W, True, True, True)  # accumulates in float32, rounds once
    for g, t, r in zip(got, truth, own, strict=True):
        assert g.dtype == dtype
        ref_err = (r.double() - t).abs().max()
        # another float32 summation order may round an output to the neighbouring value: one ulp
        ulp = torch.finfo(dtype).eps * t.abs().max()
        assert (g.double() - t).abs().max() <= HALF_ERR_RATIO * ref_err + ulp


@pytest.mark.parametrize("backend", COMPILED)
def test_deterministic_is_bitwise_repeatable(backend):
    B, n, d, K = (32, 50, 40, 8) if backend == "triton" else (512, 300, 96, 24)
    dvals, idx = make_pairs(B, n, K, "duplicates", dtype=torch.float32)
    idx[:, 2] = 7  # a hot latent: many pairs in one segment
    x, W = torch.randn(B, d), torch.randn(n, d)
    first = se.sparse_encoder_bwd(dvals, idx, x, W, backend=backend, deterministic=True)
    for _ in range(3):
        again = se.sparse_encoder_bwd(dvals, idx, x, W, backend=backend, deterministic=True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_deterministic_mode_is_close(backend):
    dvals, idx = make_pairs(20, 30, 5, "duplicates")
    x, W = torch.randn(20, 7, dtype=torch.float64), torch.randn(30, 7, dtype=torch.float64)
    got = se.sparse_encoder_bwd(dvals, idx, x, W, backend=backend, deterministic=False)
    for g, w in zip(got, dense_grads(dvals, idx, x, W), strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_int32_idx_and_non_contiguous():
    dvals, idx = make_pairs(10, 25, 6)
    x = torch.randn(7, 10, dtype=torch.float64).T  # (10, 7), non-contiguous
    W = torch.randn(7, 25, dtype=torch.float64).T
    for backend in BACKENDS:
        got = se.sparse_encoder_bwd(dvals.T.contiguous().T, idx.to(torch.int32), x, W, backend=backend)
        for g, w in zip(got, dense_grads(dvals, idx, x, W), strict=True):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- errors

_V, _I = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.int64)
_X, _W = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64)


@pytest.mark.parametrize(("args", "exc", "match"), [
    ((_V, _I[:, :1], _X, _W), ValueError, "dvals and idx"),
    ((_V, _I, _X[:, :3], _W), ValueError, "x must be"),
    ((_V, _I, _X, _W[0]), ValueError, "W_enc must be"),
    ((_V.float(), _I, _X, _W), TypeError, "dvals"),
    ((_V, _I, _X.float(), _W), TypeError, "x "),
    ((_V, _I.double(), _X, _W), TypeError, "idx must be int"),
    ((_V, _I + 5, _X, _W), ValueError, "idx must lie in"),
    ((_V, _I - 2, _X, _W), ValueError, "idx must lie in"),
    ((_V, _I, "x", _W), TypeError, "x must be a torch.Tensor"),
    ((_V.int(), _I, _X.int(), _W.int()), TypeError, "W_enc must be a float"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        se.sparse_encoder_bwd(*args)


def test_bad_backend_and_encoder_pre_args():
    with pytest.raises(ValueError, match="backend"):
        se.sparse_encoder_bwd(_V, _I, _X, _W, backend="nope")
    with pytest.raises(ValueError, match="W_enc must be"):
        se.encoder_pre(_X, _W[:, :3])
    with pytest.raises(ValueError, match="b_enc must be"):
        se.encoder_pre(_X, _W, torch.zeros(4))
    with pytest.raises(ValueError, match="max_density"):
        se.encoder_pre(_X, _W, None, max_density=2.0)


# ----------------------------------------------------------------------------- encoder_pre


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("relu_only", [True, False])
def test_compact_nonzero(backend, relu_only):
    g = torch.randn(9, 40, dtype=torch.float64)
    g[g.abs() < 1] = 0
    g[0] = 0
    pre = None if relu_only else torch.randn(9, 40, dtype=torch.float64)
    vals, idx, width = se.compact_nonzero(g, pre, backend)
    want_v, want_i, want_w = compact_nonzero_ref(g, pre)
    assert width == want_w == vals.shape[1]
    assert torch.equal(vals, want_v) and torch.equal(idx, want_i)
    masked = g if pre is None else g * (pre > 0)
    torch.testing.assert_close(densify(vals, idx, 40), masked, atol=0, rtol=0)
    assert vals.shape[1] == int((masked != 0).sum(1).max())
    small = se.compact_nonzero(g, pre, backend, max_width=width - 1)
    assert small[0].shape == small[1].shape == (0, 0) and small[2] > width - 1
    for bound in (width, width + 5, 1000):  # the one-pass bounded path equals the unbounded one
        v, i, w = se.compact_nonzero(g, pre, backend, max_width=bound)
        assert w == width and torch.equal(v, vals) and torch.equal(i, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_density", [0.0, 0.5, 1.0])  # 0: always dense unless dpre == 0; 1: always sparse
@pytest.mark.parametrize("with_bias", [True, False])
def test_encoder_pre_grads_equal_autograd(backend, max_density, with_bias):
    B, n, d, k = 12, 40, 7, 5
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True) if with_bias else None
    leaves = [x, W] + ([b] if with_bias else [])
    pre = se.encoder_pre(x, W, b, backend=backend, max_density=max_density)
    want_pre = F.relu(F.linear(x, W, b))
    torch.testing.assert_close(pre, want_pre, atol=0, rtol=0)
    g = torch.randn(B, n, dtype=torch.float64)

    def loss(p):  # a top-k gate: the gradient reaching pre is sparse
        vals, idx = torch.topk(p, k, dim=1)
        return (vals * g.gather(1, idx)).sum()

    got = torch.autograd.grad(loss(pre), leaves)
    want = torch.autograd.grad(loss(want_pre), leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_encoder_pre_gradcheck(backend):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    for density in (0.3, 1.0):
        def fn(x, W, b, density=density):
            return torch.topk(se.encoder_pre(x, W, b, backend=backend, max_density=density), 3).values.square()
        assert torch.autograd.gradcheck(fn, (x, W, b))


@pytest.mark.parametrize("backend", cpu_backends())
def test_sparse_encoder_bwd_gradcheck_as_a_linear_map(backend):
    """sparse_encoder_bwd is linear in dvals and the transpose of gathering pre at the pairs:
    <dvals, gather(x W^T + b)> = <x, dx> + <W, dW> + <b, db>, checked with gradcheck of the gather."""
    dvals, idx = make_pairs(5, 9, 3, "duplicates")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    lin = F.linear(x, W, b)
    picked = torch.where(idx >= 0, lin.gather(1, idx.clamp(min=0)), 0.0)
    want = torch.autograd.grad(picked, (x, W, b), dvals)
    got = se.sparse_encoder_bwd(dvals, idx, x.detach(), W.detach(), backend=backend)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    dvals, idx = make_pairs(6, 10, 3, "duplicates", dtype=torch.float32)
    x, W = torch.randn(6, 5), torch.randn(10, 5)
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.softsae.sparse_encoder_bwd.default,
                              (dvals, idx, x, W, *need, True, backend))


# ----------------------------------------------------------------------------- models


def _encoder_grads(model, x, sparse_grad: bool):
    model.zero_grad(set_to_none=True)
    model.sparse_encoder_grad = sparse_grad
    out = model.forward_train(x)
    aux = torch.topk(out.pre, 2, dim=1).values.sum()  # an AuxK-like sparse use of pre
    (out.x_hat.square().sum() + 0.1 * aux).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "softsae-hard", "softsae-soft"])
def test_models_sparse_encoder_grad_equals_dense(arch, monkeypatch):
    calls = []
    real = se.sparse_encoder_bwd
    monkeypatch.setattr(se, "sparse_encoder_bwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(se, "MAX_DENSITY", 0.25)  # n = 128: the sparse path up to 32 pairs per row
    torch.manual_seed(1)
    d, n, k = 16, 128, 4
    if arch.startswith("softsae"):
        model = softsae.SoftSAE(d, n, k, alpha=1e-6).double()
        model.hard = arch.endswith("hard")
    elif arch == "topk":
        model = softsae.TopKSAE(d, n, k).double()
    else:
        model = softsae.BatchTopKSAE(d, n, k).double()
    model.train()
    x = torch.randn(32, d, dtype=torch.float64)
    dense = _encoder_grads(model, x, False)
    assert not calls
    sparse = _encoder_grads(model, x, True)
    assert calls, "the sparse encoder backward was not taken"
    assert dense.keys() == sparse.keys()
    assert {"W_enc", "b_enc"} <= dense.keys()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-12, rtol=1e-10, msg=name)
