"""SAE models and loss terms, each checked against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import dense_straight_through_k

import softsae
from softsae.losses import DeadLatentTracker, auxk_loss, fvu, k_loss, reconstruction_loss
from softsae.metrics import dictionary_recovery, rankdata, spearman
from softsae.models import BatchTopKSAE, Codes, SoftSAE, TopKSAE, build_model
from softsae.ops.soft_topk import soft_topk

D, N, B = 12, 40, 64


def _x(rows: int = B, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * 2 + 0.5


def _pre(model, x):
    x_n = model.normalize(x)
    return F.relu((x_n - model.b_dec) @ model.W_enc.T + model.b_enc)


def test_init_follows_spec():
    m = SoftSAE(D, N, 4)
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(N), atol=1e-6)
    assert torch.equal(m.W_enc, m.W_dec)
    assert torch.equal(m.k_estimator[0].weight, m.W_enc)
    assert torch.all(m.k_estimator[0].bias == 0) and torch.all(m.b_enc == 0)
    assert m.k_max == 8.0
    # zero-initialised output layer: every input starts at k_hat = k_max / 2 = k
    assert torch.allclose(m.predict_k(_x()), torch.full((B,), 4.0))


def test_dict_smaller_than_k_is_rejected():
    with pytest.raises(ValueError, match="smaller than k"):
        TopKSAE(D, 8, 16)
    with pytest.raises(ValueError, match="smaller than k"):
        SoftSAE(D, 8, 9.5)


def test_softsae_soft_forward_is_gated_by_soft_topk():
    m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").train()
    with torch.no_grad():
        m.k_estimator[2].weight.normal_(0, 0.3)
        m.b_enc.normal_(0, 0.2)
    x = _x()
    out = m.forward_train(m.normalize(x))
    pre = _pre(m, x)
    k_hat = (m.k_max * torch.sigmoid(m.k_estimator(m.normalize(x) - m.b_dec).squeeze(-1))).clamp(1, N)
    p = soft_topk(pre, k_hat, 0.05, backend="reference")
    z = pre * p
    assert torch.allclose(out.k_hat, k_hat)
    # L0 of soft codes counts latents above the soft threshold (p >= 1/2), not every tiny weight
    assert torch.equal(out.codes.l0(), ((p >= 0.5) & (pre > 0)).sum(1))
    assert torch.allclose(out.codes.to_dense(), z, atol=1e-6)
    assert torch.allclose(out.x_hat, z @ m.W_dec + m.b_dec, atol=1e-5)
    assert out.k_hat.std() > 0  # budgets really differ per row


@pytest.mark.parametrize("decode_mode", ["sparse", "dense"])
def test_softsae_hard_mode_keeps_floor_k_hat(decode_mode):
    m = SoftSAE(D, N, 4, backend="reference", decode_mode=decode_mode).eval()
    with torch.no_grad():
        m.k_estimator[2].weight.normal_(0, 0.3)
    x = _x()
    out = m.forward_train(m.normalize(x))
    pre = _pre(m, x)
    k = out.k_hat.floor().long()
    dense = torch.zeros_like(pre)
    for b in range(B):
        top = torch.topk(pre[b], int(k[b])).indices
        dense[b, top] = pre[b, top]
    assert torch.allclose(out.codes.to_dense(), dense)
    assert torch.equal(out.codes.l0(), (dense != 0).sum(1))
    assert torch.allclose(out.x_hat, dense @ m.W_dec + m.b_dec, atol=1e-5)
    assert torch.allclose(m(x), m.denormalize(out.x_hat), atol=1e-6)


def test_hard_flag_switches_training_mode_to_hard():
    m = SoftSAE(D, N, 4, backend="reference").train()
    m.hard = True
    out = m.forward_train(_x())
    assert out.codes.is_sparse and torch.all(out.codes.l0() <= out.k_hat.floor())


def test_topk_forward_and_encode_decode():
    m = TopKSAE(D, N, 5, backend="reference").eval()
    m.set_normalization(torch.full((D,), 0.5), 2.0)
    x = _x()
    z = m.encode(x)
    pre = _pre(m, x)
    ref = torch.zeros_like(pre).scatter(1, torch.topk(pre, 5).indices, torch.topk(pre, 5).values)
    assert torch.allclose(z, ref)
    vals, idx = m.encode(x, sparse=True)
    assert torch.allclose(m.decode((vals, idx)), m.decode(z), atol=1e-5)
    assert torch.allclose(m(x), (ref @ m.W_dec + m.b_dec) * 2.0 + 0.5, atol=1e-5)


def test_batchtopk_training_keeps_k_times_b_and_learns_threshold():
    m = BatchTopKSAE(D, N, 3, threshold_beta=0.5, backend="reference").train()
    x = _x()
    out = m.forward_train(x)
    pre = _pre(m, x)
    kth = torch.topk(pre.flatten(), 3 * B).values[-1]
    assert int(out.codes.l0().sum()) == 3 * B
    assert out.codes.l0().float().std() > 0  # per-row counts vary
    assert torch.isclose(m.threshold, kth)
    m.forward_train(x)  # EMA with the same batch minimum keeps it
    assert torch.isclose(m.threshold, kth)
    m.eval()
    ev = m.forward_train(x)
    assert torch.equal(ev.codes.l0(), (pre > m.threshold).sum(1))


def test_codes_helpers():
    vals = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    idx = torch.tensor([[4, 0, -1], [2, -1, -1]])
    c = Codes(5, vals=vals, idx=idx)
    dense = torch.tensor([[2.0, 0, 0, 0, 1.0], [0, 0, 3.0, 0, 0]])
    assert torch.equal(c.to_dense(), dense)
    assert c.l0().tolist() == [2, 1]
    assert c.fired().tolist() == [True, False, True, False, True]
    assert Codes(5, dense=dense).fired().tolist() == c.fired().tolist()


def test_build_model_round_trip_config():
    for m in (SoftSAE(D, N, 4, k_max=7, alpha=0.02), TopKSAE(D, N, 3), BatchTopKSAE(D, N, 3)):
        assert build_model(m.config()).config() == m.config()


def test_decoder_projection_and_renorm():
    m = TopKSAE(D, N, 3)
    m.W_dec.grad = torch.randn(N, D)
    m.project_decoder_grad()
    assert torch.allclose((m.W_dec.grad * m.W_dec).sum(1), torch.zeros(N), atol=1e-5)
    with torch.no_grad():
        m.W_dec.mul_(3.0)
    m.normalize_decoder()
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(N), atol=1e-6)


# ----------------------------------------------------------------------------- loss terms


def test_reconstruction_loss_and_fvu_direct():
    x, y = _x(), _x(seed=1)
    direct = sum(float(((x[b] - y[b]) ** 2).sum()) for b in range(B)) / B
    assert math.isclose(float(reconstruction_loss(x, y)), direct, rel_tol=1e-5)
    mu = x.mean(0)
    direct_fvu = float(((x - y) ** 2).sum()) / float(((x - mu) ** 2).sum())
    assert math.isclose(float(fvu(x, y)), direct_fvu, rel_tol=1e-5)


def test_k_loss_direct():
    k_hat = torch.tensor([3.0, 6.0, 7.5], requires_grad=True)
    loss = k_loss(k_hat, 5.0, beta=5.0)
    delta = (3 + 6 + 7.5) / 3 - 5
    assert math.isclose(loss.item(), math.log1p(math.exp(5 * delta)) / 5, rel_tol=1e-6)
    loss.backward()
    sig = 1 / (1 + math.exp(-5 * delta))
    assert torch.allclose(k_hat.grad, torch.full((3,), sig / 3))
    assert float(k_loss(torch.tensor([1.0, 1.0]), 20.0)) < 1e-10  # below budget: ~free


def test_auxk_loss_direct():
    torch.manual_seed(3)
    pre = torch.relu(torch.randn(B, N)).requires_grad_()
    resid = torch.randn(B, D)
    W = F.normalize(torch.randn(N, D), dim=1).requires_grad_()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    loss = auxk_loss(pre, resid, dead, W, k_aux=5, backend="reference")
    # direct: dense codes of the 5 largest dead pre-activations per row, decoded without bias
    z = torch.zeros(B, N)
    dead_idx = dead.nonzero().squeeze(1)
    for b in range(B):
        top = dead_idx[torch.topk(pre[b, dead_idx].detach(), 5).indices]
        z[b, top] = pre[b, top].detach()
    e_hat = z @ W.detach()
    num = ((resid - e_hat) ** 2).sum(1).mean()
    den = ((resid - resid.mean(0)) ** 2).sum(1).mean()
    assert math.isclose(loss.item(), float(num / den), rel_tol=1e-5)
    loss.backward()
    assert pre.grad[:, ~dead].abs().sum() == 0 and pre.grad[:, dead].abs().sum() > 0
    assert auxk_loss(pre, resid, torch.zeros(N, dtype=torch.bool), W, 5).item() == 0.0
    # fewer dead latents than k_aux: uses all of them
    one = torch.zeros(N, dtype=torch.bool)
    one[7] = True
    l1 = auxk_loss(pre.detach(), resid, one, W.detach(), k_aux=5, backend="reference")
    e1 = pre.detach()[:, 7:8] * W.detach()[7]
    assert math.isclose(float(l1), float(((resid - e1) ** 2).sum(1).mean() / den), rel_tol=1e-5)


def test_dead_latent_tracker():
    t = DeadLatentTracker(4, threshold=100)
    t.update(torch.tensor([True, False, False, False]), 60)
    t.update(torch.tensor([False, True, False, False]), 60)
    assert t.tokens_since_fired.tolist() == [60, 0, 120, 120]
    assert t.dead_mask().tolist() == [False, False, True, True] and t.n_dead() == 2
    t2 = DeadLatentTracker(4, 1)
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2.tokens_since_fired, t.tokens_since_fired) and t2.threshold == 100


# ----------------------------------------------------------------------------- metrics helpers


def test_spearman_and_ranks():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # with ties: Pearson correlation of average ranks
    a, b = [1, 2, 2, 3, 5], [2, 1, 4, 4, 9]
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman(a, b) == pytest.approx(float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum())))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_dictionary_recovery():
    T = F.normalize(torch.randn(10, D), dim=1)
    learned = torch.cat([T * 3.0, F.normalize(torch.randn(5, D), dim=1)])
    rec = dictionary_recovery(learned, T.numpy())
    assert rec["mean_max_cos"] == pytest.approx(1.0) and rec["frac_above_0.9"] == 1.0


def test_softsae_k_round_and_validation():
    m = SoftSAE(D, N, 4, backend="reference", k_round="round").eval()
    k_hat = torch.tensor([1.2, 2.5, 3.49, 3.5, 7.99])
    assert torch.equal(m.hard_k(k_hat), torch.tensor([1.0, 3.0, 3.0, 4.0, 8.0]))
    m.k_round = "floor"
    assert torch.equal(m.hard_k(k_hat), torch.tensor([1.0, 2.0, 3.0, 3.0, 7.0]))
    with pytest.raises(ValueError, match="k_round"):
        SoftSAE(D, N, 4, k_round="ceil")
    r = build_model(SoftSAE(D, N, 4, k_round="round", alpha_relative=True).config())
    assert r.k_round == "round" and r.alpha_relative


def test_softsae_round_mode_selects_round_k_hat():
    m = SoftSAE(D, N, 4, backend="reference", k_round="round").eval()
    with torch.no_grad():
        m.k_estimator[2].weight.normal_(0, 0.3)
    out = m.forward_train(m.normalize(_x()))
    assert torch.equal(out.codes.l0(), torch.floor(out.k_hat + 0.5).long())


def test_softsae_alpha_relative_scales_per_row():
    m = SoftSAE(D, N, 4, alpha=0.05, backend="reference", alpha_relative=True, decode_mode="sparse").train()
    x_n = m.normalize(_x())
    out = m.forward_train(x_n)
    pre = _pre(m, _x()).detach()
    s = pre.amax(-1, keepdim=True)
    p = soft_topk(pre / s, out.k_hat, 0.05, backend="reference")
    assert not out.codes.is_sparse  # the relative scale uses the dense path
    assert torch.allclose(out.codes.to_dense(), pre * p, atol=1e-6)
    # equivalent to an absolute alpha of 0.05 * max for a single row
    p0 = soft_topk(pre[:1], out.k_hat[:1], 0.05 * float(s[0]), backend="reference")
    assert torch.allclose(p[:1], p0, atol=1e-5)


def test_softsae_straight_through_hard_forward_soft_backward():
    m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").train()
    with torch.no_grad():
        m.k_estimator[2].weight.normal_(0, 0.3)
    m.straight_through = True
    x_n = m.normalize(_x())
    out = m.forward_train(x_n)
    m.eval()
    hard = m.forward_train(x_n)
    m.train()
    assert torch.allclose(out.codes.to_dense(), hard.codes.to_dense(), atol=1e-6)  # forward = hard selection
    assert torch.equal(out.codes.l0(), hard.codes.l0())
    out.x_hat.pow(2).sum().backward()
    g = m.k_estimator[2].weight.grad  # the hard top-k alone gives the k head no gradient
    assert g is not None and g.abs().sum() > 0


def test_softsae_straight_through_k_mode():
    """st_mode "k": hard forward; W_enc's gradient is the hard codes' own (as in the hard phase with
    the same per-row budgets); the k head still gets the soft gate's gradient."""
    x = _x()
    grads = {}
    for mode in ("k", "hard"):
        torch.manual_seed(3)
        m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").train()
        with torch.no_grad():
            m.k_estimator[2].weight.normal_(0, 0.3)
        if mode == "k":
            m.straight_through, m.st_mode = True, "k"
        else:
            m.hard = True
        out = m.forward_train(m.normalize(x))
        out.x_hat.pow(2).sum().backward()
        grads[mode] = (out.x_hat.detach(), m.W_enc.grad.clone(), m.W_dec.grad.clone(), m.k_estimator[2].weight.grad)
    assert torch.allclose(grads["k"][0], grads["hard"][0], atol=1e-6)  # forward = hard selection
    assert torch.allclose(grads["k"][1], grads["hard"][1], atol=1e-5)  # encoder: TopK's gradient
    assert torch.allclose(grads["k"][2], grads["hard"][2], atol=1e-5)  # decoder too
    assert grads["k"][3] is not None and grads["k"][3].abs().sum() > 0  # the k head learns
    assert grads["hard"][3] is None or grads["hard"][3].abs().sum() == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 2.0])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("decode_mode", ["auto", "dense"])
