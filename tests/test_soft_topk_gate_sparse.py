"""Fused sparse soft top-k gate (``soft_topk_gate(..., sparse=True)`` on CPU tensors, the op
``softsae::soft_topk_gate_sparse_fwd``) against the dense gate followed by ``nonzero_per_row``:
values, index sets, widths, and gradients to x, k and alpha."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_backends, make_rows, rand_k

import softsae
from softsae.ops.soft_topk import nonzero_per_row

BACKENDS = cpu_backends()  # reference and cpu: the backends of the fused path


def dense_then_compact(x, k, alpha, backend, max_count=None):
    return nonzero_per_row(softsae.soft_topk_gate(x, k, alpha, backend=backend), max_count)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1e-5, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize(("R", "n"), [(1, 1), (3, 2), (5, 7), (4, 4097), (9, 300)])
def test_matches_dense_then_compact(backend, dtype, alpha, R, n):
    x = make_rows(R, n, "relu", dtype=dtype)
    k = rand_k(R, n)
    vals, idx = softsae.soft_topk_gate(x, k, alpha, backend=backend, sparse=True)
    want_v, want_i = dense_then_compact(x, k, alpha, backend)
    assert vals.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(idx, want_i)  # the same index sets, in the same (increasing) order
    torch.testing.assert_close(vals, want_v, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_equal_dense_path(backend):
    x = make_rows(6, 50, "randn").requires_grad_()
    k = rand_k(6, 50).requires_grad_()
    alpha = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    vals, idx = softsae.soft_topk_gate(x, k, alpha, backend=backend, sparse=True)
    dv, di = dense_then_compact(x, k, alpha, backend)
    assert torch.equal(idx, di)
    g = torch.randn_like(vals)
    got = torch.autograd.grad((vals * g).sum(), (x, k, alpha))
    want = torch.autograd.grad((dv * g).sum(), (x, k, alpha))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = torch.randn(3, 9, dtype=torch.float64)
    x = (x + 0.5 * x.sign()).requires_grad_()  # no zero entries: the non-zero set (and width) is stable
    k = rand_k(3, 9).requires_grad_()
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, k, a: softsae.soft_topk_gate(x, k, a, backend=backend, sparse=True)[0], (x, k, alpha))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_count_and_batch_shape(backend):
    x = make_rows(12, 40, "relu", dtype=torch.float32).reshape(3, 4, 40)
    k = rand_k(12, 40).reshape(3, 4)
    vals, idx = softsae.soft_topk_gate(x, k, 1e-3, backend=backend, sparse=True)
    want_v, want_i = dense_then_compact(x, k, 1e-3, backend)
    assert vals.shape[:2] == (3, 4) and torch.equal(idx, want_i) and torch.equal(vals, want_v)
    width = idx.shape[-1]
    for mc in (0, 1, width + 3):
        v, i = softsae.soft_topk_gate(x, k, 1e-3, backend=backend, sparse=True, max_count=mc)
        wv, wi = dense_then_compact(x, k, 1e-3, backend, max_count=mc)
        assert i.shape[-1] == min(mc, 40) and torch.equal(i, wi) and torch.equal(v, wv)
    with pytest.raises(ValueError, match="max_count"):
        softsae.soft_topk_gate(x, k, 1e-3, backend=backend, sparse=True, max_count=-1)


def test_half_precision_on_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("no CPU extension")
    x = make_rows(5, 64, "relu", dtype=torch.float32)
    k = rand_k(5, 64)
    for dtype in (torch.float16, torch.bfloat16):
        vals, idx = softsae.soft_topk_gate(x.to(dtype), k, 1e-3, backend="cpu", sparse=True)
        want_v, want_i = dense_then_compact(x.to(dtype), k, 1e-3, "cpu")
        assert vals.dtype == dtype and torch.equal(idx, want_i) and torch.equal(vals, want_v)


def test_empty_and_errors():
    vals, idx = softsae.soft_topk_gate(torch.zeros(0, 5), 1.0, 0.1, sparse=True)
    assert vals.shape == idx.shape == (0, 0)
    with pytest.raises(ValueError, match="sparse=True needs dim=-1"):
        softsae.soft_topk_gate(torch.randn(3, 5), 1, 0.1, dim=0, sparse=True)
    with pytest.raises(TypeError, match="x must be"):
        softsae.soft_topk_gate("x", 1, 0.1, sparse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = make_rows(4, 30, "relu", dtype=torch.float32)
    k = rand_k(4, 30)
    alpha = torch.tensor(1e-3, dtype=torch.float64)
    for mc in (-1, 5):
        torch.library.opcheck(torch.ops.softsae.soft_topk_gate_sparse_fwd.default, (x, k, alpha, True, mc, backend),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)
TRITON = [b for b in cpu_backends(include_triton=True) if b == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("alpha", [1e-4, 1.0])
@pytest.mark.parametrize(("R", "n"), [(1, 1), (3, 2), (5, 7), (9, 300), (2, 4097)])
def test_triton_matches_its_dense_gate_then_compact(backend, dtype, alpha, R, n):
    """The fused Triton path (t from the forward kernel without its dense output, then one program
    per row writing the non-zeros) gives bit for bit what the dense Triton gate + compaction gives."""
    x = make_rows(R, n, "relu", dtype=dtype)
    k = rand_k(R, n)
    vals, idx = softsae.soft_topk_gate(x, k, alpha, backend=backend, sparse=True)
    want_v, want_i = dense_then_compact(x, k, alpha, backend)
    assert vals.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(vals, want_v, atol=0, rtol=0)
    for m in (0, 1, max(1, want_i.shape[1] - 1), n + 3):  # a static width: no count pass, lowest indices kept
        v_m, i_m = softsae.soft_topk_gate(x, k, alpha, backend=backend, sparse=True, max_count=m)
        w_v, w_i = dense_then_compact(x, k, alpha, backend, max_count=m)
        assert torch.equal(i_m, w_i), m
        torch.testing.assert_close(v_m, w_v, atol=0, rtol=0)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_gradients_and_nan_rows(backend):
    x = make_rows(6, 50, "randn").requires_grad_()
    k = rand_k(6, 50).requires_grad_()
    vals, idx = softsae.soft_topk_gate(x, k, 0.02, backend=backend, sparse=True)
    dv, di = dense_then_compact(x, k, 0.02, "reference")
    assert torch.equal(idx, di)
    g = torch.randn_like(vals)
    got = torch.autograd.grad((vals * g).sum(), (x, k))
    want = torch.autograd.grad((dv * g).sum(), (x, k))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    xn = make_rows(3, 20, "randn", dtype=torch.float32)
    xn[1, 4] = float("nan")
    vals, idx = softsae.soft_topk_gate(xn, 5.0, 0.1, backend=backend, sparse=True)
    want_v, want_i = dense_then_compact(xn, 5.0, 0.1, backend)
    assert torch.equal(idx, want_i) and torch.isnan(vals[1][idx[1] >= 0]).all()
