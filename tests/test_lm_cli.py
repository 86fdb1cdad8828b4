"""softsae activations / train (streamed) / eval --lm and --recipe on a tiny random causal Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_lm import make_tiny_llama, sample_texts  # noqa: E402

from softsae.cli import main  # noqa: E402
from softsae.corpus import Document  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), n_layers=4, d=16)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text("\n\n".join(sample_texts(60, seed=5, min_words=5, max_words=60)), encoding="utf-8")
    return p


def test_extract_corpus_causal_resumes_and_matches_direct_forward(tiny_dir, tmp_path, monkeypatch):
    import softsae.activations as act_mod
    from softsae.activations import extract_corpus
    from softsae.lm import batch_windows, load_lm

    docs = [Document(f"d/{i}", "text", t) for i, t in enumerate(sample_texts(10, seed=1, min_words=20,
                                                                             max_words=50))]
    kw = dict(model_path=tiny_dir, heldout_frac=0.0, seq_len=16, batch_size=3, shard_docs=3)
    ref = extract_corpus(tmp_path / "ref.npy", docs, **kw)
    assert ref["settings"]["layer"] == "model.layers.1" and ref["settings"]["windows"].startswith("document")
    lm = load_lm(tiny_dir)
    wins = lm.windows([d.text for d in docs], 16)
    ids, att, keep = batch_windows(wins, lm.pad_id)
    direct = lm.residual(ids, att)[keep].numpy()
    a = np.load(ref["paths"]["train"])
    assert a.shape == direct.shape and len(a) == sum(len(w.ids) - 1 for w in wins)  # BOS dropped, all else kept
    np.testing.assert_allclose(a, direct, atol=1e-5)

    real = act_mod._write_shard
    calls = []

    def failing(shard_dir, index, acts, listing):
        if calls:
            raise KeyboardInterrupt("interrupted")
        calls.append(index)
        real(shard_dir, index, acts, listing)

    monkeypatch.setattr(act_mod, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(tmp_path / "run.npy", docs, **kw)
    monkeypatch.setattr(act_mod, "_write_shard", real)
    again = extract_corpus(tmp_path / "run.npy", docs, **kw)
    assert again["new_rows"] < len(a)  # the first shard was not recomputed
    np.testing.assert_array_equal(np.load(again["paths"]["train"]), a)


def test_cli_stream_train_resume_and_eval_lm(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--text", str(text_file), "--seq-len", "16", "--buffer-tokens", "256",
            "--dict-size", "32", "--k", "4", "--steps", "12", "--batch-size", "64", "--out", str(out),
            "--no-progress", "--backend", "reference", "--checkpoint-every", "4", "--eval-rows", "200",
            "--recipe", "paper"]
    assert main(args) == 0, capsys.readouterr().err
    stream = json.loads((out / "stream.json").read_text())
    assert stream["layer"] == "model.layers.1" and stream["model"] == str(tiny_dir)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["recipe"] == "paper" and cfg["st_steps"] == 0 and cfg["alpha_anneal_steps"] == 12
    assert cfg["hard_encoder_grad"] is False and cfg["alpha"] == pytest.approx(1e-4)
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--lm", str(tiny_dir), "--text", str(text_file), "--seq-len", "16",
                 "--max-tokens", "300", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_mean", "frac_recovered_zero",
                "frac_recovered_mean", "kl_mean", "l0_mean", "tokens"):
        assert isinstance(rep[key], (int, float)), key
    assert rep["tokens"] >= 300 and rep["layer"] == "model.layers.1" and rep["k_hat_mean"] is not None
    assert set(rep["information"]) == {"k_hat", "l0"}
    assert main(["eval", "--model", str(out), "--lm", str(tiny_dir), "--text", str(text_file), "--seq-len", "16",
                 "--max-tokens", "300", "--cache-dir", "none"]) == 0
    assert "frac. recovered" in capsys.readouterr().out


def test_cli_eval_lm_and_recipe_errors(tiny_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--lm", "smollm2", "--data", "x.npy"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse choices
        main(["train", "--data", "x.npy", "--dict-size", "8", "--k", "2", "--steps", "2", "--out",
              str(tmp_path / "r"), "--recipe", "nope"])
    assert exc.value.code == 2
    from softsae.recipes import recipe_config

    c = recipe_config("paper", dict_size=16384, steps=10_000, k=32)
    assert c.lr == pytest.approx(3e-4) and c.alpha_anneal_steps == 2500 and c.k_anneal_frac == 0.01
    assert recipe_config("paper", dict_size=16384, steps=10_000, k=32, lr=1e-3).lr == 1e-3  # flags win
    assert recipe_config("default", steps=10).st_frac is None
    with pytest.raises(ValueError, match="--recipe"):
        recipe_config("fancy", steps=10)


def test_streamed_causal_run_resumes_to_the_same_weights(tiny_dir, text_file, tmp_path, monkeypatch):
    from softsae.checkpoint import load_sae
    from softsae.stream import ActivationBuffer as Buffer

    def args(out, *extra):
        return ["train", "--model", str(tiny_dir), "--text", str(text_file), "--seq-len", "16", "--buffer-tokens",
                "128", "--dict-size", "32", "--k", "4", "--steps", "6", "--batch-size", "32", "--out", str(out),
                "--no-progress", "--backend", "reference", "--checkpoint-every", "3", "--eval-rows", "64",
                "--seed", "1", *extra]

    assert main(args(tmp_path / "full")) == 0
    want = load_sae(tmp_path / "full").state_dict()
    real, calls = Buffer.sample, {"n": 0}

    def crash(self, batch_size, rng=None):
        calls["n"] += 1
        if calls["n"] == 6:  # the geometric-median batch, steps 0-3, then step 4's batch
            raise KeyboardInterrupt
        return real(self, batch_size, rng)

    monkeypatch.setattr(Buffer, "sample", crash)
    assert main(args(tmp_path / "cut")) == 130
    monkeypatch.setattr(Buffer, "sample", real)
    assert main(args(tmp_path / "cut", "--resume")) == 0
    got = load_sae(tmp_path / "cut").state_dict()
    for key in want:
        assert torch.equal(want[key], got[key]), key
