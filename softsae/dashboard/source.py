"""What the dashboard reads: batches of token windows with the residual activations at the SAE's layer.

The collector (``softsae.dashboard.collect``) needs only this small interface, so it is tested
with hand-made batches; ``lm_batches`` makes them from a ``softsae.lm.LanguageModel`` (or any
object with its ``windows`` / ``residual`` / ``logits`` / ``causal`` members).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """One batch of B windows of T token positions (padded).

    ids: (B, T) long token ids (any value at padding); valid: (B, T) bool, real tokens (not
    padding); keep: (B, T) bool, the positions the SAE reads (valid and not BOS / special); doc:
    (B,) long, index of the document each window comes from; resid: (B, T, d) float32, the
    hooked layer's output; surprisal: (B, T) float32 or None, -ln p(token t | tokens < t of the
    window) in nats from a causal LM, NaN where undefined (a window's first token, padding).
    """

    ids: Tensor
    valid: Tensor
    keep: Tensor
    doc: Tensor
    resid: Tensor
    surprisal: Tensor | None = None

    def __post_init__(self) -> None:
        B, T = self.ids.shape
        if self.valid.shape != (B, T) or self.keep.shape != (B, T) or self.doc.shape != (B,):
            raise ValueError(f"TokenBatch: valid/keep must be {(B, T)} and doc {(B,)}, got "
                             f"{tuple(self.valid.shape)}, {tuple(self.keep.shape)}, {tuple(self.doc.shape)}")
        if self.resid.dim() != 3 or self.resid.shape[:2] != (B, T):
            raise ValueError(f"TokenBatch: resid must be (B, T, d) with (B, T) = {(B, T)}, got "
                             f"{tuple(self.resid.shape)}")
        if self.surprisal is not None and self.surprisal.shape != (B, T):
            raise ValueError(f"TokenBatch: surprisal must be {(B, T)}, got {tuple(self.surprisal.shape)}")
        if bool((self.keep & ~self.valid).any()):
            raise ValueError("TokenBatch: keep marks a padding position")


def token_surprisal(logits: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """-ln p(ids[b, t] | window prefix) from next-token ``logits`` (B, T, V); (B, T) float32, NaN
    at t = 0 and wherever the token or its predecessor is padding. One window at a time (a
    (T, V) temporary, not (B, T, V))."""
    B, T = ids.shape
    out = torch.full((B, T), float("nan"))
    for b in range(B):
        lg = logits[b, :-1].float()
        nxt = ids[b, 1:, None].to(lg.device)
        lp = (lg.gather(1, nxt).squeeze(1) - torch.logsumexp(lg, dim=-1)).cpu()
        ok = valid[b, 1:].cpu() & valid[b, :-1].cpu()
        out[b, 1:] = torch.where(ok, -lp, torch.full_like(lp, float("nan")))
    return out


def lm_batches(lm, texts: Sequence[str], layer: str | None = None, seq_len: int = 128, batch_size: int = 8,
               max_tokens: int | None = None, surprisal: bool = True, docs_per_chunk: int = 64,
               ) -> Iterator[TokenBatch]:
    """TokenBatches of ``texts`` through ``lm`` (a ``softsae.lm.LanguageModel``) at ``layer``.

    Texts are windowed ``docs_per_chunk`` documents at a time by ``lm.windows`` (so only that many
    documents' token ids are held at once), ``batch_size`` windows per forward pass. For a causal
    LM with ``surprisal`` one full forward gives the logits and, through the ``edit`` hook, the
    residual; otherwise ``lm.residual`` stops at the layer. Stops after the window in which the
    count of SAE positions (``keep``) reaches ``max_tokens``.
    """
    causal = bool(getattr(lm, "causal", False)) and surprisal
    seen = 0
    for start in range(0, len(texts), docs_per_chunk):
        wins = lm.windows(list(texts[start:start + docs_per_chunk]), seq_len)
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            if max_tokens is not None:
                cut, total = len(group), seen
                for j, w in enumerate(group):
                    total += sum(w.keep)
                    if total >= max_tokens:
                        cut = j + 1
                        break
                group = group[:cut]
            if not group:
                continue
            T = max(len(w.ids) for w in group)
            B = len(group)
            ids = torch.full((B, T), int(getattr(lm, "pad_id", 0)), dtype=torch.long)
            valid = torch.zeros(B, T, dtype=torch.bool)
            keep = torch.zeros(B, T, dtype=torch.bool)
            for b, w in enumerate(group):
                L = len(w.ids)
                ids[b, :L] = torch.as_tensor(w.ids, dtype=torch.long)
                valid[b, :L] = True
                keep[b, :L] = torch.as_tensor(w.keep, dtype=torch.bool)
            doc = torch.as_tensor([start + w.doc for w in group], dtype=torch.long)
            mask = valid.long()
            with torch.no_grad():
                if causal:
                    captured: list[Tensor] = []

                    def grab(h: Tensor, captured=captured) -> Tensor:
                        captured.append(h.detach())
                        return h

                    logits = lm.logits(ids, mask, layer=layer, edit=grab)
                    resid = captured[0].float()
                    surp = token_surprisal(logits, ids, valid)
                    del logits
                else:
                    resid, surp = lm.residual(ids, mask, layer=layer).float(), None
            yield TokenBatch(ids, valid, keep, doc, resid.cpu(), surp)
            seen += int(keep.sum())
            if max_tokens is not None and seen >= max_tokens:
                return
