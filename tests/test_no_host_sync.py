"""No host-device synchronisation on the CUDA path of any op (runs on CPU, no GPU needed).

Every op runs on *fake* CUDA tensors (``FakeTensorMode``: metadata only, device "cuda:0",
no GPU touched), so the code takes exactly its CUDA branches. In that mode a data-dependent
read (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``, ``t.tolist()``) raises
``DataDependentOutputException`` and a data-dependent shape (``t[mask]``, ``nonzero``) raises
``DynamicOutputShapeException``; ``NoDeviceToHost`` below also rejects copies from the
device to the host (``.cpu()``, ``.to("cpu")``, ``.numpy()``). The custom ops' fake
implementations stand in for the kernels (those are raw launches; the CUDA binding reads
nothing back), and the backend-facing implementations are run separately with the pure
PyTorch reference backend. ``test_the_detector_catches_a_sync`` shows each kind of sync
really fails here.

The autograd engine cannot run on fake CUDA tensors without a GPU (it initialises a CUDA
device thread), so backward is checked by calling each custom op's backward function
directly (the Python that runs in ``loss.backward()``; the rest are aten formulas), and the
training step runs forward, losses, those backward functions, Adam(capturable=True),
decoder renormalisation and the dead-latent update.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode

import softsae
from softsae.losses import DeadLatentTracker, auxk_loss, k_loss, reconstruction_loss
from softsae.models import BatchTopKSAE, SoftSAE, TopKSAE
from softsae.ops import soft_topk_ops as st
from softsae.ops import sparse_decode as sd

aten = torch.ops.aten
SYNC_ERRORS = (DataDependentOutputException, DynamicOutputShapeException)


class HostSync(RuntimeError):
    pass


_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class NoDeviceToHost(TorchDispatchMode):
    """Raise on any copy of a CUDA tensor to the host, and on boolean-mask indexing (which
    runs ``nonzero``: a sync on CUDA, though the fake mode lets ``t[mask] = v`` through).
    Sits above FakeTensorMode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                      for i in args[1] if i is not None):
            raise HostSync(f"boolean-mask indexing ({func}) runs nonzero: a host sync on CUDA")
        if func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout):
            src, dev = args[0], kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type == "cuda" and dev is not None \
                    and torch.device(dev).type == "cpu":
                raise HostSync(f"device-to-host copy: {func}")
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type == "cuda":
                raise HostSync("device-to-host copy_")
        if func is aten._local_scalar_dense.default:
            raise HostSync("scalar read-back (.item / float / int / bool)")
        return func(*args, **kwargs)


@pytest.fixture
def cuda_fake():
    """Run the test body on fake CUDA tensors with host syncs turned into errors."""
    with FakeTensorMode(), NoDeviceToHost():
        yield torch.device("cuda", 0)


class Ctx:
    """Stand-in for an autograd context: what setup_context stores, what backward reads."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def op_backward(module, inputs, output, *grads):
    """Run a custom op's setup_context + backward as autograd would, on fake tensors."""
    ctx = Ctx()
    ctx.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs)
    module._setup_context(ctx, inputs, output)
    return module._backward(ctx, *grads)


