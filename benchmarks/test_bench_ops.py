"""pytest-benchmark suite (not part of the test run): ``pytest benchmarks/ --benchmark-only``.

Smaller shapes than the table scripts so the whole suite takes about a minute on 2 cores;
compare backends with ``--benchmark-group-by=param:shape``.
"""

from __future__ import annotations

import pytest
import torch

import softsae
from softsae.ops.sparse_decode_ref import densify

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in softsae.available_backends(DEVICE) if DEVICE.type == "cuda" or b != "triton"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", [(1024, 4096), (1024, 16384)])
@pytest.mark.parametrize("impl", ["topk"] + BACKENDS)
def test_soft_topk_fwd_bwd(benchmark, impl, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    k = torch.empty(shape[0], device=DEVICE).uniform_(20, 220)
    g = torch.randn(*shape, device=DEVICE)

    def step():
        if impl == "topk":
            torch.topk(x.detach(), 220, dim=-1)
        else:
            softsae.soft_topk(x, k, 1e-4, backend=impl).backward(g)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("shape", [(1024, 16384, 512, 64)])
@pytest.mark.parametrize("impl", ["dense", "embedding_bag"] + [b for b in BACKENDS if b != "reference"])
def test_sparse_decode_fwd_bwd(benchmark, impl, shape):
    torch.manual_seed(0)
    B, n, d, k = shape
    W = torch.randn(n, d, device=DEVICE, requires_grad=True)
    idx = torch.randint(0, n, (B, k), device=DEVICE)
    vals = torch.rand(B, k, device=DEVICE, requires_grad=True)
    g = torch.randn(B, d, device=DEVICE)
    z = densify(vals.detach(), idx, n).requires_grad_()

    def step():
        if impl == "dense":
            out = z @ W
        elif impl == "embedding_bag":
            out = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")
        else:
            out = softsae.sparse_decode(vals, idx, W, backend=impl)
        out.backward(g)
        _sync()

    benchmark(step)