def test_softsae_straight_through_k_mode_equals_dense_formula(backend, alpha, relative, decode_mode):
    """The st_mode "k" step (hard codes + SoftSAE.k_direction) gives the same forward and every
    gradient as the dense formula (helpers.dense_straight_through_k) decoded by a GEMM."""
    if backend not in softsae.available_backends("cpu"):
        pytest.skip(f"backend {backend} not built")
    n = 600
    x = _x(rows=32, seed=5) @ torch.randn(D, D)
    grads = {}
    for path in ("fast", "dense"):
        torch.manual_seed(7)
        m = SoftSAE(D, n, 6, alpha=alpha, backend=backend, decode_mode=decode_mode,
                    alpha_relative=relative).double().train()
        with torch.no_grad():
            m.k_estimator[2].weight.normal_(0, 0.3)
            m.b_dec.normal_(0, 0.1)
        m.straight_through, m.st_mode = True, "k"
        x_n = m.normalize(x.double())
        if path == "fast":
            out = m.forward_train(x_n)
            x_hat = out.x_hat
        else:
            pre = m.pre_acts(x_n)
            k_hat = m.k_hat_norm(x_n)
            z_hard = m._hard_codes(pre, m.hard_k(k_hat)).to_dense()
            z = dense_straight_through_k(z_hard, pre, k_hat, m.soft_dense)
            x_hat = z @ m.W_dec + m.b_dec
        loss = (x_hat - x_n).pow(2).sum() + 0.1 * x_hat.sin().sum()
        loss.backward()
        grads[path] = [x_hat.detach()] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["fast"], grads["dense"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert grads["fast"][-2].abs().sum() > 0  # the k head's output layer learns


def test_softsae_hard_phase_without_encoder_gradient():
    x = _x()
    for enc_grad in (True, False):
        m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").train()
        m.hard, m.hard_encoder_grad = True, enc_grad
        m.forward_train(m.normalize(x)).x_hat.pow(2).sum().backward()
        assert (m.W_enc.grad is not None and m.W_enc.grad.abs().sum() > 0) == enc_grad
        assert m.W_dec.grad.abs().sum() > 0


def test_topk_k_train_used_only_in_training():
    m = TopKSAE(D, N, 3, backend="reference").train()
    m.k_train = 7
    x_n = m.normalize(_x())
    assert torch.all(m.forward_train(x_n).codes.l0() <= 7) and m.forward_train(x_n).codes.l0().max() > 3
    m.eval()
    assert torch.all(m.forward_train(x_n).codes.l0() <= 3)


def test_softsae_diagnostics_agree_with_direct_computations():
    from softsae.metrics import evaluate, softsae_diagnostics

    m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").eval()
    with torch.no_grad():
        m.k_estimator[2].weight.normal_(0, 0.3)
        m.b_enc.normal_(0, 0.2)
    x = _x(200)
    r = softsae_diagnostics(m, x.numpy(), counts=torch.randint(1, 8, (200,)).numpy())
    assert r["floor"]["fvu"] == pytest.approx(evaluate(m, x.numpy())["fvu"], rel=1e-5)
    x_n = m.normalize(x)
    pre, k_hat = _pre(m, x).detach(), m.k_hat_norm(x_n).detach()
    W_dec, b_dec = m.W_dec.detach(), m.b_dec.detach()
    den = float((x_n - x_n.mean(0)).pow(2).sum())
    z = pre * soft_topk(pre, k_hat, 0.05, backend="reference")
    assert r["soft"]["fvu"] == pytest.approx(float((x_n - z @ W_dec - b_dec).pow(2).sum()) / den, rel=1e-4)
    assert r["round"]["mean_l0"] == pytest.approx(float(torch.floor(k_hat + 0.5).mean()))
    assert r["batch_threshold"]["mean_l0"] == pytest.approx(r["floor"]["mean_l0"], abs=0.01)
    assert r["uniform_topk"]["mean_l0"] == r["floor"]["mean_l0"] and sum(r["l0_hist"]) == 200
    assert -1 <= r["difficulty"]["spearman_khat"] <= 1 and "spearman_l0" in r["truth"]
    # a constant budget: the floor selection *is* the uniform top-K
    with torch.no_grad():
        m.k_estimator[2].weight.zero_()
    r = softsae_diagnostics(m, x.numpy())
    assert r["floor"]["fvu"] == pytest.approx(r["uniform_topk"]["fvu"], rel=1e-6)
    with pytest.raises(ValueError, match="needs a SoftSAE"):
        softsae_diagnostics(TopKSAE(D, N, 3), x.numpy())


def test_batchtopk_k_train_used_only_in_training():
    m = BatchTopKSAE(D, N, 2, backend="reference").train()
    m.k_train = 6
    pre = _pre(m, _x()).detach()
    out = m.forward_train(m.normalize(_x()))
    assert int(out.codes.l0().sum()) == min(6 * B, int((pre > 0).sum()))
    m.k_train = None
    assert int(m.forward_train(m.normalize(_x())).codes.l0().sum()) == min(2 * B, int((pre > 0).sum()))


def test_evaluate_per_row_sse_sums_to_fvu():
    from softsae.metrics import evaluate

    m = SoftSAE(D, N, 4, alpha=0.05, backend="reference").eval()
    x = _x(300).numpy()
    r = evaluate(m, x, batch_size=128, return_per_row=True)
    sse = r["per_row"]["sse"]
    assert sse.shape == (300,) and sse.dtype == np.float64
    x_hat = m.denormalize(m.forward_train(m.normalize(torch.from_numpy(x))).x_hat).detach().double().numpy()
    np.testing.assert_allclose(sse, ((x - x_hat) ** 2).sum(1), rtol=1e-5)
    centred = ((x - x.mean(0)) ** 2).sum()
    assert r["fvu"] == pytest.approx(sse.sum() / centred, rel=1e-6)
