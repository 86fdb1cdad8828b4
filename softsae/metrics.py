"""Evaluation of a trained SAE on activations, and the comparison metrics of the paper.

    report = evaluate(model, "acts.npy")       # dict: fvu, mse, cosine, l0 stats, dead_fraction, k_hat stats
    rho = spearman(l0, true_counts)
    rec = dictionary_recovery(model.W_dec, true_dictionary)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softsae.data import load_activations
from softsae.models import SparseAutoencoder
from softsae.ops.topk_per_row import topk_per_row

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


def interp_log(x: float, xs: list[float], ys: list[float]) -> tuple[float, bool]:
    """Piecewise-linear interpolation in log(x) through points sorted by ``xs`` (e.g. a TopK frontier's
    mean L0 -> FVU); returns (value, extrapolated?). One point: its value, extrapolated."""
    lx, lxs = math.log(x), [math.log(v) for v in xs]
    if len(xs) == 1:
        return ys[0], True
    i = 0 if lx <= lxs[1] else min(len(xs) - 2, max(j for j in range(len(xs) - 1) if lxs[j] <= lx))
    w = (lx - lxs[i]) / (lxs[i + 1] - lxs[i])
    return ys[i] + w * (ys[i + 1] - ys[i]), not lxs[0] <= lx <= lxs[-1]


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
    distribution. ``return_per_row`` adds the per-row ``l0`` (and ``k_hat``) arrays and ``sse``, each
    row's ||x - x_hat||^2 (float64), from which an FVU over any subset of the rows follows.
    """
    source = load_activations(data)
    if source.d != model.d:
        raise ValueError(f"model expects d={model.d} but the activations have d={source.d}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sse = sum_x2 = cos_sum = 0.0
    n_rows = 0
    l0s, khats, sses = [], [], []
    fired = torch.zeros(model.n, dtype=torch.bool, device=dev)
    sum_x = torch.zeros(model.d, dtype=torch.float64, device=dev)
    try:
        for x in source.iter_batches(batch_size, max_rows):
            x = x.to(dev)
            x_n = model.normalize(x)
            out = model.forward_train(x_n)
            x_hat = model.denormalize(out.x_hat.float())
            xd, rd = x.double(), (x - x_hat).double()
            row_sse = rd.pow(2).sum(1)
            sse += float(row_sse.sum())
            if return_per_row:
                sses.append(row_sse.cpu())
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
        report["per_row"] = {"l0": l0, "sse": torch.cat(sses).numpy()}
        if khats:
            report["per_row"]["k_hat"] = torch.cat(khats).numpy()
    return report


def _decode_fvu(model: SparseAutoencoder, x_n: Tensor, z: Tensor, den: float) -> float:
    """FVU of dense codes z (N, n) against normalised x_n (N, d) with total variance ``den``."""
    x_hat = torch.nn.functional.linear(z, model.W_dec.t(), model.b_dec)
    return float((x_n - x_hat).double().pow(2).sum()) / den


def _topk_dense(pre: Tensor, k) -> Tensor:
    """Dense (N, n) codes keeping the top ``k`` (int or (N,) tensor) entries of each row of pre."""
    vals, idx = topk_per_row(pre, k)
    z = pre.new_zeros(pre.shape[0], pre.shape[1] + 1)
    z.scatter_(1, torch.where(idx >= 0, idx, pre.shape[1]), vals)
    return z[:, :-1]


def _difficulty(model: SparseAutoencoder, x_n: Tensor, pre: Tensor, target: float, j_max: int,
                chunk: int = 1024) -> np.ndarray:
    """Per row: the fewest top latents (by pre-activation) whose decode reaches relative error
    ||x - x_hat||^2 / mean_row ||x - mean(x)||^2 <= ``target``; j_max + 1 when none does. (N,) int."""
    var_row = float((x_n - x_n.mean(0)).double().pow(2).sum(-1).mean())
    out = []
    for s in range(0, x_n.shape[0], chunk):
        xc, pc = x_n[s:s + chunk], pre[s:s + chunk]
        vals, idx = torch.topk(pc, j_max, dim=-1)
        steps = vals[..., None] * model.W_dec[idx]  # (b, J, d)
        x_hat = model.b_dec + steps.cumsum(1)
        err = (xc[:, None, :] - x_hat).pow(2).sum(-1) / var_row  # (b, J)
        ok = err <= target
        first = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full_like(ok[:, 0], j_max + 1,
                                                                                 dtype=torch.int64))
        out.append(first.cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def softsae_diagnostics(model: SparseAutoencoder, data, max_rows: int | None = 20_000,
                        error_target: float | None = None, counts: np.ndarray | None = None) -> dict[str, Any]:
    """Separate dictionary quality from allocation quality for a trained SoftSAE.

    On the same dictionary (W_dec, b_dec, encoder) and the same rows, FVU with: (a) the soft gate
    at the final alpha, (b) top floor(k_hat) per row, (c) top round(k_hat), (d) a uniform top-K
    at (b)'s mean L0 (interpolated between floor and ceil), (e) one threshold for all rows on
    the pre-activations at (b)'s mean L0. (b) < (d) means the per-row allocation helps; (e) is an
    allocation baseline that needs no k head. Also: the L0 histogram of (b), and Spearman of
    k_hat with a per-input difficulty proxy (the fewest top latents of this dictionary that reach
    per-row relative error ``error_target``, default (b)'s FVU) and, given ``counts`` (N,), with
    the true counts. ``max_rows`` rows are held in memory at once.
    """
    from softsae.models import SoftSAE

    if not isinstance(model, SoftSAE):
        raise ValueError(f"softsae_diagnostics needs a SoftSAE model, got arch {model.arch!r}")
    source = load_activations(data)
    if source.d != model.d:
        raise ValueError(f"model expects d={model.d} but the activations have d={source.d}")
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        x = torch.cat([b.to(dev) for b in source.iter_batches(4096, max_rows)]).float()
        x_n = model.normalize(x)
        pre = model.pre_acts(x_n)
        k_hat = model.k_hat_norm(x_n)
        den = float((x_n - x_n.mean(0)).double().pow(2).sum())
        N = x.shape[0]
        k_floor, k_round = torch.floor(k_hat).clamp(1, model.n), torch.floor(k_hat + 0.5).clamp(1, model.n)
        z_soft = model.soft_dense(pre, k_hat)
        soft_l0 = ((z_soft != 0) & (z_soft >= 0.5 * pre)).sum(-1).double().mean()  # gate weight >= 1/2
        res: dict[str, Any] = {
            "n_rows": N, "alpha": model.alpha, "alpha_relative": model.alpha_relative, "k_round": model.k_round,
            "soft": {"fvu": _decode_fvu(model, x_n, z_soft, den), "mean_l0": float(soft_l0)},
            "floor": {"fvu": _decode_fvu(model, x_n, _topk_dense(pre, k_floor), den),
                      "mean_l0": float(k_floor.double().mean())},
            "round": {"fvu": _decode_fvu(model, x_n, _topk_dense(pre, k_round), den),
                      "mean_l0": float(k_round.double().mean())},
        }
        m = res["floor"]["mean_l0"]
        lo, hi = max(1, math.floor(m)), min(model.n, max(1, math.ceil(m)))
        f_lo = _decode_fvu(model, x_n, _topk_dense(pre, lo), den)
        f_hi = _decode_fvu(model, x_n, _topk_dense(pre, hi), den) if hi != lo else f_lo
        w = 0.0 if hi == lo else (m - lo) / (hi - lo)
        res["uniform_topk"] = {"fvu": (1 - w) * f_lo + w * f_hi, "mean_l0": m}
        total = int(round(m * N))
        flat = pre.reshape(-1)
        thr = torch.topk(flat, min(total + 1, flat.numel())).values[-1] if total > 0 else flat.max()
        z_thr = torch.where(pre > thr, pre, torch.zeros_like(pre))
        res["batch_threshold"] = {"fvu": _decode_fvu(model, x_n, z_thr, den),
                                  "mean_l0": float((z_thr > 0).sum(-1).double().mean()), "threshold": float(thr)}
        l0 = k_floor.to(torch.int64).cpu().numpy()
        res["l0_hist"] = np.bincount(l0).tolist()
        target = res["floor"]["fvu"] if error_target is None else float(error_target)
        j_max = int(min(model.n, max(4 * model.k_max, 8)))
        diff = _difficulty(model, x_n, pre, target, j_max)
        kh = k_hat.cpu().numpy()
        res["difficulty"] = {"error_target": target, "j_max": j_max, "summary": summarize(diff),
                             "spearman_khat": spearman(kh, diff),
                             "frac_unreached": float((diff > j_max).mean())}
        if counts is not None:
            counts = np.asarray(counts)[:N]
            res["truth"] = {"spearman_khat": spearman(kh, counts), "spearman_l0": spearman(l0, counts),
                            "spearman_difficulty": spearman(diff, counts)}
    finally:
        model.train(was_training)
    return res


def format_diagnostics(r: dict[str, Any]) -> str:
    """Human-readable lines for a ``softsae_diagnostics`` report."""
    lines = [f"SoftSAE diagnostics on {r['n_rows']} rows (same dictionary; FVU at mean L0):"]
    for key, label in (("soft", "(a) soft gate, final alpha"), ("floor", "(b) top floor(k_hat)"),
                       ("round", "(c) top round(k_hat)"), ("uniform_topk", "(d) uniform top-K"),
                       ("batch_threshold", "(e) one threshold for all rows")):
        lines.append(f"  {label:<32} FVU {r[key]['fvu']:.5f}  mean L0 {r[key]['mean_l0']:.2f}")
    dif = r["difficulty"]
    lines.append(f"  Spearman(k_hat, difficulty) {dif['spearman_khat']:.3f}  (difficulty = fewest top latents to "
                 f"reach per-row error {dif['error_target']:.4g}; median {dif['summary']['p50']:.0f}, "
                 f"{100 * dif['frac_unreached']:.1f}% unreached within {dif['j_max']})")
    if "truth" in r:
        t = r["truth"]
        lines.append(f"  Spearman with the true counts: k_hat {t['spearman_khat']:.3f}, L0 {t['spearman_l0']:.3f}, "
                     f"difficulty {t['spearman_difficulty']:.3f}")
    hist = r["l0_hist"]
    nz = [(i, c) for i, c in enumerate(hist) if c]
    more = " ..." if len(nz) > 40 else ""
    lines.append("  L0 histogram (floor): " + " ".join(f"{i}:{c}" for i, c in nz[:40]) + more)
    return "\n".join(lines)


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


__all__ = ["evaluate", "spearman", "rankdata", "dictionary_recovery", "summarize", "format_report",
           "softsae_diagnostics", "format_diagnostics"]
