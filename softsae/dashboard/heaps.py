"""Bounded per-latent state fed by the sparse (row, latent, value) triples of SAE codes.

``LatentHeaps`` keeps, for every latent, the ``size`` items of highest score seen so far with a
fixed-shape payload each (a token context and the latent's activations over it); with the
activation as the score these are the top-activating examples, with an independent uniform random
score they are a uniform sample without replacement of the latent's firings (priority sampling),
from which activation quantiles are read. ``DoublingHistogram`` is a per-latent histogram of
activations on ``[0, 2^e)`` whose range doubles (merging bin pairs) when a larger value arrives,
so it needs no second pass for the range. Memory of both is fixed at construction (proportional
to the number of latents), whatever the amount of text pushed through them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Payload = Callable[[Tensor], dict[str, Tensor]]  # indices into the pushed candidates -> payload rows


class LatentHeaps:
    """Per latent, the ``size`` highest-scoring items and their payloads, sorted by score (descending).

    Args:
        n: number of latents.
        size: items kept per latent.
        payload: name -> (shape of one item's payload, dtype, fill value for empty slots).

    ``score`` is (n, size) float32, -inf in empty slots; ``payload[name]`` is (n, size, *shape).
    """

    def __init__(self, n: int, size: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype, float]]) -> None:
        if n < 1 or size < 1:
            raise ValueError(f"LatentHeaps needs n >= 1 and size >= 1, got n={n}, size={size}")
        self.n, self.size = n, size
        self.score = torch.full((n, size), float("-inf"))
        self.payload = {k: torch.full((n, size, *shape), fill, dtype=dtype) for k, (shape, dtype, fill) in
                        payload.items()}

    def threshold(self, latent: Tensor) -> Tensor:
        """Score an item of each given latent (P,) must beat to enter its heap, (P,) float32."""
        return self.score[latent, -1]

    def push(self, latent: Tensor, score: Tensor, make_payload: Payload) -> int:
        """Offer candidates ``latent`` (P,) long with ``score`` (P,) float32; ``make_payload(sel)`` is
        called once with the indices (S,) of the candidates that enter a heap and returns their
        payload rows {name: (S, *shape)}. Returns S. Ties with the current minimum do not enter."""
        score = score.float()
        cand = torch.nonzero(score > self.threshold(latent)).squeeze(1)
        if cand.numel() == 0:
            return 0
        c_lat, c_score = latent[cand], score[cand]
        touched = torch.unique(c_lat)  # sorted
        U, K = touched.numel(), self.size
        # old entries of the touched latents (source -1 - slot) and the candidates (source >= 0)
        lat = torch.cat([touched.repeat_interleave(K), c_lat])
        sc = torch.cat([self.score[touched].reshape(-1), c_score])
        src = torch.cat([-1 - torch.arange(K).repeat(U), cand])
        order = torch.argsort(sc, descending=True, stable=True)
        order = order[torch.argsort(lat[order], stable=True)]  # by latent, then by score descending
        lat, sc, src = lat[order], sc[order], src[order]
        group = torch.searchsorted(touched, lat)
        starts = torch.searchsorted(lat, touched)
        rank = torch.arange(lat.numel()) - starts[group]
        keep = rank < K  # every group has at least K entries (its K old slots), so exactly K are kept
        lat, sc, src, group, rank = lat[keep], sc[keep], src[keep], group[keep], rank[keep]
        new_score = torch.empty(U, K)
        new_score[group, rank] = sc
        from_old = src < 0
        new_cand = src[~from_old]
        fresh = make_payload(new_cand) if new_cand.numel() else {}
        for name, buf in self.payload.items():
            rows = buf[touched].clone()  # (U, K, *shape)
            old_slot = -1 - src[from_old]
            rows[group[from_old], rank[from_old]] = buf[lat[from_old], old_slot]
            if new_cand.numel():
                rows[group[~from_old], rank[~from_old]] = fresh[name].to(buf.dtype)
            buf[touched] = rows
        self.score[touched] = new_score
        return int(new_cand.numel())

    def filled(self) -> Tensor:
        """Number of occupied slots per latent, (n,) long."""
        return torch.isfinite(self.score).sum(1)


class DoublingHistogram:
    """Per-latent counts of positive activations in ``bins`` equal bins on ``[0, 2^exp[latent])``.

    The range of a latent is the smallest power of two above its largest value so far (so between
    1x and 2x the maximum); when a larger value arrives, neighbouring bins are summed in pairs
    (once per doubling). ``bins`` must be a power of two. Values <= 0 are ignored.
    """

    def __init__(self, n: int, bins: int = 32) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.n, self.bins = n, bins
        self.counts = torch.zeros(n, bins, dtype=torch.int64)
        self.exp = torch.full((n,), -1000, dtype=torch.int64)  # -1000: empty

    def add(self, latent: Tensor, value: Tensor) -> None:
        """Count values (P,) of latents (P,) long."""
        pos = value > 0
        latent, value = latent[pos], value[pos].double()
        if latent.numel() == 0:
            return
        vmax = torch.zeros(self.n, dtype=torch.float64).scatter_reduce(0, latent, value, "amax")
        seen = vmax > 0
        need = torch.full((self.n,), -1000, dtype=torch.int64)
        need[seen] = torch.floor(torch.log2(vmax[seen])).long() + 1  # 2^need > vmax
        grow = need > self.exp
        empty = self.exp == -1000
        shift = (need - self.exp).clamp(min=0)
        levels = self.bins.bit_length() - 1
        for m in torch.unique(shift[grow & ~empty]).tolist():
            rows = torch.nonzero(grow & ~empty & (shift == m)).squeeze(1)
            h = self.counts[rows]
            if m >= levels:
                merged = torch.zeros_like(h)
                merged[:, 0] = h.sum(1)
            else:
                part = h.view(-1, self.bins >> m, 1 << m).sum(-1)
                merged = torch.zeros_like(h)
                merged[:, : self.bins >> m] = part
            self.counts[rows] = merged
        self.exp = torch.where(grow, need, self.exp)
        scale = torch.exp2(self.exp[latent].double())
        b = torch.floor(value / scale * self.bins).long().clamp(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, latent * self.bins + b, torch.ones_like(b))

    def of(self, latent: int) -> tuple[float, list[int]]:
        """(range upper end, counts) of one latent; (0.0, zeros) when it never fired."""
        e = int(self.exp[latent])
        return (0.0 if e == -1000 else float(2.0 ** e)), self.counts[latent].tolist()
