"""Synthetic activations with known structure: a ground-truth dictionary and a per-sample
number of active factors that varies, so an adaptive SAE's k can be checked against the truth.

    data = make_synthetic(n_samples=20000, d=64, n_true=128, k_min=1, k_max=16)
    data.x (N, d) float32, data.dictionary (n_true, d) unit rows, data.counts (N,) int64

Sample i: choose ``counts[i]`` distinct factors uniformly, weight each by a positive coefficient
(uniform in ``coef_range``), sum the weighted unit directions, add isotropic Gaussian noise of
expected norm ``noise``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COUNT_DISTS = ("loguniform", "uniform", "mixture")


@dataclass
class SyntheticData:
    x: np.ndarray  # (N, d) float32 activations
    dictionary: np.ndarray  # (n_true, d) float32 unit-norm true directions
    counts: np.ndarray  # (N,) int64 true number of active factors


def sample_counts(rng: np.random.Generator, n: int, k_min: int, k_max: int, dist: str) -> np.ndarray:
    """Per-sample factor counts in [k_min, k_max].

    ``loguniform``: log(count) uniform (many simple samples, a tail of complex ones);
    ``uniform``: every count equally likely; ``mixture``: half near k_min, half near k_max.
    """
    if dist == "loguniform":
        c = np.floor(np.exp(rng.uniform(np.log(k_min), np.log(k_max + 1), size=n)))
    elif dist == "uniform":
        c = rng.integers(k_min, k_max + 1, size=n)
    elif dist == "mixture":
        lo = rng.integers(k_min, max(k_min, k_max // 4) + 1, size=n)
        hi = rng.integers(max(k_min, (3 * k_max) // 4), k_max + 1, size=n)
        c = np.where(rng.random(n) < 0.5, lo, hi)
    else:
        raise ValueError(f"count_dist must be one of {COUNT_DISTS}, got {dist!r}")
    return np.clip(c, k_min, k_max).astype(np.int64)


def make_synthetic(n_samples: int = 20000, d: int = 64, n_true: int = 128, k_min: int = 1, k_max: int = 16,
                   count_dist: str = "loguniform", coef_range: tuple[float, float] = (0.5, 1.5),
                   noise: float = 0.01, seed: int = 0, chunk: int = 8192) -> SyntheticData:
    """Generate ``n_samples`` activations from ``n_true`` random unit directions in ``d`` dims."""
    if not 1 <= k_min <= k_max <= n_true:
        raise ValueError(f"need 1 <= k_min <= k_max <= n_true, got k_min={k_min}, k_max={k_max}, n_true={n_true}")
    if n_samples < 1 or d < 1:
        raise ValueError(f"n_samples and d must be positive, got {n_samples}, {d}")
    lo, hi = coef_range
    if not 0 < lo <= hi:
        raise ValueError(f"coef_range must be positive (lo <= hi), got {coef_range}")
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_true, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    counts = sample_counts(rng, n_samples, k_min, k_max, count_dist)
    x = np.empty((n_samples, d), dtype=np.float32)
    for s in range(0, n_samples, chunk):
        c = counts[s:s + chunk]
        # Rank of random keys < count picks `count` distinct factors per row uniformly.
        ranks = np.argsort(np.argsort(rng.random((len(c), n_true)), axis=1), axis=1)
        coef = np.where(ranks < c[:, None], rng.uniform(lo, hi, size=ranks.shape), 0.0)
        eps = rng.standard_normal((len(c), d)) * (noise / np.sqrt(d))
        x[s:s + chunk] = coef @ D + eps
    return SyntheticData(x=x, dictionary=D.astype(np.float32), counts=counts)


def make_synthetic_unseen(n_samples: int = 20000, d: int = 64, n_true: int = 128, mean_count: float = 5.0,
                          noise: float = 0.05, seed: int = 0, chunk: int = 8192) -> SyntheticData:
    """A second generator with a different structure, kept out of recipe tuning (held-out check).

    Differences from ``make_synthetic``: counts 1 + NegativeBinomial(r=2) with mean ``mean_count``
    (over-dispersed, clipped to n_true // 2); factors drawn without replacement with Zipf(0.8)
    frequencies and correlated through groups of 4 (each sample has a topic group whose members are
    e^2 times likelier); directions correlated (half the rows mixed with another row, cosines ~0.4);
    coefficients log-normal(0, 0.5) (heavy tail); noise isotropic plus a rank-4 component, each of
    expected norm ``noise``.
    """
    if n_samples < 1 or d < 1 or n_true < 8:
        raise ValueError(f"need n_samples >= 1, d >= 1 and n_true >= 8, got {n_samples}, {d}, {n_true}")
    if not 1.0 <= mean_count <= n_true / 2:
        raise ValueError(f"mean_count must lie in [1, n_true / 2], got {mean_count}")
    rng = np.random.default_rng(seed + 7919)
    D = rng.standard_normal((n_true, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    half = rng.permutation(n_true)[: n_true // 2]
    D[half] += 0.6 * D[rng.permutation(n_true)[: n_true // 2]]
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    logw = -0.8 * np.log1p(rng.permutation(n_true))  # Zipf frequencies in a random order
    groups = np.arange(n_true) // 4
    r = 2.0
    p = r / (r + mean_count - 1.0)
    counts = np.clip(1 + rng.negative_binomial(r, p, size=n_samples), 1, n_true // 2).astype(np.int64)
    low_rank = rng.standard_normal((4, d)) / np.sqrt(d)
    x = np.empty((n_samples, d), dtype=np.float32)
    for s in range(0, n_samples, chunk):
        c = counts[s:s + chunk]
        b = len(c)
        topic = rng.integers(0, groups.max() + 1, size=b)
        keys = logw[None, :] + 2.0 * (groups[None, :] == topic[:, None]) + rng.gumbel(size=(b, n_true))
        ranks = np.argsort(np.argsort(-keys, axis=1), axis=1)  # Gumbel top-k: weighted, no replacement
        coef = np.where(ranks < c[:, None], rng.lognormal(0.0, 0.5, size=(b, n_true)), 0.0)
        eps = rng.standard_normal((b, d)) * (noise / np.sqrt(d)) + rng.standard_normal((b, 4)) @ low_rank * noise / 2
        x[s:s + chunk] = coef @ D + eps
    return SyntheticData(x=x, dictionary=D.astype(np.float32), counts=counts)
