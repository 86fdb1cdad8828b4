from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tiny_lm import make_tiny_llama, sample_texts  # noqa: E402

from softsae.lm import batch_windows, load_lm  # noqa: E402
from softsae.lm_eval import REPORT_KEYS, LMEvaluator, information_correlations  # noqa: E402
from softsae.models import TopKSAE  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_lm(make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), n_layers=3))


@pytest.fixture(scope="module")
def texts():
    return sample_texts(12, seed=3, min_words=2, max_words=30)


def independent_ce(lm, texts, seq_len, fn):
    """CE over scored tokens with the layer output at kept positions replaced by fn, written out directly."""
    wins = lm.windows(texts, seq_len)
    ids, att, keep = batch_windows(wins, lm.pad_id)
    module = dict(lm.model.named_modules())[lm.spec.default_layer]

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        if fn is not None:
            h[keep] = fn(h[keep])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=att).logits
    finally:
        handle.remove()
    losses = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if keep[b, t] and att[b, t + 1]:
                losses.append(F.cross_entropy(logits[b, t][None], ids[b, t + 1][None]).item())
    return float(np.mean(losses)), len(losses)


def test_identity_recovers_all_and_zero_sae_is_zero_ablation(tiny, texts, tmp_path):
    ev = LMEvaluator(tiny, texts, seq_len=10, batch_size=3, cache_dir=tmp_path)
    ident = ev.evaluate(splice=lambda h: (h, None, None))
    assert set(REPORT_KEYS) <= set(ident)
    assert ident["ce_loss_sae"] == pytest.approx(ident["ce_loss_clean"], abs=1e-5)
    assert ident["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ident["frac_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(ident["kl_mean"]) < 1e-3  # float16 cached clean log-probs
    assert ident["ce_loss_zero"] > ident["ce_loss_clean"] + 1e-3

    sae = TopKSAE(tiny.d_model, 64, 4)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    rep = ev.evaluate(sae)
    assert rep["ce_loss_sae"] == pytest.approx(rep["ce_loss_zero"], abs=1e-5)
    assert rep["frac_recovered_zero"] == pytest.approx(0.0, abs=1e-4)
    assert rep["kl_mean"] == pytest.approx(rep["kl_zero"], abs=2e-3)
    assert rep["l0_mean"] == pytest.approx(4.0) and rep["l0_hist"][4] == rep["tokens"]


def test_spliced_ce_matches_an_independent_computation(tiny, texts):
    torch.manual_seed(1)
    sae = TopKSAE(tiny.d_model, 64, 3).eval()
    ev = LMEvaluator(tiny, texts, seq_len=10, batch_size=4)
    rep = ev.evaluate(sae)
    ref_sae, n = independent_ce(tiny, texts, 10, lambda h: sae(h))
    ref_clean, _ = independent_ce(tiny, texts, 10, None)
    ref_zero, _ = independent_ce(tiny, texts, 10, torch.zeros_like)
    assert rep["tokens"] == n
    assert rep["ce_loss_sae"] == pytest.approx(ref_sae, abs=1e-5)
    assert rep["ce_loss_clean"] == pytest.approx(ref_clean, abs=1e-5)
    assert rep["frac_recovered_zero"] == pytest.approx((ref_zero - ref_sae) / (ref_zero - ref_clean), abs=1e-4)
    ids, att, keep = batch_windows(tiny.windows(texts, 10), tiny.pad_id)
    mean = tiny.residual(ids, att)[keep].double().mean(0).float()  # over the spliced positions
    ref_mean, _ = independent_ce(tiny, texts, 10, lambda h: mean.expand_as(h))
    assert rep["ce_loss_mean"] == pytest.approx(ref_mean, abs=1e-5)
    assert rep["frac_recovered_mean"] == pytest.approx((ref_mean - ref_sae) / (ref_mean - ref_clean), abs=1e-4)


def test_cache_is_reused_and_keyed(tiny, texts, tmp_path, monkeypatch):
    a = LMEvaluator(tiny, texts, seq_len=10, cache_dir=tmp_path).baselines()
    assert len(list(tmp_path.glob("*.npz"))) == 1
    ev = LMEvaluator(tiny, texts, seq_len=10, cache_dir=tmp_path)
    monkeypatch.setattr(LMEvaluator, "_compute_baselines", lambda self: pytest.fail("baselines recomputed"))
    assert ev.baselines() == a
    monkeypatch.undo()
    LMEvaluator(tiny, texts[:-1], seq_len=10, cache_dir=tmp_path).baselines()  # other texts: another entry
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_max_tokens_errors_and_correlations(tiny, texts):
    ev = LMEvaluator(tiny, texts, seq_len=10, max_tokens=20)
    assert 20 <= ev.tokens < 20 + 10
    with pytest.raises(ValueError, match="text"):
        LMEvaluator(tiny, ["", "  "])
    rep = ev.evaluate(TopKSAE(tiny.d_model, 64, 3), per_token=True)
    per = rep["per_token"]
    assert all(len(v) == ev.tokens for v in per.values())
    info = information_correlations({**per, "k_hat": per["surprisal"] * 2 + 1})
    assert info["k_hat"]["surprisal"] == pytest.approx(1.0)
    assert np.isnan(info["l0"]["surprisal"])  # TopK: constant L0