def no_sync(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SYNC_ERRORS as err:  # the fake mode's word for a read-back
        raise HostSync(f"data-dependent read on the CUDA path: {err!r}") from err


# ----------------------------------------------------------------------------- the detector


@pytest.mark.parametrize("sync", ["item", "float", "int", "bool", "if", "tolist", "cpu", "to_cpu", "mask",
                                  "mask_put", "nonzero"])
def test_the_detector_catches_a_sync(cuda_fake, sync):
    x = torch.randn(4, 8, device=cuda_fake)
    actions = {
        "item": lambda: x.sum().item(),
        "float": lambda: float(x.sum()),
        "int": lambda: int(x.argmax()),
        "bool": lambda: bool((x > 0).any()),
        "if": lambda: 1 if x.max() > 0 else 0,
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "to_cpu": lambda: x.to("cpu"),
        "mask": lambda: x[x > 0],
        "mask_put": lambda: x.__setitem__(x > 0, 0.0),
        "nonzero": lambda: torch.nonzero(x),
    }
    with pytest.raises((HostSync, *SYNC_ERRORS)):
        no_sync(actions[sync])


def test_a_reintroduced_alpha_readback_is_caught(cuda_fake, monkeypatch):
    """The bug this file exists for: float(alpha) in the op layer fails the test."""
    real = st.scale_of
    monkeypatch.setattr(st, "scale_of", lambda a: real(a) * 0 + abs(float(a)))
    x = torch.randn(4, 16, device=cuda_fake)
    with pytest.raises(HostSync):
        no_sync(st._fwd_impl, x, torch.full((4,), 3.0, dtype=torch.float64, device=cuda_fake),
                torch.full((), 0.1, dtype=torch.float64, device=cuda_fake), True, False, "reference")


# ----------------------------------------------------------------------------- ops


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_soft_topk_forward_backward(cuda_fake, gate, alpha_kind):
    x = torch.randn(6, 50, device=cuda_fake, requires_grad=True)
    k = torch.full((6,), 5.0, device=cuda_fake, requires_grad=True)
    alpha = 0.05 if alpha_kind == "float" else torch.full((), 0.05, device=cuda_fake, requires_grad=True)
    fn = softsae.soft_topk_gate if gate else softsae.soft_topk
    out = no_sync(fn, x, k, alpha)
    assert out.device.type == "cuda" and out.shape == x.shape and out.grad_fn is not None
    # backward of the custom op, with the inputs the public function hands it
    k64 = k.detach().double()
    a64 = torch.full((), 0.05, dtype=torch.float64, device=cuda_fake, requires_grad=alpha_kind == "tensor")
    inputs = (x, k64.requires_grad_(), a64, True, gate, "auto")
    output = (torch.empty_like(x), torch.empty(6, dtype=torch.float64, device=cuda_fake))
    dx, dk, dalpha, *_ = no_sync(op_backward, st, inputs, output, torch.ones_like(x), None)
    assert dx.shape == x.shape and dk.shape == (6,)
    if alpha_kind == "tensor":
        assert dalpha.device.type == "cuda" and dalpha.shape == ()


def test_soft_topk_gate_sparse_with_static_width(cuda_fake):
    x = torch.randn(6, 50, device=cuda_fake, requires_grad=True)
    vals, idx = no_sync(softsae.soft_topk_gate, x, 5.0, 0.05, sparse=True, max_count=12)
    assert vals.shape == idx.shape == (6, 12) and vals.grad_fn is not None


def test_soft_topk_gate_sparse_without_width_syncs(cuda_fake):
    """The documented exception: the data-dependent width is read back."""
    x = torch.randn(6, 50, device=cuda_fake)
    with pytest.raises(HostSync):
        no_sync(softsae.soft_topk_gate, x, 5.0, 0.05, sparse=True)


@pytest.mark.parametrize("gate", [False, True])
def test_soft_topk_backend_impl_reference(cuda_fake, gate):
    """What the custom ops run around a backend: s on the device, nothing read back."""
    x = torch.randn(6, 50, device=cuda_fake)
    k = torch.full((6,), 5.0, dtype=torch.float64, device=cuda_fake)
    alpha = torch.full((), -0.05, dtype=torch.float64, device=cuda_fake)
    out, t = no_sync(st._fwd_impl, x, k, alpha, True, gate, "reference")
    dx, dk, ds = no_sync(st._bwd_impl, torch.ones_like(x), x, t, alpha, True, gate, "reference")
    assert out.shape == dx.shape == x.shape and t.shape == dk.shape == ds.shape == (6,)
    s = st.scale_of(alpha)
    assert s.shape == (1,) and s.dtype == torch.float64 and s.device.type == "cuda"


@pytest.mark.parametrize("deterministic", [True, False])
def test_sparse_decode_forward_backward(cuda_fake, deterministic):
    vals = torch.randn(8, 5, device=cuda_fake, requires_grad=True)
    idx = torch.randint(-1, 30, (8, 5), device=cuda_fake)
    W = torch.randn(30, 16, device=cuda_fake, requires_grad=True)
    b = torch.randn(16, device=cuda_fake, requires_grad=True)
    out = no_sync(softsae.sparse_decode, vals, idx, W, b, deterministic=deterministic)
    assert out.shape == (8, 16) and out.grad_fn is not None
    inputs = (vals, idx, W, b, "auto", deterministic)
    dvals, _, dW, db, *_ = no_sync(op_backward, sd, inputs, out.detach(), torch.ones(8, 16, device=cuda_fake))
    assert dW.shape == W.shape and dvals.shape == vals.shape and db.shape == b.shape
    fwd, bwd = sd._kernels("reference")  # what the custom ops run on a reference backend
    assert no_sync(fwd, vals.detach(), idx, W.detach(), b.detach()).shape == (8, 16)
    dv, dW = no_sync(bwd, torch.ones(8, 16, device=cuda_fake), vals.detach(), idx, W.detach(), True, True,
                     deterministic)
    assert dv.shape == vals.shape and dW.shape == W.shape


def test_sparse_decode_validation_is_opt_in_on_cuda(cuda_fake, monkeypatch):
    vals, idx, W = (torch.randn(8, 5, device=cuda_fake), torch.randint(0, 30, (8, 5), device=cuda_fake),
                    torch.randn(30, 16, device=cuda_fake))
    monkeypatch.delenv("SOFTSAE_CHECK_INDICES", raising=False)
    no_sync(softsae.sparse_decode, vals, idx, W)
    with pytest.raises(HostSync):
        no_sync(softsae.sparse_decode, vals, idx, W, validate=True)
    monkeypatch.setenv("SOFTSAE_CHECK_INDICES", "1")
    with pytest.raises(HostSync):
        no_sync(softsae.sparse_decode, vals, idx, W)


def test_topk_per_row_static_width(cuda_fake):
    z = torch.randn(8, 40, device=cuda_fake, requires_grad=True)
    k = torch.randint(0, 10, (8,), device=cuda_fake)
    vals, idx = no_sync(softsae.topk_per_row, z, k, k_max=9)
    assert vals.shape == idx.shape == (8, 9) and vals.grad_fn is not None
    vals, idx = no_sync(softsae.topk_per_row, z, 7)  # a Python int is static too
    assert vals.shape == (8, 7)
    with pytest.raises(HostSync):  # a tensor k without k_max must read max(k) back
        no_sync(softsae.topk_per_row, z, k)


# ----------------------------------------------------------------------------- a training step


def _step(model, opt, tracker, x_n, k_target):
    out = model.forward_train(x_n)
    loss = reconstruction_loss(x_n, out.x_hat)
    if out.k_hat is not None:
        loss = loss + k_loss(out.k_hat, k_target)
    loss = loss + auxk_loss(out.pre, x_n - out.x_hat, tracker.dead_mask(), model.W_dec, 4, model.backend) / 32
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():  # stands in for loss.backward() (see the module docstring)
        p.grad = torch.randn_like(p)
    model.project_decoder_grad()
    opt.step()
    model.normalize_decoder()
    tracker.update(out.codes.fired(), x_n.shape[0])
    return loss.detach(), out.codes.l0().float().mean()


@pytest.mark.parametrize(("arch", "hard"), [("softsae", False), ("softsae", True), ("topk", True),
                                            ("batchtopk", True)])
def test_full_training_step(cuda_fake, arch, hard):
    d, n, k = 12, 48, 4
    with cuda_fake:  # parameters created on the (fake) GPU
        if arch == "softsae":
            model = SoftSAE(d, n, k, alpha=0.05)
            model.hard = hard
        elif arch == "topk":
            model = TopKSAE(d, n, k, decode_mode="sparse")
        else:
            model = BatchTopKSAE(d, n, k, decode_mode="dense")  # sparse mode reads the widest row back
    assert model.W_dec.device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    tracker = DeadLatentTracker(n, threshold=1, device=cuda_fake)
    x_n = torch.randn(16, d, device=cuda_fake)
    for _ in range(2):  # the second step has dead latents and Adam state
        loss, l0 = no_sync(_step, model, opt, tracker, x_n, float(k))
    assert loss.device.type == "cuda" and l0.shape == ()
