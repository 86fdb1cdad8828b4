"""SoftSAE vs TopK at the same mean L0 on synthetic data with known structure (``softsae demo``).

1. Generate activations whose true number of active factors varies per sample.
2. Train SoftSAE with target budget K; measure its mean L0 m on held-out rows (hard top-k).
3. Train TopK at floor(m) and ceil(m); interpolate its FVU linearly to L0 = m.
4. Report FVU, mean L0, Spearman(per-sample L0, true count), dictionary recovery; plot L0
   histograms and predicted k against the true count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from softsae.checkpoint import atomic_write_json, save_sae
from softsae.metrics import dictionary_recovery, evaluate, spearman
from softsae.synthetic import make_synthetic
from softsae.trainer import TrainConfig, train


@dataclass
class DemoConfig:
    """Sizes default to a run of a few minutes on 2 CPU cores."""

    n_samples: int = 40_000
    test_fraction: float = 0.2
    d: int = 64
    n_true: int = 128
    k_min: int = 1
    k_max: int = 16
    count_dist: str = "loguniform"
    noise: float = 0.01
    dict_size: int = 256
    k: float = 5.0  # SoftSAE target mean budget
    steps: int = 1500
    batch_size: int = 512
    alpha: float | None = None  # None: the trainer's default recipe (TrainConfig), as `softsae train` uses
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    progress: bool = True


def _train_cfg(c: DemoConfig, arch: str, k: float) -> TrainConfig:
    """The default recipe (shared schedules, K annealing included, for every arch); only alpha may differ."""
    extra = {} if c.alpha is None else {"alpha": c.alpha}
    return TrainConfig(arch=arch, dict_size=c.dict_size, k=k, steps=c.steps, batch_size=c.batch_size,
                       seed=c.seed, backend=c.backend, device=c.device, progress=c.progress,
                       log_every=50, checkpoint_every=0, **extra)


def _row(name: str, k: Any, rep: dict, counts: np.ndarray, W_dec, true_dict) -> dict[str, Any]:
    l0 = rep["per_row"]["l0"]
    return {"model": name, "k": k, "mean_l0": rep["l0"]["mean"], "fvu": rep["fvu"],
            "spearman_l0_truth": spearman(l0, counts),
            "dict_recovery": dictionary_recovery(W_dec, true_dict)["mean_max_cos"],
            "dead_fraction": rep["dead_fraction"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of comparison rows."""
    def f(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = ["| model | K | mean L0 | FVU | Spearman(L0, true count) | dict recovery (mean max cos) | dead % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['k']} | {f(r['mean_l0'], '.2f')} | {f(r['fvu'], '.4f')} | "
                     f"{f(r['spearman_l0_truth'], '.3f')} | {f(r['dict_recovery'], '.3f')} | "
                     f"{f(None if r['dead_fraction'] is None else 100 * r['dead_fraction'], '.1f')} |")
    return "\n".join(lines)


def run_synthetic_comparison(c: DemoConfig, out_dir: str | Path, log=print, save_models: bool = True,
                             prefix: str = "", batchtopk: bool = False) -> dict[str, Any]:
    """Run the whole comparison; write results.json, PNG plots (names start with ``prefix``) and,
    with ``save_models``, the trained models into ``out_dir``. ``batchtopk`` adds a BatchTopK
    model at K = round(SoftSAE's mean L0)."""
    from softsae.plots import plot_k_vs_truth, plot_l0_histograms

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_synthetic(n_samples=c.n_samples, d=c.d, n_true=c.n_true, k_min=c.k_min, k_max=c.k_max,
                          count_dist=c.count_dist, noise=c.noise, seed=c.seed)
    n_test = max(1, int(c.n_samples * c.test_fraction))
    x_tr, x_te, counts_te = data.x[:-n_test], data.x[-n_test:], data.counts[-n_test:]
    log(f"synthetic data: {len(x_tr)} train / {n_test} test rows, d={c.d}, {c.n_true} true factors, "
        f"active factors per sample {c.k_min}..{c.k_max} ({c.count_dist}, mean {data.counts.mean():.2f})")

    soft = train(x_tr, _train_cfg(c, "softsae", c.k)).model
    rep_soft = evaluate(soft, x_te, return_per_row=True)
    m = rep_soft["l0"]["mean"]
    rows = [_row("SoftSAE", f"{c.k:g} (target)", rep_soft, counts_te, soft.W_dec, data.dictionary)]
    if save_models:
        save_sae(soft, out / "softsae")
    log(f"SoftSAE: mean L0 {m:.2f}, FVU {rep_soft['fvu']:.4f}; training TopK at K = floor/ceil of {m:.2f}")

    k_lo, k_hi = max(1, math.floor(m)), max(1, math.ceil(m))
    topk_reps: dict[int, dict] = {}
    for kk in sorted({k_lo, k_hi}):
        model = train(x_tr, _train_cfg(c, "topk", kk)).model
        rep = evaluate(model, x_te, return_per_row=True)
        topk_reps[kk] = rep
        rows.append(_row(f"TopK K={kk}", kk, rep, counts_te, model.W_dec, data.dictionary))
        if save_models:
            save_sae(model, out / f"topk_k{kk}")
    lo, hi = topk_reps[k_lo], topk_reps[k_hi]
    m_lo, m_hi = lo["l0"]["mean"], hi["l0"]["mean"]
    w = 0.0 if m_hi == m_lo else min(1.0, max(0.0, (m - m_lo) / (m_hi - m_lo)))
    fvu_topk = (1 - w) * lo["fvu"] + w * hi["fvu"]
    extra_l0 = {}
    if batchtopk:
        kb = max(1, round(m))
        model = train(x_tr, _train_cfg(c, "batchtopk", kb)).model
        rep = evaluate(model, x_te, return_per_row=True)
        rows.append(_row(f"BatchTopK K={kb}", kb, rep, counts_te, model.W_dec, data.dictionary))
        extra_l0[f"BatchTopK K={kb}"] = rep["per_row"]["l0"]
    rows.append({"model": "TopK interpolated to SoftSAE's L0", "k": "-", "mean_l0": m, "fvu": fvu_topk,
                 "spearman_l0_truth": None, "dict_recovery": None, "dead_fraction": None})

    khat = rep_soft["per_row"]["k_hat"]
    rho_khat = spearman(khat, counts_te)
    hist = plot_l0_histograms({"SoftSAE": rep_soft["per_row"]["l0"],
                               **{f"TopK K={kk}": r["per_row"]["l0"] for kk, r in topk_reps.items()}, **extra_l0},
                              out / f"{prefix}l0_histograms.png", truth=counts_te,
                              title="L0 per input (held-out synthetic data)")
    series = {"SoftSAE k_hat": khat, "SoftSAE L0 (hard top-floor(k_hat))": rep_soft["per_row"]["l0"]}
    kplot = plot_k_vs_truth(counts_te, series, out / f"{prefix}k_vs_true_count.png")
    results = {
        "config": dataclasses.asdict(c), "rows": rows, "softsae_mean_l0": m, "topk_fvu_at_softsae_l0": fvu_topk,
        "softsae_fvu": rep_soft["fvu"], "spearman_l0_truth": rows[0]["spearman_l0_truth"],
        "spearman_khat_truth": rho_khat, "plots": [str(hist), str(kplot)],
        "softsae_fvu_le_topk": rep_soft["fvu"] <= fvu_topk,
    }
    atomic_write_json(out / f"{prefix}results.json", results)
    return results
