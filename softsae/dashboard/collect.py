"""One pass over token batches -> everything the dashboard shows, in bounded memory.

    col = Collector(sae)                          # all latents tracked (or latent_ids=[...])
    for batch in batches: col.add(batch)          # TokenBatch, softsae.dashboard.source
    data = col.finish(token_strings, n_latents=100, unembedding=W_U)   # JSON-able dict

Per batch the SAE (eval mode: hard selection) encodes the kept positions; its sparse codes give
(row, latent, activation) triples, which feed per tracked latent: the firing count and sum, a
bounded heap of the ``top_k`` highest activations with their contexts, a uniform reservoir of
``samples`` firings with their contexts (activation quantile samples), and a doubling-range
activation histogram (``softsae.dashboard.heaps``). Alongside: FVU, the L0 histogram, the k_hat
histogram (SoftSAE), which latents ever fired, a uniform reservoir of per-token (k_hat, L0,
surprisal) for rank correlations, and the first ``view_tokens`` tokens of the text with their
active latents (the explanation-length view). Memory: O(tracked latents x (top_k + samples) x
context length) + one batch, whatever the length of the text. Activations are the SAE's code
values (its normalised units, as the SAE's decoder sees them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softsae.dashboard.heaps import DoublingHistogram, LatentHeaps
from softsae.dashboard.source import TokenBatch
from softsae.metrics import spearman
from softsae.models import SoftSAE, SparseAutoencoder
from softsae.ops.soft_topk import nonzero_per_row


@dataclass
class Settings:
    """What the collector keeps (defaults sized for ~1,000 latent cards in a few MB of HTML)."""

    top_k: int = 10  # top-activating contexts per latent
    samples: int = 24  # reservoir of firings per latent, for quantile samples
    show_samples: int = 6  # quantile samples shown per card
    ctx_before: int = 8  # context tokens before / after the activating token
    ctx_after: int = 3
    hist_bins: int = 32  # per-latent activation histogram
    view_tokens: int = 400  # tokens in the explanation-length view
    view_latents: int = 24  # active latents listed per token there (largest first)
    corr_samples: int = 50_000  # tokens kept for the rank correlations with surprisal
    neighbours: int = 6  # nearest latents by decoder cosine
    logit_tokens: int = 10  # promoted / suppressed tokens through the unembedding
    sae_rows: int = 2048  # rows per SAE forward
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "samples", "show_samples", "hist_bins", "view_latents", "corr_samples", "sae_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"Settings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ctx_before", "ctx_after", "view_tokens", "neighbours", "logit_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"Settings.{name} must be >= 0, got {getattr(self, name)}")


def _r(x: float, digits: int = 4) -> float | None:
    """A float rounded to ``digits`` significant digits for the JSON (None for NaN/inf)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


