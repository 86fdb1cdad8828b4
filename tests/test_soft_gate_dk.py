"""The k-derivative of the soft gate (softsae/ops/soft_gate_dk.py) against autograd through the
dense gate: for any upstream gradient g, sum_i g_i c_i must equal dL/dk of L = sum(g * z)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cpu_backends, make_rows, rand_k

import softsae
from softsae.ops.soft_gate_dk import DK_CUT, soft_gate_dk, soft_topk_threshold

BACKENDS = cpu_backends()


def autograd_dk(x, k, alpha, g, backend):
    kk = k.clone().requires_grad_()
    z = softsae.soft_topk_gate(x, kk, alpha, backend=backend)
    return torch.autograd.grad((z.double() * g).sum(), kk)[0]


def sparse_dot(vals, idx, g):
    return (vals * g.gather(1, idx.clamp(min=0)) * (idx >= 0)).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1e-5, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize("kind", ["relu", "randn", "ties"])
@pytest.mark.parametrize(("R", "n"), [(1, 1), (3, 2), (6, 7), (9, 300), (4, 3001)])
def test_coefficients_give_autograd_dk(backend, dtype, alpha, kind, R, n):
    torch.manual_seed(R * n)
    x = make_rows(R, n, kind, dtype=dtype)
    k = rand_k(R, n, integer_half=True)
    g = torch.randn(R, n, dtype=torch.float64)
    want = autograd_dk(x, k, alpha, g, backend)
    dense = soft_gate_dk(x, k, alpha, backend=backend, sparse=False)
    vals, idx = soft_gate_dk(x, k, alpha, backend=backend)
    assert dense.shape == x.shape and dense.dtype == dtype
    assert vals.dtype == torch.float64 and idx.dtype == torch.int64 and vals.shape == idx.shape
    scale = (dense.double().abs() * g.abs()).sum(1).clamp_min(1e-30)
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # float32: the autograd path's own rounding
    assert ((dense.double() * g).sum(1) - want).abs().div(scale).max() <= tol
    # a dropped entry has f_i <= e^-cut max_j f_j, so its c_i <= |x_i| e^-cut
    dropped = math.exp(-DK_CUT) * (x.double().abs() * g.abs()).sum(1)
    assert torch.all((sparse_dot(vals, idx, g) - want).abs() <= tol * scale + dropped)
    # the kept entries are in increasing index order, pads at the end, never a zero of x
    valid = idx >= 0
    assert torch.all(valid[:, :-1] | ~valid[:, 1:]) if idx.shape[1] > 1 else True
    kept = idx.clamp(min=0)
    assert torch.all((x.gather(1, kept) != 0) | ~valid)
    if idx.shape[1] > 1:
        assert torch.all((idx[:, 1:] > idx[:, :-1]) | ~valid[:, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_alpha_keeps_only_the_entries_near_the_threshold(backend):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(16, 4096, dtype=torch.float32))
    k = torch.full((16,), 32.0, dtype=torch.float64)
    vals, idx = soft_gate_dk(x, k, 1e-4, backend=backend)
    assert idx.shape[1] < 64  # a few latents within 33 alpha of t, not the whole row
    t = soft_topk_threshold(x, k, 1e-4, backend=backend)
    near = ((x.double() - t[:, None]).abs() < 20 * 1e-4) & (x != 0)
    kept = torch.zeros_like(near).scatter_(1, idx.clamp(min=0), idx >= 0)
    assert torch.all(kept | ~near)  # every entry that matters is kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_the_soft_topk_threshold(backend):
    x = make_rows(7, 50, "relu")
    k = rand_k(7, 50)
    t = soft_topk_threshold(x, k, 0.05, backend=backend)
    p = softsae.soft_topk(x, k, 0.05, backend="reference")
    u = (x - t[:, None]) / 0.05
    from helpers import laplace_cdf

    torch.testing.assert_close(laplace_cdf(u), p, atol=1e-9, rtol=0)


@pytest.mark.skipif(softsae._backends.cpu_ext() is None, reason="the CPU extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("alpha", [1e-3, 1.0])
def test_cpu_threshold_without_output_is_the_forward_t(dtype, n, alpha):
    """The CPU threshold (the forward row kernel without its output pass) is bitwise the t of the
    forward that writes the gate, NaN rows included."""
    x = make_rows(5, n, "relu", dtype)
    x[3, 0] = float("nan")
    k = rand_k(5, n)
    got = soft_topk_threshold(x, k, alpha, backend="cpu")
    _out, want = softsae._backends.cpu_ext().soft_topk_fwd(x, k, alpha, True, True)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert got[3].isnan()


def test_bad_arguments_name_themselves():
    x = torch.rand(3, 5)
    with pytest.raises(ValueError, match="cut"):
        soft_gate_dk(x, 2.0, 0.1, cut=0.0)
    with pytest.raises(ValueError, match="2-D"):
        soft_gate_dk(torch.rand(2, 3, 5), 2.0, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        soft_gate_dk(x, 2.0, 0.0)
    with pytest.raises(TypeError, match="x must be"):
        soft_gate_dk(torch.ones(3, 5, dtype=torch.int64), 2.0, 0.1)


def test_empty_rows():
    vals, idx = soft_gate_dk(torch.zeros(0, 5), torch.zeros(0, dtype=torch.float64), 0.1)
    assert vals.shape == (0, 0) and idx.shape == (0, 0)


@pytest.mark.skipif(softsae._backends.cpu_ext() is None, reason="the CPU extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1e-5, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize("kind", ["relu", "randn", "ties"])
@pytest.mark.parametrize(("R", "n"), [(1, 1), (3, 2), (6, 7), (9, 300), (4, 3001)])
@pytest.mark.parametrize("given_shift", [False, True])
def test_cpu_kernel_equals_the_tensor_reference(dtype, alpha, kind, R, n, given_shift):
    """csrc/cpu/soft_gate_dk.cpp against dk_terms_reference: the same kept set, the same terms
    and sums (float64, summation order aside), also with a shift from outside (the sharded path)
    and with a NaN row."""
    from softsae.ops import soft_topk as st
    from softsae.ops.soft_gate_dk import dk_terms_reference

    x = make_rows(R, n, kind, dtype)
    if R >= 3:
        x[2, n // 2] = float("nan")
    k = rand_k(R, n)
    t = soft_topk_threshold(x, k, alpha, backend="cpu")
    s = st.scale_of(torch.tensor(alpha, dtype=torch.float64))
    shift = None
    if given_shift:  # a smaller shift than the row's own, as a sharded row's global minimum can be
        shift = ((x.double() - t[:, None]).abs().amin(dim=-1) / s - 0.5).clamp_min(0)
    got = softsae._backends.cpu_ext().soft_gate_dk_terms(x, t, float(s), shift, DK_CUT)
    want = dk_terms_reference(x, t, s, shift, DK_CUT)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=0)
    fine = t.isfinite()
    torch.testing.assert_close(got[2][fine], want[2][fine], rtol=1e-12, atol=0)
    assert got[2][~fine].isnan().all()  # a NaN row's sum is NaN (the reference's may be 0 or NaN)
    assert (got[1][~fine] == -1).all()


def test_cpu_kernel_names_bad_arguments():
    ext = softsae._backends.cpu_ext()
    if ext is None:
        pytest.skip("the CPU extension is not built")
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="t must be"):
        ext.soft_gate_dk_terms(x, t.float(), 1.0, None, DK_CUT)
    with pytest.raises(RuntimeError, match="shift must have shape"):
        ext.soft_gate_dk_terms(x, t, 1.0, torch.zeros(3, dtype=torch.float64), DK_CUT)
    with pytest.raises(ValueError, match="cut must be > 0"):
        ext.soft_gate_dk_terms(x, t, 1.0, None, 0.0)
    with pytest.raises(ValueError, match="s = |alpha|"):
        ext.soft_gate_dk_terms(x, t, -1.0, None, DK_CUT)
