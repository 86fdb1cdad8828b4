"""The fused budget head (softsae.ops.k_head) and SoftSAE's k_hidden option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softsae.checkpoint import from_reference_state_dict, load_sae, save_sae, to_reference_state_dict
from softsae.models import SoftSAE, build_model
from softsae.ops.k_head import k_head_logit


def head_params(B: int, d: int, m: int, dtype=torch.float64, zeros: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    W1 = torch.randn(m, d, generator=g, dtype=dtype)
    b1 = torch.randn(m, generator=g, dtype=dtype)
    if zeros:  # some hidden units exactly 0 before the ReLU: ReLU'(0) must be 0, as torch's
        x[0] = 0.0
        b1[: m // 2] = 0.0
    w2 = torch.randn(m, generator=g, dtype=dtype)
    b2 = torch.randn(1, generator=g, dtype=dtype)
    return x, W1, b1, w2, b2


def modules_logit(x, W1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, W1, b1)), w2[None], b2).squeeze(-1)


@pytest.mark.parametrize(("B", "d", "m"), [(1, 1, 1), (5, 4, 7), (16, 3, 33)])
@pytest.mark.parametrize("x_grad", [False, True])
def test_gradcheck_float64(B, d, m, x_grad):
    x, W1, b1, w2, b2 = head_params(B, d, m)
    args = (x.requires_grad_(x_grad), W1.requires_grad_(), b1.requires_grad_(), w2.requires_grad_(),
            b2.requires_grad_())
    assert torch.autograd.gradcheck(k_head_logit, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeros", [False, True])
def test_equals_the_nn_modules(dtype, zeros):
    """Value and every gradient equal autograd through Linear -> ReLU -> Linear (float summation
    order aside), including hidden units that sit exactly at the ReLU's kink."""
    args = head_params(64, 12, 40, dtype, zeros=zeros)
    fused = [a.clone().requires_grad_() for a in args]
    plain = [a.clone().requires_grad_() for a in args]
    g = torch.randn(64, dtype=dtype)
    out_f, out_p = k_head_logit(*fused), modules_logit(*plain)
    out_f.backward(g)
    out_p.backward(g)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(out_f, out_p, **tol)
    for name, a, b in zip(("x", "W1", "b1", "w2", "b2"), fused, plain, strict=True):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m, name=name: f"d{name}: {m}")
    if zeros:
        assert (F.linear(args[0], args[1], args[2])[0, :20] == 0).all()  # the kink was reached


def test_no_grad_and_partial_grads():
    x, W1, b1, w2, b2 = head_params(8, 5, 9)
    with torch.no_grad():
        torch.testing.assert_close(k_head_logit(x, W1, b1, w2, b2), modules_logit(x, W1, b1, w2, b2))
    w2.requires_grad_()
    k_head_logit(x, W1, b1, w2, b2).sum().backward()
    assert w2.grad is not None and W1.grad is None


@pytest.mark.parametrize(("shapes", "match"), [
    (((4, 3), (5, 2), (5,), (5,), (1,)), "agree on d"),
    (((4, 3), (5, 3), (4,), (5,), (1,)), "b1 and w2"),
    (((4, 3), (5, 3), (5,), (5,), (2,)), "b2"),
])
def test_bad_shapes_are_named(shapes, match):
    with pytest.raises(ValueError, match=match):
        k_head_logit(*(torch.zeros(s) for s in shapes))


# ------------------------------------------------------------------------------ k_hidden


def test_softsae_k_hidden_layout_and_default():
    assert SoftSAE(8, 32, 4).k_hidden == 32
    m = SoftSAE(8, 32, 4, k_hidden=5)
    assert tuple(m.k_estimator[0].weight.shape) == (5, 8) and tuple(m.k_estimator[2].weight.shape) == (1, 5)
    assert torch.equal(m.k_estimator[0].weight, m.W_enc[:5])  # initialised from the encoder, as at n
    assert m.config()["k_hidden"] == 5
    x = torch.randn(16, 8)
    assert m.predict_k(x).shape == (16,)


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, True, "4"])
def test_softsae_k_hidden_is_checked(bad):
    with pytest.raises(ValueError, match="k_hidden"):
        SoftSAE(8, 32, 4, k_hidden=bad)


def test_softsae_k_hidden_saves_loads_and_imports(tmp_path):
    torch.manual_seed(0)
    m = SoftSAE(8, 32, 4, k_hidden=6)
    with torch.no_grad():
        m.k_estimator[2].weight.normal_()
    x = torch.randn(20, 8)
    save_sae(m, tmp_path / "run")
    back = load_sae(tmp_path / "run")
    assert back.k_hidden == 6
    torch.testing.assert_close(back.predict_k(x), m.predict_k(x))
    assert build_model(m.config()).k_hidden == 6
    with pytest.raises(ValueError, match="k_hidden=6"):
        to_reference_state_dict(m)
    full = SoftSAE(8, 32, 4)
    assert from_reference_state_dict(to_reference_state_dict(full)).k_hidden == 32


def test_softsae_k_hidden_trains_through_the_trainer(tmp_path):
    import numpy as np

    from softsae.trainer import TrainConfig, train

    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32))
    cfg = TrainConfig(arch="softsae", dict_size=32, k=4, steps=6, batch_size=64, k_hidden=7, progress=False)
    res = train(str(acts), cfg, out_dir=tmp_path / "run")
    assert res.model.k_hidden == 7
    assert load_sae(tmp_path / "run").k_hidden == 7


def test_interop_export_refuses_a_narrow_head():
    from softsae.interop._common import fold

    with pytest.raises(ValueError, match="k_hidden=3"):
        fold(SoftSAE(8, 32, 4, k_hidden=3), "latents")


def test_dictionary_mode_refuses_a_narrow_head():
    from softsae.distributed.placement import shard_model_

    with pytest.raises(ValueError, match="k_hidden == n"):
        shard_model_(SoftSAE(8, 32, 4, k_hidden=3))
