"""Recipe ablations for SoftSAE against TopK at equal mean L0 on synthetic data with known counts.

    python benchmarks/science/recipe_ablation.py --data A16 --configs cur,auth,auth_a10       # appends JSON rows
    python benchmarks/science/recipe_ablation.py --table                                        # markdown of all rows

Each config (a set of TrainConfig overrides, CONFIGS below) trains one SoftSAE; TopK is trained at
floor and ceil of the SoftSAE's held-out mean L0 with the same steps, batch, lr schedule and K
annealing, and its FVU interpolated linearly to that L0 (TopK runs are cached in the log). Every
row goes to benchmarks/science/results/recipe_ablation.jsonl: config -> SoftSAE FVU, mean L0, Spearman(L0,
true count), TopK FVU at equal L0, ratio, and the same-dictionary diagnostics (soft / floor /
round / uniform top-K / batch threshold). One thread per process (OMP_NUM_THREADS=1).

Datasets: ``A*`` are the held-in sets of softsae.synthetic.make_synthetic (tuned on);
``U*`` use softsae.synthetic.make_synthetic_unseen (a different generator, evaluated only at the end);
``M8``/``M16``/``M32`` are MiniLM activations (``softsae activations --heldout-frac 0.1``): trained on
the train split minus its last ``MINILM_VAL_ROWS`` rows, which are the validation rows (whole
documents, never trained on here); the held-out split stays unseen by the ablation and is used only by
benchmarks/science/science_minilm.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from softsae.metrics import evaluate, softsae_diagnostics, spearman
from softsae.synthetic import make_synthetic, make_synthetic_unseen
from softsae.trainer import TrainConfig, train

LOG = Path(__file__).parent / "results" / "recipe_ablation.jsonl"

# name -> (generator, kwargs, K, dict_size)
DATASETS = {
    "A6": ("held-in", dict(d=64, n_true=128, k_min=1, k_max=24), 6, 256),
    "A16": ("held-in", dict(d=64, n_true=320, k_min=1, k_max=64), 16, 512),
    "A24d128": ("held-in", dict(d=128, n_true=512, k_min=1, k_max=96), 24, 1024),
    "A21": ("held-in", dict(d=64, n_true=420, k_min=1, k_max=84), 21, 512),  # close to the setting
}
MINILM_ACTS = Path(__file__).parents[2] / "runs" / "minilm_docs.npy"  # as in science_minilm.py
MINILM_VAL_ROWS = 20_000
MINILM_DICT = 1536
for _k in (8, 16, 32):
    DATASETS[f"M{_k}"] = ("minilm", {}, _k, MINILM_DICT)
for _d in (64, 256):
    for _k in (5, 32):
        DATASETS[f"G{_k}d{_d}"] = ("held-in", dict(d=_d, n_true=max(128, 5 * 4 * _k), k_min=1, k_max=4 * _k),
                                   _k, max(512, 4 * _d))
        DATASETS[f"U{_k}d{_d}"] = ("unseen", dict(d=_d, n_true=max(128, 5 * 4 * _k), mean_count=_k), _k,
                                   max(512, 4 * _d))

OLD_DEFAULTS = dict(alpha=3e-3, alpha_anneal_frac=0.0, k_anneal_frac=0.0, hard_frac=0.2, hard_encoder_grad=True,
                    st_frac=0.0, st_mode="soft", k_round="floor", alpha_relative=False)
AUTH = dict(alpha=1e-4, alpha_start=1.0, alpha_anneal_frac=0.01, alpha_schedule="linear", k_anneal_frac=0.01,
            hard_frac=0.04, hard_encoder_grad=False, st_frac=0.0, st_mode="soft")
A10 = {**AUTH, "alpha_anneal_frac": 0.1}
CONFIGS: dict[str, dict] = {
    "cur": {},  # the defaults before this ablation: alpha 3e-3 fixed, hard 20% with encoder gradient
    "default": None,  # whatever TrainConfig's defaults are now
    "auth": AUTH,
    "auth_a10": A10,
    "auth_a10_3e3": {**A10, "alpha": 3e-3},
    "auth_a10_1e3": {**A10, "alpha": 1e-3},
    "auth_a10_log": {**A10, "alpha_schedule": "log"},
    "auth_a10_encgrad": {**A10, "hard_encoder_grad": True},
    "auth_a10_round": {**A10, "k_round": "round"},
    "auth_a10_kmax4": {**A10, "k_max_mult": 4},
    "auth_a10_st": {**A10, "st_frac": 0.2},
    "auth_a10_hard20": {**A10, "hard_frac": 0.2},
    "auth_a10_nohard": {**A10, "hard_frac": 0.0},
    "cur_ka": {**OLD_DEFAULTS, "k_anneal_frac": 0.01},
    "cur_st": {**OLD_DEFAULTS, "st_frac": 0.2},
    "cur_1e2": {**OLD_DEFAULTS, "alpha": 1e-2},
    "cur_noenc": {**OLD_DEFAULTS, "hard_encoder_grad": False},
    "cur_round": {**OLD_DEFAULTS, "k_round": "round"},
    "cur_h5": {**OLD_DEFAULTS, "hard_frac": 0.05},
    "cur_h40": {**OLD_DEFAULTS, "hard_frac": 0.4},
    "logka": {**OLD_DEFAULTS, "alpha_anneal_frac": 0.1, "alpha_schedule": "log", "k_anneal_frac": 0.01},
    "cand": {**OLD_DEFAULTS, "alpha": 1e-2, "alpha_anneal_frac": 0.1, "alpha_schedule": "log", "k_anneal_frac": 0.01},
    "cand_rel": {**OLD_DEFAULTS, "alpha": 2.5e-2, "alpha_relative": True, "alpha_anneal_frac": 0.1,
                 "alpha_schedule": "log", "k_anneal_frac": 0.01},
    "cand_round": {**OLD_DEFAULTS, "alpha": 1e-2, "alpha_anneal_frac": 0.1, "alpha_schedule": "log",
                   "k_anneal_frac": 0.01, "k_round": "round"},
    "rel_3e2": {**A10, "alpha_relative": True, "alpha": 3e-2},
    "rel_1e2": {**A10, "alpha_relative": True, "alpha": 1e-2},
    # straight-through for the whole soft phase: the decoder only ever sees the hard codes that
    # inference runs; the encoder and the k head get the soft gate's gradient
    "st_all": {**OLD_DEFAULTS, "st_frac": 0.8},
    "st_all_h5": {**OLD_DEFAULTS, "st_frac": 0.95, "hard_frac": 0.05},
    "st_all_1e2": {**OLD_DEFAULTS, "st_frac": 0.8, "alpha": 1e-2},
    "cur_1e3": {**OLD_DEFAULTS, "alpha": 1e-3},
    "cur_h50": {**OLD_DEFAULTS, "hard_frac": 0.5},
    # hard forward for the whole soft phase; the encoder trains as TopK's, the k head via the soft gate's dk
    "stk_all": {**OLD_DEFAULTS, "st_frac": 0.8, "st_mode": "k"},
    "cur_3e2": {**OLD_DEFAULTS, "alpha": 3e-2},
    "cur_noclip": {**OLD_DEFAULTS, "grad_clip": 0.0},  # the k head's gradient no longer shares the clip
}


def make_data(name: str, n_samples: int, seed: int):
    """(x_train, x_test, true counts of x_test or None, K, dict_size) for dataset ``name``."""
    kind, kw, K, n = DATASETS[name]
    if kind == "minilm":
        from softsae.activations import output_paths

        path = output_paths(MINILM_ACTS, 0.1)["train"]
        if not path.exists():
            raise SystemExit(f"{path}: extract it first: softsae activations --out {MINILM_ACTS} "
                             "--heldout-frac 0.1 --dtype float16")
        x = np.load(path, mmap_mode="r")
        return x[:-MINILM_VAL_ROWS], np.asarray(x[-MINILM_VAL_ROWS:], dtype=np.float32), None, K, n
    gen = make_synthetic if kind == "held-in" else make_synthetic_unseen
    data = gen(n_samples=n_samples, seed=seed, **kw)
    n_test = 5000
    return data.x[:-n_test], data.x[-n_test:], data.counts[-n_test:], K, n


def _spearman(l0, counts) -> float | None:
    return None if counts is None else spearman(l0, counts)


def _cfg(arch: str, K: float, n: int, steps: int, batch: int, seed: int, overrides: dict | None) -> TrainConfig:
    ov = dict(OLD_DEFAULTS) if overrides == {} else dict(overrides or {})
    mult = ov.pop("k_max_mult", None)
    if mult is not None and arch == "softsae":
        ov["k_max"] = mult * K
    if arch != "softsae":  # baselines take only the shared schedule
        ov = {k: v for k, v in ov.items() if k in ("k_anneal_frac", "lr")}
    return TrainConfig(arch=arch, dict_size=n, k=K, steps=steps, batch_size=batch, seed=seed, progress=False,
                       checkpoint_every=0, log_every=100, **ov)


def _log_rows() -> list[dict]:
    if not LOG.exists():
        return []
    return [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]


def topk_fvu(x_tr, x_te, counts_te, K: int, n: int, steps: int, batch: int, seed: int, k_anneal: float,
             data_name: str) -> dict:
    """Held-out FVU / L0 / Spearman of TopK at K, from the log when already measured."""
    key = dict(kind="topk", data=data_name, K=K, steps=steps, batch=batch, seed=seed, k_anneal_frac=k_anneal)
    for r in _log_rows():
        if all(r.get(k) == v for k, v in key.items()):
            return r
    t0 = time.perf_counter()
    m = train(x_tr, _cfg("topk", K, n, steps, batch, seed, {"k_anneal_frac": k_anneal})).model
    rep = evaluate(m, x_te, return_per_row=True)
    row = {**key, "fvu": rep["fvu"], "mean_l0": rep["l0"]["mean"],
           "spearman": _spearman(rep["per_row"]["l0"], counts_te), "seconds": round(time.perf_counter() - t0, 1)}
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run_config(name: str, data_name: str, steps: int, batch: int, seed: int, n_samples: int) -> dict:
    x_tr, x_te, c_te, K, n = make_data(data_name, n_samples, seed)
    n_test = len(x_te)
    ov = CONFIGS[name]
    cfg = _cfg("softsae", K, n, steps, batch, seed, ov)
    t0 = time.perf_counter()
    model = train(x_tr, cfg).model
    secs = time.perf_counter() - t0
    rep = evaluate(model, x_te, return_per_row=True)
    m = rep["l0"]["mean"]
    diag = softsae_diagnostics(model, x_te, counts=c_te, max_rows=n_test)
    k_anneal = cfg.k_anneal_frac if cfg.k_anneal_steps is None else cfg.resolved(model.d).k_anneal_steps / steps
    lo, hi = max(1, math.floor(m)), max(1, math.ceil(m))
    t_lo = topk_fvu(x_tr, x_te, c_te, lo, n, steps, batch, seed, k_anneal, data_name)
    t_hi = t_lo if hi == lo else topk_fvu(x_tr, x_te, c_te, hi, n, steps, batch, seed, k_anneal, data_name)
    w = 0.0 if t_hi["mean_l0"] == t_lo["mean_l0"] else (m - t_lo["mean_l0"]) / (t_hi["mean_l0"] - t_lo["mean_l0"])
    fvu_topk = (1 - w) * t_lo["fvu"] + w * t_hi["fvu"]
    recipe = {f: getattr(cfg, f) for f in ("alpha", "alpha_anneal_frac", "alpha_schedule", "alpha_relative",
                                          "k_anneal_frac", "hard_frac", "hard_encoder_grad", "st_frac", "k_round",
                                          "k_max")}
    row = {"kind": "softsae", "config": name, "overrides": ov, "recipe": recipe, "data": data_name, "K": K,
           "dict_size": n,
           "steps": steps, "batch": batch, "seed": seed, "fvu": rep["fvu"], "mean_l0": m,
           "spearman": _spearman(rep["per_row"]["l0"], c_te), "topk_fvu_equal_l0": fvu_topk,
           "ratio": rep["fvu"] / fvu_topk, "seconds": round(secs, 1),
           "diag": {k: diag[k]["fvu"] for k in ("soft", "floor", "round", "uniform_topk", "batch_threshold")},
           "diag_round_l0": diag["round"]["mean_l0"], "spearman_khat_difficulty": diag["difficulty"]["spearman_khat"],
           "spearman_khat_truth": diag.get("truth", {}).get("spearman_khat")}
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| data | config | K | steps | SoftSAE FVU | mean L0 | Spearman | TopK FVU @L0 | ratio | "
             "diag soft/floor/round/uniform/thr |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") != "softsae":
            continue
        dg = "/".join(f"{r['diag'][k]:.3f}" for k in ("soft", "floor", "round", "uniform_topk", "batch_threshold"))
        lines.append(f"| {r['data']} | {r['config']} | {r['K']} | {r['steps']} | {r['fvu']:.4f} | "
                     f"{r['mean_l0']:.2f} | {_fmt(r['spearman'])} | {r['topk_fvu_equal_l0']:.4f} | "
                     f"{r['ratio']:.3f} | {dg} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="A16", help=f"one of {sorted(DATASETS)} (comma-separated for several)")
    ap.add_argument("--configs", default="default", help=f"comma-separated names from {sorted(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=45_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print the markdown table of the log and exit")
    a = ap.parse_args()
    if a.table:
        print(table(_log_rows()))
        return
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    for data_name in a.data.split(","):
        if data_name not in DATASETS:
            raise SystemExit(f"unknown --data {data_name!r}; choose from {sorted(DATASETS)}")
        for name in a.configs.split(","):
            if name not in CONFIGS:
                raise SystemExit(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
            r = run_config(name, data_name, a.steps, a.batch_size, a.seed, a.samples)
            print(f"{data_name} {name}: FVU {r['fvu']:.4f} L0 {r['mean_l0']:.2f} rho {_fmt(r['spearman'])} "
                  f"TopK@L0 {r['topk_fvu_equal_l0']:.4f} ratio {r['ratio']:.3f} diag {r['diag']} "
                  f"({r['seconds']} s)", flush=True)
    _ = np  # numpy kept for callers that import this module's helpers


if __name__ == "__main__":
    main()
