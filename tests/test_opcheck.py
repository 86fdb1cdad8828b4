"""``torch.library.opcheck`` on every ``softsae::`` custom op (schema, fake tensor, autograd
registration, AOT dispatch), as PyTorch's extension-cpp example does.

The arguments are not hand-written: each public function runs once under a dispatch mode that
records every ``softsae::`` call it makes, and opcheck replays exactly those calls. A new custom
op that no public call reaches fails ``test_every_op_is_covered``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_backends
from torch.utils._python_dispatch import TorchDispatchMode

import softsae


class _Recorder(TorchDispatchMode):
    """Records (op overload, args, kwargs) of every softsae:: op dispatched inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "softsae":
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((func, tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _workloads(backend: str):
    """Public calls that reach every softsae:: op (forward and backward) on ``backend``."""
    g = torch.Generator().manual_seed(0)

    def soft(gate: bool, dtype: torch.dtype):
        x = torch.randn(5, 33, generator=g, dtype=dtype).requires_grad_()
        k = (torch.rand(5, generator=g, dtype=torch.float64) * 20 + 1).requires_grad_()
        alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        fn = softsae.soft_topk_gate if gate else softsae.soft_topk
        fn(x, k, alpha, backend=backend).square().sum().backward()

    def decode(with_bias: bool, dtype: torch.dtype):
        W = torch.randn(40, 7, generator=g, dtype=dtype).requires_grad_()
        vals = torch.randn(6, 4, generator=g, dtype=dtype).requires_grad_()
        idx = torch.randint(-1, 40, (6, 4), generator=g)
        b = torch.randn(7, generator=g, dtype=dtype).requires_grad_() if with_bias else None
        softsae.sparse_decode(vals, idx, W, b, backend=backend).square().sum().backward()

    def encoder(with_bias: bool, dtype: torch.dtype):  # the sparse encoder backward (max_density=1)
        from softsae.ops.sparse_encoder import encoder_pre

        x = torch.randn(6, 7, generator=g, dtype=dtype).requires_grad_()
        W = torch.randn(40, 7, generator=g, dtype=dtype).requires_grad_()
        b = torch.randn(40, generator=g, dtype=dtype).requires_grad_() if with_bias else None
        pre = encoder_pre(x, W, b, backend=backend, max_density=1.0)
        torch.topk(pre, 3, dim=1).values.square().sum().backward()

    def gate_sparse(dtype: torch.dtype):  # the fused sparse gate (CPU tensors), static width
        x = torch.randn(5, 33, generator=g, dtype=dtype).requires_grad_()
        k = (torch.rand(5, generator=g, dtype=torch.float64) * 20 + 1).requires_grad_()
        alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        vals, _ = softsae.soft_topk_gate(x, k, alpha, backend=backend, sparse=True, max_count=33)
        vals.square().sum().backward()

    for dtype in (torch.float32, torch.float64):
        yield f"soft_topk_gate(sparse=True, {dtype})", lambda d=dtype: gate_sparse(d)
        for flag in (False, True):
            yield f"soft_topk(gate={flag}, {dtype})", lambda f=flag, d=dtype: soft(f, d)
            yield f"sparse_decode(bias={flag}, {dtype})", lambda f=flag, d=dtype: decode(f, d)
            yield f"sparse_encoder(bias={flag}, {dtype})", lambda f=flag, d=dtype: encoder(f, d)


def _record(backend: str) -> list[tuple[str, torch._ops.OpOverload, tuple, dict]]:
    out = []
    for name, run in _workloads(backend):
        with _Recorder() as rec:
            run()
        out += [(name, *call) for call in rec.calls]
    return out


def _registered_ops() -> set[str]:
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("softsae::")}


def test_every_op_is_covered():
    seen = {op._schema.name for _, op, _, _ in _record("reference")}
    missing = _registered_ops() - seen
    assert _registered_ops(), "no softsae:: custom ops are registered"
    assert not missing, f"custom ops never reached by the opcheck workloads: {sorted(missing)}"


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    calls = _record(backend)
    assert calls, "the workloads dispatched no softsae:: op"
    for name, op, args, kwargs in calls:
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as err:  # name the call that failed
            raise AssertionError(f"opcheck failed for {op} reached from {name} on backend={backend}: {err}") from err
