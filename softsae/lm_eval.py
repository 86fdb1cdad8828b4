"""What an SAE does to a causal language model: CE loss recovered, KL, L0, and per-token information.

    lm = load_lm("smollm2")
    ev = LMEvaluator(lm, texts, seq_len=128, max_tokens=8192, cache_dir="runs/lm_eval_cache")
    rep = ev.evaluate(sae)          # ce_loss_clean, ce_loss_sae, ..., frac_recovered_zero, kl_mean, l0_mean, tokens
    info = information_correlations(ev.evaluate(sae, per_token=True)["per_token"])

The texts are cut into windows as ``softsae.lm.LanguageModel.windows`` does (BOS first, windowed,
``seq_len`` tokens). The hooked layer's output (default: the model's documented layer) is replaced at
the **spliced positions**, the ones the SAE is trained on (``Window.keep``: not BOS, not special, not
padding), by

* ``sae``: the SAE's reconstruction ``denormalize(x_hat)`` in eval mode (hard top-k / floor(k_hat));
* ``zero``: 0;
* ``mean``: the mean hooked activation over the spliced positions of these texts (or ``mean`` given).

BOS and padding positions stay clean in every pass. **Scored positions**: spliced positions t whose
next token t+1 is in the window; the prediction made at t of token t+1 is scored (``tokens`` counts
them). Per scored token: cross-entropy (nats), the KL divergence KL(p_clean || p_edited) of the
next-token distribution, and for the information correlations the clean surprisal -log p(token t+1),
the clean predictive entropy and the residual-stream norm ||h_t||. Reported (means over scored tokens):

    frac_recovered_zero = (ce_zero - ce_sae) / (ce_zero - ce_clean)      (1: as clean, 0: as zero ablation)
    frac_recovered_mean = (ce_mean - ce_sae) / (ce_mean - ce_clean)
    ce_loss_increase    = ce_sae - ce_clean

``l0_mean``, ``l0_hist`` (counts of L0 = 0, 1, ...) and ``k_hat_mean`` (SoftSAE) are over the scored
positions too. Cache: the clean, zero and mean passes do not depend on the SAE. With ``cache_dir``
they are stored under a key of (model weights, layer, seq_len, text fingerprint, max_tokens, mean):
per-token CE/KL/surprisal/entropy/norm in ``<key>.npz`` and the clean next-token log-probabilities
(scored tokens x vocabulary, float16: 2 x V bytes per token, 96 KiB for SmolLM2) in
``<key>.logp.npy``; each further SAE then costs one spliced forward pass. float16 log-probabilities
put an error of about 1e-4 nats on KL (measured in the tests against a float32 pass).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from softsae.fileio import atomic_write, atomic_write_json
from softsae.lm import LanguageModel, Window, batch_windows, model_key
from softsae.metrics import spearman
from softsae.stream import texts_fingerprint

# (M, d) float32 activations at the spliced positions -> (reconstruction (M, d), l0 (M,) or None, k_hat or None)
Splice = Callable[[Tensor], tuple[Tensor, Tensor | None, Tensor | None]]

REPORT_KEYS = ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_mean", "frac_recovered_zero",
               "frac_recovered_mean", "kl_mean", "l0_mean", "tokens")


def sae_splice(sae: torch.nn.Module) -> Splice:
    """The splice of a softsae SAE in eval mode: reconstruction (original scale), L0, k_hat (SoftSAE)."""

    @torch.no_grad()
    def fn(h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x_n = sae.normalize(h)
        out = sae.forward_train(x_n)
        return sae.denormalize(out.x_hat).float(), out.codes.l0(), out.k_hat

    return fn


class LMEvaluator:
    """Clean / ablated / spliced next-token losses of a fixed set of texts on a causal LM (module doc).

    max_tokens: stop adding windows once this many positions are scored (None: all texts).
    mean: (d,) vector for the mean ablation (None: the mean over the spliced positions of these texts).
    """

    def __init__(self, lm: LanguageModel, texts: Sequence[str], seq_len: int = 128, max_tokens: int | None = None,
                 batch_size: int = 8, layer: str | None = None, cache_dir: str | Path | None = None,
                 mean: Tensor | None = None) -> None:
        if not lm.causal:
            raise ValueError(f"--lm {lm.spec.name}: the LM evaluation needs a causal language model")
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError("--text: no non-empty text to evaluate on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.lm, self.seq_len, self.batch_size = lm, seq_len, batch_size
        self.layer = layer or lm.spec.default_layer
        self.windows: list[Window] = []
        scored = 0
        for w in lm.windows(texts, seq_len):
            if max_tokens is not None and scored >= max_tokens:
                break
            self.windows.append(w)
            scored += sum(w.keep[:-1])
        self.tokens = scored
        if scored == 0:
            raise ValueError("--text: no scorable token (every window is shorter than 3 tokens?)")
        self.vocab = int(lm.model.config.vocab_size)
        self._given_mean = None if mean is None else mean.detach().float().reshape(-1).cpu()
        if self._given_mean is not None and self._given_mean.numel() != lm.d_model:
            raise ValueError(f"mean must be a ({lm.d_model},) vector, got {tuple(mean.shape)}")
        key = {"model": model_key(lm.spec), "layer": self.layer, "seq_len": seq_len, "texts": texts_fingerprint(texts),
               "max_tokens": max_tokens, "mean": None if mean is None else
               hashlib.sha256(self._given_mean.numpy().tobytes()).hexdigest(), "version": 1}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.key_fields = key
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._base: dict | None = None
        self._logp: np.ndarray | None = None

    # ------------------------------------------------------------------ passes
    def _batches(self):
        for s in range(0, len(self.windows), self.batch_size):
            ids, att, keep = batch_windows(self.windows[s:s + self.batch_size], self.lm.pad_id, self.lm.device)
            scored = keep.clone()
            scored[:, -1] = False
            scored[:, :-1] &= att[:, 1:].bool()
            yield ids, att, keep, scored

    def _run(self, replace: Callable[[Tensor], Tensor] | None, keep: Tensor, ids: Tensor, att: Tensor,
             capture: list | None = None) -> Tensor:
        """Logits (B, T, V) with the hooked output at ``keep`` replaced by ``replace`` of it (None: clean)."""
        def edit(h: Tensor) -> Tensor:
            if capture is not None:
                capture.append(h)
            if replace is None:
                return h
            new = h.clone()
            new[keep] = replace(h[keep]).to(h.dtype)
            return new

        return self.lm.logits(ids, att, self.layer, edit=edit)

    @staticmethod
    def _ce(logits: Tensor, ids: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probs (M, V) at the scored positions and the CE (M,) of their next tokens."""
        logp = F.log_softmax(logits[:, :-1][scored[:, :-1]], dim=-1)
        target = ids[:, 1:][scored[:, :-1]]
        return logp, -logp.gather(1, target[:, None]).squeeze(1)

    def baselines(self) -> dict:
        """Clean, zero- and mean-ablated CE (means) and their KL; computed once, cached on disk."""
        if self._base is None:
            self._base = self._load_cache() or self._compute_baselines()
        b = self._base
        return {"ce_loss_clean": float(b["ce_clean"].mean()), "ce_loss_zero": float(b["ce_zero"].mean()),
                "ce_loss_mean": float(b["ce_mean"].mean()), "kl_zero": float(b["kl_zero"].mean()),
                "kl_mean_ablation": float(b["kl_mean_abl"].mean()), "tokens": self.tokens,
                "cache_key": self.key}

    def _paths(self) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.key}.npz", self.cache_dir / f"{self.key}.logp.npy"

    def _load_cache(self) -> dict | None:
        paths = self._paths()
        if paths is None or not (paths[0].exists() and paths[1].exists()):
            return None
        with np.load(paths[0]) as z:
            base = {k: z[k] for k in z.files}
        if len(base["ce_clean"]) != self.tokens:
            return None
        self._logp = np.load(paths[1], mmap_mode="r")
        return base

    @torch.no_grad()
    def _compute_baselines(self) -> dict:
        # pass 1: clean (log-probs, CE, surprisal, entropy, norms, the mean activation)
        logps, ce, ent, norm = [], [], [], []
        total = torch.zeros(self.lm.d_model, dtype=torch.float64)
        count = 0
        for ids, att, keep, scored in self._batches():
            cap: list[Tensor] = []
            logits = self._run(None, keep, ids, att, capture=cap)
            logp, c = self._ce(logits, ids, scored)
            logps.append(logp.to(torch.float16).cpu().numpy())
            ce.append(c.cpu())
            ent.append(-(logp.exp() * logp).sum(-1).cpu())
            h = cap[0].float()
            norm.append(h[scored].norm(dim=-1).cpu())
            total += h[keep].double().sum(0).cpu()
            count += int(keep.sum())
        mean = self._given_mean if self._given_mean is not None else (total / max(count, 1)).float()
        self._logp = np.concatenate(logps)
        base = {"ce_clean": torch.cat(ce).numpy(), "entropy": torch.cat(ent).numpy(),
                "norm": torch.cat(norm).numpy(), "mean_vec": mean.numpy()}
        # passes 2 and 3: zero and mean ablation
        for name, fn in (("zero", torch.zeros_like), ("mean_abl", lambda h: mean.to(h).expand_as(h))):
            ces, kls = self._edited(lambda h, fn=fn: (fn(h), None, None))[:2]
            base["ce_zero" if name == "zero" else "ce_mean"] = ces
            base[f"kl_{name}"] = kls
        paths = self._paths()
        if paths is not None:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            logp = self._logp

            def write_logp(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, logp, allow_pickle=False)

            def write_npz(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, **base)

            atomic_write(paths[1], write_logp)
            atomic_write(paths[0], write_npz)
            atomic_write_json(paths[0].with_suffix(".json"), {**self.key_fields, "tokens": self.tokens})
        return base

    @torch.no_grad()
    def _edited(self, splice: Splice) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Per scored token: CE, KL(clean || edited), L0, k_hat of one spliced pass."""
        if self._logp is None:
            raise RuntimeError("the clean pass has not run")
        ces, kls, l0s, khs = [], [], [], []
        at = 0
        for ids, att, keep, scored in self._batches():
            out: dict[str, Tensor | None] = {}

            def replace(h: Tensor, out=out) -> Tensor:
                if h.shape[0] == 0:  # no spliced position in this batch
                    return h
                rec, l0, kh = splice(h)
                if rec.shape != h.shape:
                    raise ValueError(f"the splice returned shape {tuple(rec.shape)} for {tuple(h.shape)}")
                out["l0"], out["k_hat"] = l0, kh
                return rec

            logits = self._run(replace, keep, ids, att)
            logp, c = self._ce(logits, ids, scored)
            clean = torch.from_numpy(np.asarray(self._logp[at:at + len(c)], dtype=np.float32)).to(logp.device)
            at += len(c)
            kls.append((clean.exp() * (clean - logp)).sum(-1).cpu())
            ces.append(c.cpu())
            # per-position values at the spliced positions, restricted to the scored ones
            sel = scored[keep]
            if out.get("l0") is not None:
                l0s.append(out["l0"][sel].cpu())
            if out.get("k_hat") is not None:
                khs.append(out["k_hat"][sel].float().cpu())
        return torch.cat(ces).numpy(), torch.cat(kls).numpy(), _cat(l0s), _cat(khs)

    # ------------------------------------------------------------------ reports
    def evaluate(self, sae: torch.nn.Module | None = None, splice: Splice | None = None,
                 per_token: bool = False) -> dict:
        """The report for ``sae`` (or an explicit ``splice``; see REPORT_KEYS and the module doc).
        ``per_token``: add ``per_token`` (numpy arrays over the scored tokens: ce_clean, ce_sae, kl,
        surprisal, entropy, norm, l0, k_hat)."""
        if (sae is None) == (splice is None):
            raise ValueError("give exactly one of sae and splice")
        was_training = None
        if sae is not None:
            was_training = sae.training
            sae.eval()
            splice = sae_splice(sae)
        try:
            base = self.baselines()
            ce, kl, l0, kh = self._edited(splice)
        finally:
            if sae is not None and was_training:
                sae.train()
        b = self._base
        ce_sae = float(ce.mean())
        rep = {**base, "ce_loss_sae": ce_sae, "ce_loss_increase": ce_sae - base["ce_loss_clean"],
               "frac_recovered_zero": _frac(base["ce_loss_zero"], ce_sae, base["ce_loss_clean"]),
               "frac_recovered_mean": _frac(base["ce_loss_mean"], ce_sae, base["ce_loss_clean"]),
               "kl_mean": float(kl.mean()), "kl_p50": float(np.quantile(kl, 0.5)),
               "kl_p95": float(np.quantile(kl, 0.95)),
               "l0_mean": float(l0.mean()) if l0 is not None else None,
               "l0_hist": np.bincount(l0.astype(np.int64)).tolist() if l0 is not None else None,
               "k_hat_mean": float(kh.mean()) if kh is not None else None,
               "layer": self.layer, "model": self.lm.spec.name, "seq_len": self.seq_len}
        if per_token:
            per = {"ce_clean": b["ce_clean"], "ce_sae": ce, "kl": kl, "surprisal": b["ce_clean"],
                   "entropy": b["entropy"], "norm": b["norm"]}
            if l0 is not None:
                per["l0"] = l0.astype(np.float64)
            if kh is not None:
                per["k_hat"] = kh
            rep["per_token"] = per
        return rep


def _cat(xs: list[Tensor]) -> np.ndarray | None:
    return torch.cat(xs).numpy() if xs else None


def _frac(ablated: float, sae: float, clean: float) -> float:
    den = ablated - clean
    return (ablated - sae) / den if abs(den) > 1e-12 else float("nan")


INFO_MEASURES = ("surprisal", "entropy", "norm")


def information_correlations(per_token: dict) -> dict:
    """Spearman correlations over scored tokens of k_hat (SoftSAE) and L0 with the LM's next-token
    surprisal (clean), predictive entropy (clean) and the residual norm ||h_t||: {"k_hat": {...}, "l0": {...}}.
    A constant L0 (TopK) gives NaN."""
    out: dict = {}
    for name in ("k_hat", "l0"):
        v = per_token.get(name)
        if v is None:
            continue
        v = np.asarray(v, dtype=np.float64)
        out[name] = {m: (spearman(v, np.asarray(per_token[m], dtype=np.float64)) if np.ptp(v) > 0 else float("nan"))
                     for m in INFO_MEASURES}
    return out


def format_lm_report(r: dict) -> str:
    """Human-readable lines of an ``LMEvaluator.evaluate`` report."""
    lines = [f"tokens scored      {r['tokens']}  (model {r['model']}, layer {r['layer']}, seq_len {r['seq_len']})",
             f"CE loss clean      {r['ce_loss_clean']:.4f}",
             f"CE loss with SAE   {r['ce_loss_sae']:.4f}  (increase {r['ce_loss_increase']:+.4f})",
             f"CE loss zero abl.  {r['ce_loss_zero']:.4f}   mean abl. {r['ce_loss_mean']:.4f}",
             f"frac. recovered    {r['frac_recovered_zero']:.4f} vs zero, {r['frac_recovered_mean']:.4f} vs mean",
             f"KL(clean || SAE)   mean {r['kl_mean']:.4f}  p50 {r['kl_p50']:.4f}  p95 {r['kl_p95']:.4f}"]
    if r.get("l0_mean") is not None:
        lines.append(f"mean L0            {r['l0_mean']:.2f}")
    if r.get("k_hat_mean") is not None:
        lines.append(f"mean k_hat         {r['k_hat_mean']:.2f}")
    if r.get("information"):
        for name, c in r["information"].items():
            lines.append(f"Spearman({name}, .)  " + "  ".join(f"{m} {v:+.3f}" for m, v in c.items()))
    return "\n".join(lines)