class Collector:
    """Streaming statistics of ``sae`` over TokenBatches (see the module docstring)."""

    def __init__(self, sae: SparseAutoencoder, settings: Settings | None = None,
                 latent_ids: Sequence[int] | None = None) -> None:
        self.sae = sae.eval()
        self.s = s = settings or Settings()
        n = sae.n
        self.n = n
        if latent_ids is not None:
            ids = [int(i) for i in latent_ids]
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise ValueError(f"--latent-ids {bad[:8]} out of range: the SAE has latents 0..{n - 1}")
            if not ids:
                raise ValueError("--latent-ids: no latent given")
            self.tracked = torch.as_tensor(sorted(set(ids)), dtype=torch.long)
        else:
            self.tracked = torch.arange(n)
        self.order = [int(i) for i in latent_ids] if latent_ids is not None else None
        m = self.tracked.numel()
        self.slot = torch.full((n,), -1, dtype=torch.long)
        self.slot[self.tracked] = torch.arange(m)
        C = s.ctx_before + 1 + s.ctx_after
        ctx = {"ids": ((C,), torch.int32, -1), "acts": ((C,), torch.float32, 0.0)}
        self.top = LatentHeaps(m, s.top_k, ctx)
        self.res = LatentHeaps(m, s.samples, {**ctx, "act": ((), torch.float32, 0.0)})
        self.hist = DoublingHistogram(m, s.hist_bins)
        self.count = torch.zeros(n, dtype=torch.int64)  # firings of every latent (dead latents, density)
        self.act_sum = torch.zeros(n, dtype=torch.float64)
        self.corr = LatentHeaps(1, s.corr_samples, {"v": ((4,), torch.float32, float("nan"))})
        self.gen = torch.Generator().manual_seed(s.seed)
        self.tokens = 0
        self.sse = self.sum_x2 = self.cos_sum = 0.0
        self.sum_x = torch.zeros(sae.d, dtype=torch.float64)
        self.l0_hist = torch.zeros(n + 1, dtype=torch.int64)
        self.soft = isinstance(sae, SoftSAE)
        self.k_bins = 48
        self.k_hi = float(sae.k_max) if self.soft else 0.0
        self.k_hist = torch.zeros(self.k_bins, dtype=torch.int64)
        self.k_sum = self.k_sum2 = 0.0
        self.has_surprisal = False
        self.view: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(vals, idx) (N, K) padded hard codes (idx -1 = pad), k_hat (N,) or None, x_hat (N, d)."""
        sae = self.sae
        dev = next(sae.parameters()).device
        vals, idx, khat, xhat = [], [], [], []
        for s in range(0, x.shape[0], self.s.sae_rows):
            xb = x[s:s + self.s.sae_rows].to(dev)
            out = sae.forward_train(sae.normalize(xb))
            c = out.codes
            v, i = (c.vals, c.idx) if c.is_sparse else nonzero_per_row(c.dense)
            vals.append(v.float().cpu())
            idx.append(i.cpu())
            xhat.append(sae.denormalize(out.x_hat.float()).cpu())
            if out.k_hat is not None:
                khat.append(out.k_hat.float().cpu())
        K = max(v.shape[1] for v in vals)
        vals = torch.cat([torch.nn.functional.pad(v, (0, K - v.shape[1])) for v in vals])
        idx = torch.cat([torch.nn.functional.pad(i, (0, K - i.shape[1]), value=-1) for i in idx])
        return vals, idx, (torch.cat(khat) if khat else None), torch.cat(xhat)

    def add(self, batch: TokenBatch) -> int:
        """Take one batch; returns the number of SAE positions (kept tokens) in it."""
        B, T = batch.ids.shape
        d = batch.resid.shape[-1]
        if d != self.sae.d:
            raise ValueError(f"the SAE expects activations of dimension {self.sae.d}, the layer gives {d}")
        keep = batch.keep.reshape(-1)
        pos = torch.nonzero(keep).squeeze(1)  # flat positions of the SAE rows
        N = pos.numel()
        if N == 0:
            self._view(batch, pos, None, None, None, None)
            return 0
        x = batch.resid.reshape(B * T, d)[pos].float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the language model produced NaN/inf activations at the SAE's layer")
        vals, idx, khat, xhat = self._encode(x)
        act = (idx >= 0) & (vals > 0)
        l0 = act.sum(1)
        # reconstruction and sparsity summaries (as softsae.metrics.evaluate)
        xd = x.double()
        self.sse += float((xd - xhat.double()).pow(2).sum())
        self.sum_x += xd.sum(0)
        self.sum_x2 += float(xd.pow(2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x, xhat, dim=-1, eps=1e-12).double().sum())
        self.tokens += N
        self.l0_hist += torch.bincount(l0, minlength=self.n + 1)[: self.n + 1]
        if khat is not None:
            b = (khat / max(self.k_hi, 1e-9) * self.k_bins).long().clamp(0, self.k_bins - 1)
            self.k_hist += torch.bincount(b, minlength=self.k_bins)
            self.k_sum += float(khat.double().sum())
            self.k_sum2 += float(khat.double().pow(2).sum())
        r, j = torch.nonzero(act, as_tuple=True)
        lat, val = idx[r, j], vals[r, j]
        self.count += torch.bincount(lat, minlength=self.n)
        self.act_sum.index_add_(0, lat, val.double())
        slot = self.slot[lat]
        t = slot >= 0
        r, slot, lat, val = r[t], slot[t], lat[t], val[t]
        row_of = torch.full((B * T,), -1, dtype=torch.long)
        row_of[pos] = torch.arange(N)
        flat_ids = batch.ids.reshape(-1)
        flat_valid = batch.valid.reshape(-1)

        def contexts(sel: Tensor) -> dict[str, Tensor]:
            return self._contexts(pos[r[sel]], lat[sel], T, flat_ids, flat_valid, row_of, vals, idx)

        self.hist.add(slot, val)
        self.top.push(slot, val, contexts)
        key = torch.rand(val.shape, generator=self.gen)
        self.res.push(slot, key, lambda sel: {**contexts(sel), "act": val[sel]})
        if batch.surprisal is not None:
            self.has_surprisal = True
            sp = batch.surprisal.reshape(-1)
            nxt = torch.full((B, T), float("nan"))
            nxt[:, :-1] = batch.surprisal[:, 1:]
            k_or_l0 = khat if khat is not None else l0.float()
            rows = torch.stack([k_or_l0, l0.float(), sp[pos], nxt.reshape(-1)[pos]], 1)
            ok = torch.isfinite(rows[:, 2])
            ck = torch.rand(N, generator=self.gen)
            self.corr.push(torch.zeros(int(ok.sum()), dtype=torch.long), ck[ok], lambda sel: {"v": rows[ok][sel]})
        self._view(batch, pos, vals, idx, khat, l0)
        return N

    def _contexts(self, p: Tensor, lat: Tensor, T: int, flat_ids: Tensor, flat_valid: Tensor, row_of: Tensor,
                  vals: Tensor, idx: Tensor, chunk: int = 2048) -> dict[str, Tensor]:
        """Token ids (S, C) (-1 outside the window / padding) around flat positions ``p`` (S,) and the
        activation (S, C) of latent ``lat`` (S,) at each of them (0 where the SAE does not read)."""
        s = self.s
        off = torch.arange(-s.ctx_before, s.ctx_after + 1)
        b, t = p // T, p % T
        tt = t[:, None] + off
        inside = (tt >= 0) & (tt < T)
        q = b[:, None] * T + tt.clamp(0, T - 1)
        inside &= flat_valid[q]
        ids = torch.where(inside, flat_ids[q], -1)
        rows = torch.where(inside, row_of[q], -1)
        acts = torch.zeros(rows.shape)
        for c0 in range(0, rows.shape[0], chunk):
            rr = rows[c0:c0 + chunk]
            i = idx[rr.clamp(min=0)]  # (S, C, K)
            hit = (i == lat[c0:c0 + chunk, None, None]) & (rr >= 0)[..., None]
            acts[c0:c0 + chunk] = (vals[rr.clamp(min=0)] * hit).sum(-1)
        return {"ids": ids.to(torch.int32), "acts": acts}

    def _view(self, batch: TokenBatch, pos: Tensor, vals: Tensor | None, idx: Tensor | None,
              khat: Tensor | None, l0: Tensor | None) -> None:
        """Record tokens for the explanation-length view until ``view_tokens`` are held."""
        if len(self.view) >= self.s.view_tokens:
            return
        B, T = batch.ids.shape
        row_of = {int(p): i for i, p in enumerate(pos.tolist())}
        for b in range(B):
            doc = int(batch.doc[b])
            for t in range(T):
                if len(self.view) >= self.s.view_tokens:
                    return
                if not bool(batch.valid[b, t]):
                    continue
                tok: dict[str, Any] = {"id": int(batch.ids[b, t]), "doc": doc, "w": int(t == 0)}
                sp = None if batch.surprisal is None else float(batch.surprisal[b, t])
                tok["s"] = _r(sp) if sp is not None else None
                r = row_of.get(b * T + t)
                if r is not None and vals is not None:
                    a = (idx[r] >= 0) & (vals[r] > 0)
                    v, i = vals[r][a], idx[r][a]
                    o = torch.argsort(v, descending=True)[: self.s.view_latents]
                    tok["l0"] = int(l0[r])
                    tok["k"] = _r(float(khat[r])) if khat is not None else None
                    tok["lat"] = [[int(i[j]), _r(float(v[j]), 3)] for j in o.tolist()]
                self.view.append(tok)

    # ------------------------------------------------------------------ results
    def selection(self, n_latents: int | None) -> list[int]:
        """The latents shown: the given ids in their order, else the ``n_latents`` most frequent
        tracked latents that fired (ties: lower id first)."""
        if self.order is not None:
            return list(dict.fromkeys(self.order))
        cnt = self.count[self.tracked]
        fired = torch.nonzero(cnt > 0).squeeze(1)
        o = fired[torch.argsort(-cnt[fired], stable=True)]
        return [int(self.tracked[i]) for i in o[: n_latents].tolist()]

    @torch.no_grad()
    def finish(self, token_strings: Callable[[list[int]], list[str]], n_latents: int | None = 100,
               unembedding: Tensor | None = None, final_norm: Tensor | None = None) -> dict[str, Any]:
        """The dashboard's data (JSON-able): ``summary``, ``latents`` (cards), ``view``, ``tokens``.

        ``unembedding`` (V, d): W_U of a causal LM, for the logit lens (each latent's decoder
        direction in the LM's units, times ``final_norm`` (d,) - the final RMSNorm/LayerNorm weight -
        when given, through W_U). ``token_strings(ids)`` gives the printable text of token ids."""
        if self.tokens == 0:
            raise ValueError("the text produced no tokens for the SAE (empty text, or only special tokens)")
        sae = self.sae
        sel = self.selection(n_latents)
        W = sae.W_dec.detach().float().cpu()
        Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        used: set[int] = set()
        cards = []
        neighbours = self._neighbours(Wn, sel)
        lens = self._logit_lens(W, sel, unembedding, final_norm)
        for j, i in enumerate(sel):
            sl = int(self.slot[i])
            cnt = int(self.count[i])
            card: dict[str, Any] = {
                "id": i, "count": cnt, "density": _r(cnt / self.tokens),
                "mean": _r(float(self.act_sum[i]) / cnt) if cnt else None,
                "max": _r(float(self.top.score[sl, 0])) if cnt else None,
                "dec_norm": _r(float(W[i].norm())),
                "neighbours": neighbours[j],
            }
            hi, counts = self.hist.of(sl)
            card["hist"] = {"hi": _r(hi), "counts": counts}
            card["top"] = self._heap_contexts(self.top, sl, self.top.score[sl], used)
            card["samples"] = self._samples(sl, used)
            if lens is not None:
                card["promoted"], card["suppressed"] = lens[j]
                used.update(t for t, _ in card["promoted"] + card["suppressed"])
            cards.append(card)
        for tok in self.view:
            used.add(tok["id"])
        ids = sorted(used)
        strings = token_strings(ids) if ids else []
        return {"summary": self._summary(), "latents": cards, "view": self.view,
                "tokens": {str(i): s_ for i, s_ in zip(ids, strings, strict=True)}}

    def _heap_contexts(self, heap: LatentHeaps, sl: int, values: Tensor, used: set[int],
                       pick: list[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for k in (range(heap.size) if pick is None else pick):
            if not math.isfinite(float(heap.score[sl, k])):
                continue
            ids = heap.payload["ids"][sl, k].tolist()
            acts = heap.payload["acts"][sl, k].tolist()
            lo = next(c for c in range(len(ids)) if ids[c] >= 0)
            hi = max(c for c in range(len(ids)) if ids[c] >= 0) + 1
            used.update(ids[lo:hi])
            out.append({"v": _r(float(values[k])), "c": self.s.ctx_before - lo, "t": ids[lo:hi],
                        "a": [_r(a, 3) for a in acts[lo:hi]]})
        return out

    def _samples(self, sl: int, used: set[int]) -> list[dict[str, Any]]:
        """Up to ``show_samples`` reservoir firings at evenly spaced quantiles, largest first; ``q``
        is the sample's quantile among the latent's firings as estimated from the reservoir."""
        n_res = int(torch.isfinite(self.res.score[sl]).sum())
        if n_res == 0:
            return []
        acts = self.res.payload["act"][sl, :n_res]  # the first n_res slots are the filled ones
        order = torch.argsort(acts).tolist()
        m = min(self.s.show_samples, n_res)
        ranks = sorted({round((q + 0.5) / m * n_res - 0.5) for q in range(m)}, reverse=True)
        pick = [order[r] for r in ranks]
        out = self._heap_contexts(self.res, sl, self.res.payload["act"][sl], used, pick)
        for o, r in zip(out, ranks, strict=True):
            o["q"] = _r((r + 0.5) / n_res, 3)
        return out

    def _neighbours(self, Wn: Tensor, sel: list[int], chunk: int = 256) -> list[list[list]]:
        k = min(self.s.neighbours, self.n - 1)
        out: list[list[list]] = []
        if k <= 0:
            return [[] for _ in sel]
        for c0 in range(0, len(sel), chunk):
            ids = torch.as_tensor(sel[c0:c0 + chunk], dtype=torch.long)
            cos = Wn[ids] @ Wn.T
            cos[torch.arange(ids.numel()), ids] = float("-inf")
            v, i = torch.topk(cos, k, dim=1)
            for ii, vv in zip(i.tolist(), v.tolist(), strict=True):
                out.append([[int(a), _r(float(b), 3)] for a, b in zip(ii, vv, strict=True)])
        return out

    def _logit_lens(self, W: Tensor, sel: list[int], W_U: Tensor | None, final_norm: Tensor | None,
                    chunk: int = 64) -> list[tuple[list, list]] | None:
        if W_U is None or self.s.logit_tokens == 0 or not sel:
            return None
        W_U = W_U.float().cpu()
        if W_U.dim() != 2 or W_U.shape[1] != self.sae.d:
            raise ValueError(f"unembedding must be (V, {self.sae.d}), got {tuple(W_U.shape)}")
        k = min(self.s.logit_tokens, W_U.shape[0])
        out = []
        for c0 in range(0, len(sel), chunk):
            D = W[torch.as_tensor(sel[c0:c0 + chunk])] * float(self.sae.norm_scale)  # LM units
            if final_norm is not None:
                D = D * final_norm.float().cpu()
            lg = D @ W_U.T  # (c, V)
            tv, ti = torch.topk(lg, k, dim=1)
            bv, bi = torch.topk(lg, k, dim=1, largest=False)
            for a, b, c, d in zip(ti.tolist(), tv.tolist(), bi.tolist(), bv.tolist(), strict=True):
                up = [[x, _r(y, 3)] for x, y in zip(a, b, strict=True)]
                down = [[x, _r(y, 3)] for x, y in zip(c, d, strict=True)]
                out.append((up, down))
        return out

    def _summary(self) -> dict[str, Any]:
        N = self.tokens
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / N
        hist = self.l0_hist.tolist()
        while len(hist) > 1 and hist[-1] == 0:
            hist.pop()
        mean_l0 = float(sum(i * c for i, c in enumerate(hist)) / N)
        dead = int((self.count == 0).sum())
        freq = self.count[self.count > 0].double() / N
        lo, step = -8.0, 0.25
        nb = int(-lo / step) + 1
        fb = ((torch.log10(freq) - lo) / step).floor().long().clamp(0, nb - 1)
        out: dict[str, Any] = {
            "tokens": N, "fvu": _r(self.sse / max(total_var, 1e-30)), "mse": _r(self.sse / (N * self.sae.d)),
            "cosine": _r(self.cos_sum / N), "l0_mean": _r(mean_l0), "l0_hist": hist, "dead": dead,
            "dead_fraction": _r(dead / self.n), "dict_size": self.n,
            "density_hist": {"lo": lo, "step": step, "counts": torch.bincount(fb, minlength=nb).tolist()},
            "k_hat": None, "corr": None,
        }
        if self.soft:
            mean = self.k_sum / N
            out["k_hat"] = {"mean": _r(mean), "std": _r(math.sqrt(max(self.k_sum2 / N - mean * mean, 0.0))),
                            "hi": _r(self.k_hi), "counts": self.k_hist.tolist()}
        m = int(self.corr.filled()[0])
        if self.has_surprisal and m >= 3:
            v = self.corr.payload["v"][0, :m].double().numpy()
            nxt = np.isfinite(v[:, 3])
            out["corr"] = {
                "tokens": m, "measure": "k_hat" if self.soft else "L0",
                "spearman_surprisal": _r(spearman(v[:, 0], v[:, 2]), 3),
                "spearman_next_surprisal": _r(spearman(v[nxt, 0], v[nxt, 3]), 3) if nxt.sum() >= 3 else None,
                "spearman_l0_surprisal": _r(spearman(v[:, 1], v[:, 2]), 3),
            }
        return out
