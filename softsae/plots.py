"""PNG plots for SAE comparisons (matplotlib, Agg backend; imported lazily by the demo/benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, title: str, path: str | Path) -> Path:
    """Title, legend, save as PNG and close: the common end of every plot here."""
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_l0_histograms(l0_by_name: dict[str, np.ndarray], path: str | Path, title: str = "L0 per input",
                       truth: np.ndarray | None = None) -> Path:
    """Overlaid histograms of per-input L0 for each model (and the true factor count, if given)."""
    plt = _plt()
    arrays = list(l0_by_name.values()) + ([truth] if truth is not None else [])
    hi = int(max(np.max(a) for a in arrays)) + 1
    bins = np.arange(0, hi + 1) - 0.5
    fig, ax = plt.subplots(figsize=(7, 4))
    if truth is not None:
        ax.hist(truth, bins=bins, color="0.75", label="true # active factors")
    for name, l0 in l0_by_name.items():
        ax.hist(l0, bins=bins, histtype="step", linewidth=2, label=f"{name} (mean {np.mean(l0):.2f})")
    ax.set_xlabel("L0 (active latents per input)")
    ax.set_ylabel("inputs")
    return _finish(plt, fig, ax, title, path)


def plot_k_vs_truth(true_counts: np.ndarray, series: dict[str, np.ndarray], path: str | Path,
                    title: str = "predicted k vs true number of active factors") -> Path:
    """Per true count: mean and 10-90% band of each series (e.g. SoftSAE k_hat and L0), plus y = x."""
    plt = _plt()
    counts = np.asarray(true_counts)
    levels = np.unique(counts)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, vals in series.items():
        vals = np.asarray(vals, dtype=np.float64)
        mean = np.array([vals[counts == c].mean() for c in levels])
        lo = np.array([np.quantile(vals[counts == c], 0.1) for c in levels])
        hi = np.array([np.quantile(vals[counts == c], 0.9) for c in levels])
        ax.plot(levels, mean, marker="o", label=name)
        ax.fill_between(levels, lo, hi, alpha=0.2)
    ax.plot(levels, levels, "k--", linewidth=1, label="y = x")
    ax.set_xlabel("true number of active factors")
    ax.set_ylabel("per-input value (mean, 10-90% band)")
    return _finish(plt, fig, ax, title, path)
