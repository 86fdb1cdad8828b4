"""``softsae dashboard``: run a language model over text once, collect, write the page.

    page = build_dashboard(sae, lm, texts, "runs/soft/dashboard", n_latents=100)

``lm`` is a ``softsae.lm.LanguageModel`` (``softsae.lm.load_lm``). Memory is bounded by the
collector's per-latent state plus one batch of windows (and, for a causal LM, that batch's
logits, one (B, T, V) float32 tensor), whatever the amount of text.
"""

from __future__ import annotations

import datetime
import math
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softsae.dashboard.collect import Collector, Settings
from softsae.dashboard.render import write_dashboard
from softsae.dashboard.source import lm_batches
from softsae.models import SparseAutoencoder

# where Hugging Face models keep the final norm applied before the unembedding
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm")


def final_norm_weight(model: torch.nn.Module, d: int) -> Tensor | None:
    """The (d,) weight of the LM's final norm (folded into the unembedding by the logit lens), or None."""
    mods = dict(model.named_modules())
    for name in _FINAL_NORMS:
        w = getattr(mods.get(name), "weight", None)
        if isinstance(w, Tensor) and w.shape == (d,):
            return w.detach().float().cpu()
    return None


def display_strings(lm) -> Callable[[list[int]], list[str]]:
    """Token text for the page. ``lm.token_strings`` decodes each id alone, which for a WordPiece
    tokenizer (MiniLM, BERT) loses the word boundaries ('token', '##izer'); there a word-initial token
    gets a leading space and a continuation loses its '##', as byte-level BPE tokens (SmolLM2) show
    them anyway. Special tokens are left as they are."""
    tok = getattr(lm, "tokenizer", None)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordPiece":
        return lm.token_strings
    specials = set(getattr(tok, "all_special_ids", []))
    prefix = getattr(backend.model, "continuing_subword_prefix", "##")

    def strings(ids: list[int]) -> list[str]:
        out = []
        for i, t in zip(ids, tok.convert_ids_to_tokens(list(ids)), strict=True):
            if i in specials:
                out.append(t)
            else:
                out.append(t[len(prefix):] if t.startswith(prefix) else " " + t)
        return out

    return strings


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_dashboard(sae: SparseAutoencoder, lm, texts: Sequence[str], out_dir: str | Path, *,
                    layer: str | None = None, n_latents: int | None = 100, latent_ids: Sequence[int] | None = None,
                    max_tokens: int | None = 100_000, seq_len: int = 128, batch_size: int = 8,
                    settings: Settings | None = None, progress: bool = True, surprisal: bool = True,
                    meta: dict[str, Any] | None = None,
                    lm_metrics: dict[str, Any] | None = None, lm_metrics_note: str | None = None) -> dict[str, Any]:
    """Collect over ``texts`` and write ``out_dir/index.html``; returns {"page", "tokens", "latents",
    "seconds", "peak_rss_mib"}. ``lm_metrics`` (name -> number, e.g. from ``softsae.lm_eval``) is shown
    in the summary, with ``lm_metrics_note`` (where they come from, or why there are none). ``surprisal``:
    for a causal LM, a full forward per batch for the per-token surprisal (else it stops at the layer)."""
    if not texts:
        raise ValueError("--text: no documents to read")
    if lm.d_model != sae.d:
        raise ValueError(f"the SAE has d={sae.d} but the language model's residual stream has d={lm.d_model} "
                         "(another model or layer than the one it was trained on?)")
    t0 = time.perf_counter()
    col = Collector(sae, settings, latent_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="dashboard", unit="tok", dynamic_ncols=True)
    try:
        for batch in lm_batches(lm, texts, layer=layer, seq_len=seq_len, batch_size=batch_size,
                                max_tokens=max_tokens, surprisal=surprisal):
            got = col.add(batch)
            if bar is not None:
                bar.update(got)
    finally:
        if bar is not None:
            bar.close()
    W_U = lm.unembedding() if getattr(lm, "causal", False) else None
    norm = final_norm_weight(lm.model, sae.d) if W_U is not None else None
    data = col.finish(display_strings(lm), n_latents=n_latents, unembedding=W_U, final_norm=norm)
    if lm_metrics is not None:  # NaN / inf (e.g. a recovered fraction with a zero denominator) -> null
        lm_metrics = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                      for k, v in lm_metrics.items()}
    data["summary"]["lm_metrics"] = lm_metrics
    data["summary"]["lm_metrics_note"] = lm_metrics_note
    s = col.s
    seconds = time.perf_counter() - t0
    data["meta"] = {
        "arch": sae.arch, "d": sae.d, "n": sae.n, "k": sae.k, "lm": getattr(lm.spec, "name", "?"),
        "layer": layer or getattr(lm.spec, "default_layer", "?"), "seconds": round(seconds, 1),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "order": "given" if latent_ids is not None else "count",
        "ctx": f"{s.ctx_before} tokens before, {s.ctx_after} after, within one window of {seq_len} tokens",
        "model": "?", "text": "?", **(meta or {}),
    }
    page = write_dashboard(data, out_dir)
    return {"page": page, "tokens": col.tokens, "latents": len(data["latents"]), "seconds": seconds,
            "peak_rss_mib": peak_rss_mib()}
