"""``softsae dashboard``: argument parser and command (registered by ``softsae.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_HELDOUT_FRAC = 0.1  # the default text: the held-out documents of `softsae activations --heldout-frac 0.1`


def _latent_ids(value: str) -> list[int]:
    """One --latent-ids argument: an integer or a comma-separated list of them."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent ids must be integers, got {value!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="a self-contained HTML report of an SAE's latents and per-token k_hat / L0",
                       description="Run the language model over text once and write OUT/index.html (opens from "
                       "disk: no server, no network): a summary (FVU, L0 histogram, dead latents), the explanation-"
                       "length view (a document shaded token by token by k_hat or L0, beside the LM's surprisal "
                       "for a causal LM) and latent cards (top-activating contexts, activation quantile samples, "
                       "firing density and histogram, decoder norm and nearest latents, logit lens for a causal LM).")
    p.add_argument("--model", required=True, help="the SAE: a run directory (or any file / folder that "
                   "softsae.load_sae reads)")
    p.add_argument("--lm", default=None, help="language model: minilm | smollm2 | a local Hugging Face directory | "
                   "a .gguf file (default: the run's stream.json model, else minilm)")
    p.add_argument("--layer", default=None, help="module whose output the SAE reads (default: the run's stream.json "
                   "layer when the LM is the run's, else the LM's default layer)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 text files, one document per "
                   "blank-line-separated paragraph (default: the held-out 10%% of the built-in Python docs corpus, "
                   "split as by softsae activations --heldout-frac 0.1)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--latents", type=int, default=100, metavar="N",
                     help="cards for the N most frequent latents on the text (default 100)")
    sel.add_argument("--latent-ids", type=_latent_ids, nargs="+", default=None, metavar="ID",
                     help="cards for these latents, in this order (space- or comma-separated)")
    p.add_argument("--out", required=True, help="output directory: index.html (the page) and data.json")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--max-tokens", type=int, default=100_000,
                   help="stop after this many SAE tokens (default 100000; 0: the whole text)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per LM forward (default 8)")
    p.add_argument("--top-k", type=int, default=10, help="top-activating contexts per latent (default 10)")
    p.add_argument("--view-tokens", type=int, default=400,
                   help="tokens in the explanation-length view (default 400)")
    p.add_argument("--no-surprisal", action="store_true", help="causal LM: run the model only up to the SAE's layer "
                   "(about twice as fast for a mid-depth layer); no surprisal beside k_hat, no correlations")
    p.add_argument("--lm-eval-tokens", type=int, default=2048, metavar="N",
                   help="causal LM: CE loss recovered / KL of the SAE splice (softsae.lm_eval) on the first N "
                   "scored tokens of the text, shown in the summary (4 forward passes over them; default 2048; "
                   "0: skip)")
    p.add_argument("--eval-json", default=None, metavar="FILE",
                   help="show this JSON report (e.g. `softsae eval ... --json`) in the summary instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="SAE ops backend (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(a: argparse.Namespace) -> None:
    for name, lo in (("max_tokens", 0), ("seq_len", 3), ("batch_size", 1), ("top_k", 1), ("view_tokens", 0),
                     ("lm_eval_tokens", 0)):
        if getattr(a, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    if a.latent_ids is None and a.latents < 1:
        raise ValueError(f"--latents must be >= 1, got {a.latents}")
    from softsae.config import check_device

    if a.device == "auto":
        raise ValueError("--device auto: give cpu, cuda or cuda:N")
    check_device(a.device)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise FileExistsError(f"--out {out} is not empty (pass --force to write into it)")


def default_documents() -> list:
    """The held-out documents of the built-in corpus (``softsae.corpus``), split as by ``softsae
    activations --heldout-frac 0.1``."""
    from softsae.corpus import python_docs_corpus, split_documents

    return split_documents(python_docs_corpus(), DEFAULT_HELDOUT_FRAC)[1]


def document_texts(docs: list, causal: bool) -> list[str]:
    """What the LM reads, as ``softsae activations`` does: one text per document for a causal LM (its
    paragraphs joined), one per paragraph (of >= 20 characters) for MiniLM-style encoders."""
    from softsae.lm import lm_texts

    texts = lm_texts(docs, causal)
    if not texts:
        raise ValueError("--text: no paragraph of 20 or more characters in the file(s)")
    return texts


def _numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a (nested) JSON report, keys joined with '.'."""
    out: dict[str, float] = {}
    for k, v in report.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = v
        elif isinstance(v, dict) and k not in ("per_row", "per_token", "diagnostics"):
            out.update(_numbers(v, prefix + k + "."))
    return out


def _run_settings(model: str) -> dict[str, Any]:
    """stream.json of a streamed training run (model, layer, seq_len), or {}."""
    path = Path(model) / "stream.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run(a: argparse.Namespace) -> int:
    from softsae.checkpoint import load_sae
    from softsae.dashboard.build import build_dashboard
    from softsae.dashboard.collect import Settings

    _check(a)
    sae = load_sae(a.model, device=a.device, backend=a.backend)
    ids = None if a.latent_ids is None else [i for group in a.latent_ids for i in group]
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < sae.n]
        if bad:
            raise ValueError(f"--latent-ids {bad[:8]} out of range: the SAE has latents 0..{sae.n - 1}")
    eval_report = None
    if a.eval_json is not None:
        path = Path(a.eval_json)
        if not path.is_file():
            raise FileNotFoundError(f"--eval-json {path}: no such file")
        try:
            eval_report = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"--eval-json {path}: not a JSON report ({err})") from None
        if not isinstance(eval_report, dict):
            raise ValueError(f"--eval-json {path}: expected a JSON object")
    if a.text is not None:
        from softsae.activations import read_text_documents

        docs = read_text_documents(a.text)
        text_desc = " ".join(a.text)
    else:
        docs = default_documents()
        text_desc = f"held-out {int(100 * DEFAULT_HELDOUT_FRAC)}% of the built-in Python docs corpus"
    run_cfg = _run_settings(a.model)
    lm_spec = a.lm if a.lm is not None else run_cfg.get("model")
    layer = a.layer
    if layer is None and run_cfg.get("layer") and (a.lm is None or a.lm == run_cfg.get("model")):
        layer = run_cfg["layer"]
    from softsae.lm import load_lm

    lm = load_lm(lm_spec, device=a.device)
    texts = document_texts(docs, lm.causal)
    lm_metrics, note = None, None
    if eval_report is not None:
        lm_metrics, note = _numbers(eval_report), f"from {a.eval_json}"
    elif lm.causal and a.lm_eval_tokens > 0:
        from softsae.lm_eval import LMEvaluator

        if not a.no_progress:
            print(f"softsae dashboard: LM metrics (clean, zero, mean and SAE passes) on {a.lm_eval_tokens} tokens ...",
                  file=sys.stderr, flush=True)
        ev = LMEvaluator(lm, texts, seq_len=a.seq_len, max_tokens=a.lm_eval_tokens, batch_size=a.batch_size,
                         layer=layer)
        rep = ev.evaluate(sae)
        lm_metrics = {k: rep[k] for k in ("ce_loss_clean", "ce_loss_sae", "ce_loss_increase", "ce_loss_zero",
                                          "ce_loss_mean", "frac_recovered_zero", "frac_recovered_mean", "kl_mean",
                                          "kl_p95", "l0_mean", "k_hat_mean", "tokens") if rep.get(k) is not None}
        note = f"softsae.lm_eval on the first {rep['tokens']} scored tokens of the same text"
    elif lm.causal:
        note = "LM metrics (CE loss recovered, KL): skipped (--lm-eval-tokens 0)."
    else:
        note = (f"LM metrics (CE loss recovered, KL) need a causal LM; {lm.spec.name} is not one "
                "(softsae eval's splice metrics for MiniLM: softsae.downstream).")
    settings = Settings(top_k=a.top_k, view_tokens=a.view_tokens)
    res = build_dashboard(sae, lm, texts, a.out, layer=layer, n_latents=a.latents if ids is None else None,
                          latent_ids=ids, max_tokens=a.max_tokens or None, seq_len=a.seq_len,
                          batch_size=a.batch_size, settings=settings, progress=not a.no_progress,
                          surprisal=not a.no_surprisal,
                          meta={"model": str(a.model), "text": text_desc}, lm_metrics=lm_metrics,
                          lm_metrics_note=note)
    print(f"wrote {res['page']} ({res['latents']} latent cards, {res['tokens']} tokens, "
          f"{res['seconds']:.0f} s, peak memory {res['peak_rss_mib']:.0f} MiB)")
    return 0
