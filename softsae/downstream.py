"""Downstream fidelity of an SAE: splice its reconstruction into the transformer and compare the output.

    ev = SpliceEvaluator(texts)                       # packaged all-MiniLM-L6-v2, hook encoder.layer.3
    mean = train_mean("runs/minilm_docs.train.npy")   # (d,) mean activation over training tokens
    rep = ev.evaluate(sae, mean)                      # cos_sae, cos_mean, frac_recovered, ...

The sentence embedding is the one of sentence-transformers' all-MiniLM-L6-v2 (its modules.json:
Transformer -> Pooling(mean over tokens with attention mask 1, [CLS]/[SEP] included) -> Normalize).
Three forward passes over the same texts: clean; with the hooked layer's output replaced at the
positions the SAE was trained on by the SAE reconstruction (``sae(h)``, original activation scale,
eval mode, i.e. hard top-k); and with it replaced there by the mean training activation. Which
positions: every non-padding token that is not a special token (``keep_special=False``, as in
``softsae.activations``); [CLS]/[SEP] and padding stay clean in every pass.

For each text the cosine of the final embedding with the clean one; reported are their means and

    frac_recovered = (cos_sae - cos_mean) / (1 - cos_mean)      (1: as clean, 0: no better than the mean)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from softsae.activations import DEFAULT_LAYER
from softsae.hf import find_module, load_hf

Replace = Callable[[Tensor], Tensor]  # (M, d) activations at the trained positions -> (M, d)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """sentence-transformers mean pooling + L2 normalisation: (B, T, d), (B, T) -> (B, d) float32."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def train_mean(data, max_rows: int | None = None, chunk_rows: int = 65536) -> Tensor:
    """Mean row (d,) float32 of an activation file/array (float64 accumulation, chunked)."""
    from softsae.data import load_activations

    src = load_activations(data, check_finite=False)
    total, n = None, 0
    for x in src.iter_batches(chunk_rows, max_rows):
        s = x.double().sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    if n == 0:
        raise ValueError("data: no rows to average")
    return (total / n).float()


class SpliceEvaluator:
    """Clean, spliced and mean-ablated sentence embeddings of a fixed list of texts.

    texts: the evaluation texts (e.g. held-out paragraphs); each is truncated to ``seq_len`` tokens.
    The tokenisation and the clean embeddings are computed once and reused for every SAE.
    """

    def __init__(self, texts: Sequence[str], model_path: str | Path | None = None, layer: str = DEFAULT_LAYER,
                 seq_len: int = 128, batch_size: int = 32, device: str = "cpu", keep_special: bool = False) -> None:
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError("texts: no non-empty texts to evaluate on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tok, self.model = load_hf(model_path, device)
        self.module = find_module(self.model, layer)
        self.layer, self.device, self.batch_size = layer, device, batch_size
        self.batches = []
        for s in range(0, len(texts), batch_size):
            enc = self.tok(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=seq_len, return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask").bool()
            positions = enc["attention_mask"].bool() & (torch.ones_like(special) if keep_special else ~special)
            self.batches.append(({k: v.to(device) for k, v in enc.items()}, positions.to(device)))
        self.n_texts = len(texts)
        self.clean = self.embed(None)

    @torch.no_grad()
    def embed(self, replace: Replace | None) -> Tensor:
        """Final sentence embeddings (n_texts, d_model) with the hooked layer's output at the trained
        positions passed through ``replace`` (None: clean)."""
        outs = []
        for enc, positions in self.batches:
            def hook(_mod, _inp, output, positions=positions):
                h = output[0] if isinstance(output, (tuple, list)) else output
                if replace is None:
                    return None
                new = h.clone()
                sel = h[positions]
                rep = replace(sel.float()).to(h.dtype)
                if rep.shape != sel.shape:
                    raise ValueError(f"replace returned shape {tuple(rep.shape)} for input {tuple(sel.shape)}")
                new[positions] = rep
                return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

            handle = self.module.register_forward_hook(hook)
            try:
                last = self.model(**enc).last_hidden_state
            finally:
                handle.remove()
            outs.append(mean_pool(last, enc["attention_mask"]).cpu())
        return torch.cat(outs)

    def cosines(self, replace: Replace | None) -> np.ndarray:
        """Per-text cosine (n_texts,) float64 of the spliced embedding with the clean one."""
        emb = self.embed(replace)
        return (emb * self.clean).sum(-1).double().numpy()

    def evaluate(self, sae: torch.nn.Module, mean: Tensor, mean_cos: np.ndarray | None = None) -> dict:
        """cos_sae, cos_mean (means over texts), frac_recovered, and per-text quantiles of cos_sae.

        ``mean_cos``: the per-text cosines of the mean ablation, when already computed (they do
        not depend on the SAE).
        """
        was_training = sae.training
        sae.eval()
        mean = mean.to(self.device, torch.float32)
        if mean.dim() != 1:
            raise ValueError(f"mean must be a (d,) vector, got shape {tuple(mean.shape)}")
        try:
            cos_sae = self.cosines(lambda h: sae(h).float())
        finally:
            sae.train(was_training)
        cos_mean = mean_cos if mean_cos is not None else self.cosines(lambda h: mean.expand_as(h))
        return summarize_splice(cos_sae, cos_mean)


def summarize_splice(cos_sae: np.ndarray, cos_mean: np.ndarray) -> dict:
    """The downstream report from per-text cosines of the SAE splice and of the mean ablation."""
    cs, cm = float(np.mean(cos_sae)), float(np.mean(cos_mean))
    den = 1.0 - cm
    return {"cos_sae": cs, "cos_mean": cm, "frac_recovered": (cs - cm) / den if den > 1e-12 else float("nan"),
            "cos_sae_p05": float(np.quantile(cos_sae, 0.05)), "cos_sae_p50": float(np.quantile(cos_sae, 0.5)),
            "n_texts": int(len(cos_sae))}
