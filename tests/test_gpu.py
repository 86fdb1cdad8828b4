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
from helpers import ALPHAS, HALF, HALF_ERR_RATIO, SUM_ORDER_ERR_RATIO, dense_straight_through_k, make_rows, rand_k

import softsae
from softsae.ops.soft_topk_ref import soft_topk_bwd_ref, soft_topk_fwd_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in softsae.available_backends("cuda")]
# (rows, n): n = 1 .. 65536, rows = 1 .. 4096; 4096 + 1 crosses the CUDA kernel's in-buffer
# limit (histogram + candidate path), 65536 the shared-memory row cache.
SHAPES = [(1, 1), (5, 2), (64, 7), (16, 1000), (8, 4097), (4096, 64), (2, 65536)]
DEV = "cuda"


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
    x = make_rows(r, n, kind, torch.float32, device=DEV)
    k = rand_k(r, n, integer_half=True, device=DEV)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    assert p.dtype == torch.float32 and p.shape == x.shape
    assert max_err(p, truth(x, k, alpha)) <= 1e-4
    assert torch.all((p.double().sum(-1) - k).abs() <= 1e-4 * k.clamp(min=1))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("r", "n"), [(3, 1), (16, 333), (8, 4097), (2, 65536)])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_float64_forward(backend, r, n, alpha, kind):
    x = make_rows(r, n, kind, torch.float64, device=DEV)
    k = rand_k(r, n, integer_half=True, device=DEV)
    p = softsae.soft_topk(x, k, alpha, backend=backend)
    assert p.dtype == torch.float64
    assert max_err(p, truth(x, k, alpha)) <= 1e-9


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("r", "n"), [(64, 7), (32, 777), (8, 4097), (2, 65536)])
@pytest.mark.parametrize("alpha", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("gate", [False, True])
def test_half_forward_no_worse_than_reference(backend, dtype, r, n, alpha, gate):
    x = make_rows(r, n, "randn", dtype, device=DEV)
    k = rand_k(r, n, integer_half=True, device=DEV)
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    out = fn(x, k, alpha, backend=backend)
    assert out.dtype == dtype
    exact = truth(x, k, alpha, gate=gate)
    ref_err = max_err(fn(x, k, alpha, backend="reference"), exact)  # the truth rounded once
    assert max_err(out, exact) <= HALF_ERR_RATIO * ref_err + 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_false_and_gate(backend, gate, dtype):
    x = make_rows(64, 300, "randn", dtype, device=DEV)
    k = rand_k(64, 300, integer_half=True, device=DEV)
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
    x = make_rows(256, 20000, "relu", torch.float32, device=DEV)
    k = rand_k(256, 20000, integer_half=True, device=DEV)
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
    x = make_rows(r, n, "randn", dtype, device=DEV)
    k = rand_k(r, n, integer_half=True, device=DEV)
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
    x = make_rows(32, 777, "randn", dtype, device=DEV)
    k = rand_k(32, 777, integer_half=True, device=DEV)
    w = torch.randn(32, 777, dtype=torch.float64, device=DEV).to(dtype).double()
    exact = grads("reference", x.double(), k, 0.05, w, True, gate)
    got = grads(backend, x, k, 0.05, w, True, gate)
    ref = grads("reference", x, k, 0.05, w, True, gate)  # same precision, float64 inside
    for name, a, b, e in zip(("x", "k", "alpha"), got, ref, exact, strict=True):
        assert max_err(a, e) <= HALF_ERR_RATIO * max_err(b, e) + 1e-3 * amax(e), name


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
            assert max_err(a, e) <= SUM_ORDER_ERR_RATIO * max_err(r_, e) + 1e-3 * max(1.0, amax(e)), name


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


# ----------------------------------------------------------------------------- devices, syncs, graphs

needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@needs_2_gpus
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_gpu_while_first_is_current(backend):
    """Tensors on cuda:1 while cuda:0 is current: every op runs on the tensors' device."""
    torch.cuda.set_device(0)
    x0 = make_rows(16, 777, "randn", torch.float32, device=DEV)
    k0 = rand_k(16, 777, integer_half=True, device=DEV)
    w0 = torch.randn(16, 777, dtype=torch.float64, device=DEV)
    want = grads(backend, x0, k0, 0.05, w0, True, True)
    x1, k1, w1 = x0.to("cuda:1"), k0.to("cuda:1"), w0.to("cuda:1")
    xg = x1.clone().requires_grad_(True)
    a = torch.tensor(0.05, dtype=torch.float64, device="cuda:1", requires_grad=True)
    out = softsae.soft_topk_gate(xg, k1, a, backend=backend)
    (out.double() * w1).sum().backward()
    assert out.device == torch.device("cuda:1") and a.grad.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    assert max_err(xg.grad.cpu(), want[0].cpu()) <= 1e-5 * max(1.0, amax(want[0]))
    assert abs(a.grad.item() - want[2].item()) <= 1e-4 * max(1.0, abs(want[2].item()))
    vals, idx, W, b = sparse_case(64, 8, 300, 96, torch.float32, "padded")
    v1, i1, W1, b1 = (t.detach().to("cuda:1").requires_grad_(t.is_floating_point()) for t in (vals, idx, W, b))
    o1 = softsae.sparse_decode(v1, i1, W1, b1, backend=backend)
    o0 = softsae.sparse_decode(vals, idx, W, b, backend=backend)
    assert o1.device == torch.device("cuda:1") and max_err(o1.cpu(), o0.cpu()) <= 1e-5
    o1.sum().backward()
    o0.sum().backward()
    assert max_err(W1.grad.cpu(), W.grad.cpu()) <= 1e-5 * max(1.0, amax(W.grad))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_alpha_tensor_on_gpu_is_not_read_back_and_its_grad_stays(backend):
    x = make_rows(8, 300, "randn", torch.float32, device=DEV).requires_grad_(True)
    a = torch.tensor(-0.05, dtype=torch.float32, device=DEV, requires_grad=True)  # sign(alpha) < 0
    softsae.soft_topk(x, 10.0, a, backend=backend).pow(2).sum().backward()
    a_ref = torch.tensor(-0.05, dtype=torch.float64, requires_grad=True)
    softsae.soft_topk(x.detach().double().cpu(), 10.0, a_ref, backend="reference").pow(2).sum().backward()
    assert a.grad.device == a.device and a.grad.dtype == torch.float32
    assert abs(a.grad.item() - a_ref.grad.item()) <= 1e-3 * max(1.0, abs(a_ref.grad.item()))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_alpha_is_clamped_like_every_backend(backend, dtype):
    """s = max(|alpha|, 1e-30): float32 1/s stays finite, results equal those at alpha = 1e-30."""
    x = make_rows(8, 500, "randn", dtype, device=DEV)
    k = rand_k(8, 500, integer_half=True, device=DEV)
    at_min = softsae.soft_topk(x, k, 1e-30, backend=backend)
    for alpha in (1e-35, 1e-300, torch.tensor(1e-40, device=DEV)):
        p = softsae.soft_topk(x, k, alpha, backend=backend)
        assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        assert torch.equal(p, at_min)


def _graph_step(model, opt, tracker, x_n):
    """One full SAE training step, written to be capturable (nothing reads back to the host)."""
    from softsae.losses import auxk_loss, k_loss, reconstruction_loss

    out = model.forward_train(x_n)
    loss = reconstruction_loss(x_n, out.x_hat)
    if out.k_hat is not None:
        loss = loss + 0.1 * k_loss(out.k_hat, float(model.k))
    loss = loss + auxk_loss(out.pre, x_n - out.x_hat, tracker.dead_mask(), model.W_dec, 8, model.backend) / 32
    loss.backward()
    model.project_decoder_grad()
    opt.step()
    model.normalize_decoder()
    tracker.update(out.codes.fired(), x_n.shape[0])
    return loss.detach()


def _new_sae(arch: str, backend: str):
    from softsae.models import BatchTopKSAE, SoftSAE, TopKSAE

    torch.manual_seed(0)
    d, n, k = 64, 512, 8
    if arch == "softsae-soft":
        return SoftSAE(d, n, k, alpha=0.05, backend=backend)
    if arch == "softsae-st":  # the default recipe's straight-through step (st_mode "k")
        m = SoftSAE(d, n, k, alpha=0.05, backend=backend)
        m.straight_through, m.st_mode = True, "k"
        return m
    if arch == "softsae-hard":
        m = SoftSAE(d, n, k, alpha=0.05, backend=backend)
        m.hard = True
        return m
    if arch == "topk":
        return TopKSAE(d, n, k, backend=backend)
    return BatchTopKSAE(d, n, k, backend=backend, decode_mode="dense")  # sparse mode reads the widest row back


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("arch", ["softsae-soft", "softsae-st", "softsae-hard", "topk", "batchtopk"])
def test_cuda_graph_captures_a_full_training_step(backend, arch):
    """Capture forward + backward + Adam(capturable=True) of each SAE, replay, compare to eager."""
    import copy

    from softsae.losses import DeadLatentTracker

    eager = _new_sae(arch, backend).to(DEV)
    graphed = copy.deepcopy(eager)
    x_n = torch.randn(256, 64, device=DEV)
    runs = {}
    for name, model in (("eager", eager), ("graph", graphed)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        tracker = DeadLatentTracker(model.n, threshold=256, device=DEV)
        warm, steps = 3, 4
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream (Triton JIT, Adam state, cuBLAS)
            for _ in range(warm):
                opt.zero_grad(set_to_none=True)
                _graph_step(model, opt, tracker, x_n)
        torch.cuda.current_stream().wait_stream(side)
        losses = []
        if name == "eager":
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                losses.append(_graph_step(model, opt, tracker, x_n))
        else:
            opt.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = _graph_step(model, opt, tracker, x_n)
            for _ in range(steps):
                graph.replay()
                losses.append(static_loss.clone())
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(f"{arch}/{backend}: peak CUDA memory with the graph {peak:.1f} MiB")
        runs[name] = (torch.stack(losses), tracker.tokens_since_fired.clone())
    # Same math, but atomics in torch's scatter/index kernels may reorder float sums.
    assert torch.allclose(runs["graph"][0], runs["eager"][0], rtol=1e-4, atol=1e-6)
    assert torch.equal(runs["graph"][1], runs["eager"][1]) or arch == "softsae-soft"
    for (pn, pe), pg in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        assert torch.allclose(pg, pe, rtol=1e-3, atol=1e-5), pn


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("r", "n"), [(1, 1), (3, 1), (64, 7), (16, 1000), (8, 4097), (5, 4100), (2, 65536)])
@pytest.mark.parametrize("alpha", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("largest", [True, False])
def test_sparse_gate_equals_dense_gate_then_compaction(backend, dtype, r, n, alpha, largest):
    """soft_topk_gate(sparse=True): the fused paths of Triton and CUDA (no dense output) give the
    backend's dense gate's non-zeros exactly, NaN rows included; with max_count, no count pass."""
    from softsae.ops.soft_topk import nonzero_per_row

    x = make_rows(r, n, "relu", dtype, device=DEV)
    if not largest:
        x = -x
    if r >= 3:
        x[1, n // 2] = float("nan")  # a non-finite row: NaN everywhere in the dense gate
    k = rand_k(r, n, device=DEV)
    gate = softsae.soft_topk_gate(x, k, alpha, largest=largest, backend=backend)
    vals, idx = softsae.soft_topk_gate(x, k, alpha, largest=largest, backend=backend, sparse=True)
    want_v, want_i = nonzero_per_row(gate)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(vals, want_v, atol=0, rtol=0, equal_nan=True)
    m = max(1, want_i.shape[1] // 2)
    v_m, i_m = softsae.soft_topk_gate(x, k, alpha, largest=largest, backend=backend, sparse=True, max_count=m)
    w_v, w_i = nonzero_per_row(gate, max_count=m)
    assert torch.equal(i_m, w_i)
    torch.testing.assert_close(v_m, w_v, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 2.0])
def test_straight_through_k_step_equals_dense_formula(backend, alpha):
    """SoftSAE's st_mode "k" step on CUDA (hard codes + k_direction, whose coefficients come from
    the dense soft_gate_dk there) against the dense formula, every gradient, in float64."""
    from softsae.models import SoftSAE

    x = torch.randn(64, 32, dtype=torch.float64, device=DEV)
    grads = {}
    for path in ("fast", "dense"):
        torch.manual_seed(7)
        m = SoftSAE(32, 300, 6, alpha=alpha, backend=backend).double().to(DEV).train()
        with torch.no_grad():
            m.k_estimator[2].weight.normal_(0, 0.3)
        m.straight_through, m.st_mode = True, "k"
        if path == "fast":
            x_hat = m.forward_train(x).x_hat
        else:
            pre = m.pre_acts(x)
            k_hat = m.k_hat_norm(x)
            z = dense_straight_through_k(m._hard_codes(pre, m.hard_k(k_hat)).to_dense(), pre, k_hat, m.soft_dense)
            x_hat = z @ m.W_dec + m.b_dec
        ((x_hat - x).pow(2).sum() + 0.1 * x_hat.sin().sum()).backward()
        grads[path] = [x_hat.detach()] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["fast"], grads["dense"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_peak_memory_within_the_documented_bounds(backend):
    """docs/design.md "Extra memory per op": outputs + O(R) per row (+ the Triton per-program
    scratch); sparse decode backward: dW + dvals + the (B K) sort of the pairs."""
    R, n = 1024, 16384
    x = torch.randn(R, n, device=DEV, requires_grad=True)
    k = torch.full((R,), 64.0, dtype=torch.float64, device=DEV)
    g = torch.randn(R, n, device=DEV)
    e = x.element_size()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    p = softsae.soft_topk(x, k, 1e-3, backend=backend)
    torch.cuda.synchronize()
    fwd_extra = torch.cuda.max_memory_allocated() - base
    assert fwd_extra <= R * n * e + 64 * R + 8 * 2**20, fwd_extra  # p, t, scratch (Triton: <= 8 MiB)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    p.backward(g)
    torch.cuda.synchronize()
    bwd_extra = torch.cuda.max_memory_allocated() - base
    assert bwd_extra <= R * n * e + 64 * R + 2**20, bwd_extra  # dx (becomes x.grad), dk, ds
    B, K, nl, d = 4096, 64, 16384, 512
    vals, idx, W, b = sparse_case(B, K, nl, d, torch.float32, "random")
    go = torch.randn(B, d, device=DEV)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    softsae.sparse_decode(vals, idx, W, b, backend=backend).backward(go)
    torch.cuda.synchronize()
    sd_extra = torch.cuda.max_memory_allocated() - base
    # out (B d), dW (n d), dvals (B K), db; the stable sort of B K int64 keys + perm + seg (n + 1).
    bound = (B * d + nl * d + B * K + d) * 4 + 6 * B * K * 8 + 2 * (nl + 1) * 8 + 8 * 2**20
    assert sd_extra <= bound, (sd_extra, bound)
