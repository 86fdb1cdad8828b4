"""Evaluation of a trained SAE on activations, and the comparison metrics of the paper.

    report = evaluate(model, "acts.npy")       # dict: fvu, mse, cosine, l0 stats, dead_fraction, k_hat stats
    rho = spearman(l0, true_counts)
    rec = dictionary_recovery(model.W_dec, true_dictionary)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from softsae.data import load_activations
from softsae.models import SparseAutoencoder

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (as scipy.stats.rankdata 'average')."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values, and the average rank of that run.
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences; NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: lengths differ ({len(ra)} vs {len(rb)})")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def dictionary_recovery(W_learned: Tensor | np.ndarray, W_true: Tensor | np.ndarray) -> dict[str, float]:
    """For each true direction (rows of W_true (m, d)), the max cosine with a learned row (n, d).

    Returns the mean of those maxima and the fraction above 0.9.
    """
    A = torch.as_tensor(np.asarray(W_learned.detach().cpu() if isinstance(W_learned, Tensor) else W_learned),
                        dtype=torch.float64)
    T = torch.as_tensor(np.asarray(W_true), dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    T = T / T.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (T @ A.T).max(dim=1).values
    return {"mean_max_cos": float(best.mean()), "frac_above_0.9": float((best > 0.9).double().mean())}


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max and the QUANTILES of a 1-D array."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    out.update({f"p{int(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES})
    return out


@torch.no_grad()
def evaluate(model: SparseAutoencoder, data, batch_size: int = 4096, max_rows: int | None = None,
             device: str | torch.device | None = None, return_per_row: bool = False) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``model`` (eval mode: hard top-k) over ``data``.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (original space; invariant to
    the model's normalisation), MSE per element, mean cosine(x, x_hat), L0 per row (mean,
    quantiles, histogram), fraction of latents that never fired, and for SoftSAE the k_hat
    distribution. ``return_per_row`` adds the per-row ``l0`` (and ``k_hat``) arrays.
    """
    source = load_activations(data)
    if source.d != model.d:
        raise ValueError(f"model expects d={model.d} but the activations have d={source.d}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sse = sum_x2 = cos_sum = 0.0
    n_rows = 0
    l0s, khats = [], []
    fired = torch.zeros(model.n, dtype=torch.bool, device=dev)
    sum_x = torch.zeros(model.d, dtype=torch.float64, device=dev)
    try:
        for x in source.iter_batches(batch_size, max_rows):
            x = x.to(dev)
            x_n = model.normalize(x)
            out = model.forward_train(x_n)
            x_hat = model.denormalize(out.x_hat.float())
            xd, rd = x.double(), (x - x_hat).double()
            sse += float(rd.pow(2).sum())
            sum_x += xd.sum(0)
            sum_x2 += float(xd.pow(2).sum())
            cos_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).double().sum())
            n_rows += x.shape[0]
            l0s.append(out.codes.l0().cpu())
            fired |= out.codes.fired()
            if out.k_hat is not None:
                khats.append(out.k_hat.float().cpu())
    finally:
        model.train(was_training)
    if n_rows == 0:
        raise ValueError("no rows to evaluate")
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n_rows
    l0 = torch.cat(l0s).numpy()
    report: dict[str, Any] = {
        "arch": model.arch, "n_rows": n_rows, "d": model.d, "dict_size": model.n,
        "fvu": sse / max(total_var, 1e-30), "mse": sse / (n_rows * model.d), "cosine": cos_sum / n_rows,
        "l0": summarize(l0),
        "l0_hist": np.bincount(l0.astype(np.int64)).tolist(),
        "dead_fraction": float((~fired).double().mean()),
    }
    report["explained_variance"] = 1.0 - report["fvu"]
    if khats:
        report["k_hat"] = summarize(torch.cat(khats).numpy())
    if return_per_row:
        report["per_row"] = {"l0": l0}
        if khats:
            report["per_row"]["k_hat"] = torch.cat(khats).numpy()
    return report


def format_report(r: dict[str, Any]) -> str:
    """Human-readable lines for an ``evaluate`` report."""
    l0 = r["l0"]
    lines = [
        f"arch {r['arch']}  d={r['d']}  dict_size={r['dict_size']}  rows={r['n_rows']}",
        f"FVU {r['fvu']:.5f}  (explained variance {r['explained_variance']:.4f})  MSE {r['mse']:.6g}  "
        f"cosine {r['cosine']:.4f}",
        f"L0 mean {l0['mean']:.2f}  std {l0['std']:.2f}  quantiles p5/p25/p50/p75/p95 "
        f"{l0['p05']:.0f}/{l0['p25']:.0f}/{l0['p50']:.0f}/{l0['p75']:.0f}/{l0['p95']:.0f}  "
        f"range [{l0['min']:.0f}, {l0['max']:.0f}]",
        f"dead latents {100 * r['dead_fraction']:.2f}%",
    ]
    if "k_hat" in r:
        k = r["k_hat"]
        lines.append(f"k_hat mean {k['mean']:.2f}  std {k['std']:.2f}  p5/p50/p95 "
                     f"{k['p05']:.2f}/{k['p50']:.2f}/{k['p95']:.2f}")
    return "\n".join(lines)


__all__ = ["evaluate", "spearman", "rankdata", "dictionary_recovery", "summarize", "format_report"]
