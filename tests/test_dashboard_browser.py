"""The dashboard page in a real browser: headless Chromium (Debian's ``chromium``) opens the
``softsae dashboard`` output from disk, the DOM is checked against the data (cards, contexts, the
token view, the summary), the page is clicked through, no console error and no request other
than the file itself is allowed, and a screenshot is taken. Skips when no chromium is installed
(CI installs it in its own stage, .ci/browser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_lm import make_tiny_llama, sample_texts

from softsae.checkpoint import save_sae
from softsae.cli import main
from softsae.dashboard.browser import HeadlessChromium, find_chromium
from softsae.models import SoftSAE, TopKSAE

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium executable (apt-get install chromium; "
                                "CI runs this test in .ci/browser, which installs it)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dash")
    lm_dir = make_tiny_llama(root / "llama", n_layers=2, d=32)
    text = root / "text.txt"
    text.write_text("\n\n".join(sample_texts(40, seed=1, min_words=8)) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    soft = SoftSAE(32, 64, 4.0, k_max=8.0)
    with torch.no_grad():
        soft.k_estimator[2].weight.normal_(0, 0.5)  # k_hat varies by token
    save_sae(soft, root / "soft")
    save_sae(TopKSAE(32, 64, 3), root / "topk")
    out = {}
    for name, extra in (("soft", ["--latents", "30", "--lm-eval-tokens", "64"]),
                        ("topk", ["--latent-ids", "5,9", "3", "--lm-eval-tokens", "0"])):
        code = main(["dashboard", "--model", str(root / name), "--lm", str(lm_dir), "--layer", "model.layers.0",
                     "--text", str(text), "--out", str(root / f"out_{name}"), "--seq-len", "24",
                     "--view-tokens", "120", "--no-progress", *extra])
        assert code == 0
        out[name] = root / f"out_{name}" / "index.html"
    return out


def _count(b: HeadlessChromium, selector: str) -> int:
    return b.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")


def test_softsae_page_renders_what_the_data_holds(pages, tmp_path):
    page = pages["soft"]
    data = json.loads((page.parent / "data.json").read_text())
    cards, view = data["latents"], data["view"]
    assert len(cards) == 30 and len(view) == 120 and data["summary"]["k_hat"] is not None
    with HeadlessChromium(width=1280, height=900) as b:
        b.open(page)
        assert b.evaluate("document.body.dataset.rendered") == "ok"
        # cards: the first page of 24, each with the contexts, samples, neighbours and logit-lens tokens of its data
        assert _count(b, ".latent-card") == 24
        assert b.evaluate("document.querySelector('.page-info').textContent") == "page 1 of 2 (30 latents)"
        shown = b.evaluate("[...document.querySelectorAll('.latent-card')].map(e => Number(e.dataset.latent))")
        assert shown == [c["id"] for c in cards[:24]]
        for c in cards[:3]:
            sel = f"#latent-{c['id']} "
            assert _count(b, sel + ".top-contexts .ctx") == len(c["top"]) > 0
            assert _count(b, sel + ".quantile-samples .ctx") == len(c["samples"]) > 0
            assert _count(b, sel + ".neigh .chip") == len(c["neighbours"]) == 6
            assert _count(b, sel + ".chip.up") == len(c["promoted"]) == 10
            assert _count(b, sel + ".chip.down") == 10
            assert _count(b, sel + "svg.chart rect") == len(c["hist"]["counts"])
            n_tok = sum(len(x["t"]) for x in c["top"] + c["samples"])
            assert _count(b, sel + ".ctx .tok") == n_tok
            assert _count(b, sel + ".ctx .tok.center") == len(c["top"]) + len(c["samples"])
        # the explanation-length view: every token twice (k_hat and surprisal), then a click lists its latents
        assert _count(b, "#view-k .tok") == _count(b, "#view-s .tok") == len(view)
        i = next(j for j, t in enumerate(view) if t.get("lat"))
        b.evaluate(f"document.querySelector('#view-k .tok[data-i=\"{i}\"]').click()")
        assert _count(b, "#token-detail .lat-list > div") == len(view[i]["lat"])
        assert _count(b, "#view-grid .tok.sel") == 2
        # summary: FVU and the LM metrics of softsae.lm_eval
        rows = dict(b.evaluate("[...document.querySelectorAll('#summary-table tr')]"
                               ".map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
        assert float(rows["FVU"]) == pytest.approx(data["summary"]["fvu"], rel=2e-3)
        lm_rows = dict(b.evaluate("[...document.querySelectorAll('#lm-table tr')]"
                                  ".map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
        lm = data["summary"]["lm_metrics"]
        assert len(lm_rows) == len(lm) and {"ce_loss_clean", "frac_recovered_zero", "kl_mean"} <= set(lm)
        assert float(lm_rows["CE loss, clean"]) == pytest.approx(lm["ce_loss_clean"], rel=2e-3)
        assert float(lm_rows["KL(clean \u2016 SAE), mean"]) == pytest.approx(lm["kl_mean"], rel=2e-3, abs=1e-4)
        assert _count(b, "#summary-body svg.chart") == 3  # L0, k_hat and firing-frequency histograms
        # paging, filtering, and a latent link that jumps to its card
        b.evaluate("document.querySelector('.next').click()")
        assert _count(b, ".latent-card") == 6
        ids = [c["id"] for c in cards]
        src = next(c for c in cards if c["neighbours"][0][0] in ids)  # a card whose nearest latent has a card too
        b.evaluate(f"const f = document.getElementById('filter'); f.value = '{src['id']}'; "
                   "f.dispatchEvent(new Event('input'))")
        assert _count(b, ".latent-card") == 1
        b.evaluate(f"document.querySelector('#latent-{src['id']} .neigh a.lat').click()")
        dst = src["neighbours"][0][0]
        assert _count(b, f"#latent-{dst}") == 1 and b.evaluate("document.getElementById('filter').value") == ""
        png = b.screenshot()
        errors, requests = b.console_errors(), b.requests
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests  # no network, no other file
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "page.png").write_bytes(png)


def test_topk_page_shades_by_l0_and_keeps_the_given_order(pages):
    page = pages["topk"]
    data = json.loads((page.parent / "data.json").read_text())
    assert data["summary"]["k_hat"] is None and data["summary"]["lm_metrics"] is None
    with HeadlessChromium() as b:
        b.open(page)
        assert b.evaluate("document.body.dataset.rendered") == "ok"
        shown = b.evaluate("[...document.querySelectorAll('.latent-card')].map(e => Number(e.dataset.latent))")
        assert shown == [5, 9, 3]
        assert _count(b, "#view-k .tok") == len(data["view"])
        assert "L0" in b.evaluate("document.querySelector('#view-k').parentElement.textContent")
        assert _count(b, "#summary-body svg.chart") == 2
        assert b.console_errors() == []
