"""SoftSAE vs TopK vs BatchTopK on SmolLM2-135M's residual stream: L0-FVU, L0-CE-recovered, L0-KL, information.

    python benchmarks/science/smollm2.py                       # the reduced run (REDUCED): 400k tokens extracted,
                                                               # 131k training tokens per model; ~1 h on 2 busy cores
    python benchmarks/science/smollm2.py --full                # issue 17's scale (FULL): 1M tokens extracted,
                                                               # 2M training tokens per model, seeds 0 and 1 at
                                                               # K=32; ~13 min per model per CPU thread
    python benchmarks/science/smollm2.py --stage train --only topk_k32_s0 softsae_k32_s0   # split over processes
    python benchmarks/science/smollm2.py --stage eval --only topk_k32_s0                   # (also --worker/--workers)

The reduced results in benchmarks/science/results/smollm2_reduced.md were made this way on 2 shared
CPU cores (one thread per process, 2-3 processes at a time): extract, then train and eval with ``--only``
lists, then ``--stage report``.

Stages (each cached and resumable; rerunning skips what is done):

1. ``extract``: ``softsae.activations.extract_corpus`` with ``--model smollm2`` (packaged GGUF, layer
   ``model.layers.14``, the mid-depth residual stream; BOS and special tokens excluded; documents windowed
   at 128 tokens with BOS first) over the Python docs corpus (``softsae.corpus``), float16; 10% of the
   documents, by a hash of their id, are held out. Training reads only the train split.
2. ``train``: per K in KS, SoftSAE (``--recipe default``), SoftSAE (``--recipe paper``), TopK and BatchTopK,
   dictionary 8 x 576 = 4608, ``tokens_per_model`` rows each, drawn uniformly with replacement from the
   train split (the FULL run: 2M draws from ~0.9M train rows, each row ~2.2 times), everything else
   TrainConfig's / the recipe's defaults. Held-out FVU
   and L0 (``softsae.metrics.evaluate``) on the held-out activations.
3. ``eval``: ``softsae.lm_eval.LMEvaluator`` on held-out documents (the first ``eval_tokens`` scored
   tokens of the held-out documents in corpus order): CE loss clean / spliced / zero- and mean-ablated,
   fraction recovered, KL; per-token information correlations (``softsae.lm_eval.information_correlations``).
   The clean and ablation passes are cached on disk, so each SAE costs one spliced pass.
4. ``report``: JSON, plots and markdown under benchmarks/science/results/.

Nothing is tuned on the held-out split (every setting is a recipe default fixed before the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
VARIANTS = {  # name -> (arch, recipe)
    "softsae": ("softsae", "default"),
    "softsae_paper": ("softsae", "paper"),
    "topk": ("topk", "default"),
    "batchtopk": ("batchtopk", "default"),
}
LABELS = {"softsae": "SoftSAE", "softsae_paper": "SoftSAE (paper recipe)", "topk": "TopK", "batchtopk": "BatchTopK"}
FULL = {"max_tokens": 1_000_000, "tokens_per_model": 2_000_000, "seeds_k32": [0, 1], "batch_size": 1024,
        "eval_tokens": 16_384}
REDUCED = {"max_tokens": 400_000, "tokens_per_model": 131_072, "seeds_k32": [0, 1], "batch_size": 512,
           "eval_tokens": 4_096}
KS = [16, 32, 64]
D_MODEL = 576


def jobs(a) -> list[tuple[str, int, int]]:
    out = []
    for k in (32, 16, 64):
        for seed in (a.seeds_k32 if k == 32 else [0]):
            out.extend((v, k, seed) for v in VARIANTS)
    return out


def run_name(variant: str, k: int, seed: int) -> str:
    return f"{variant}_k{k}_s{seed}"


def stage_extract(a) -> dict:
    from softsae.activations import extract_corpus

    return extract_corpus(a.data / "smollm2_l14.npy", model_path="smollm2", heldout_frac=0.1, dtype="float16",
                          max_tokens=a.max_tokens, seq_len=a.seq_len, batch_size=16, shard_docs=64,
                          keep_shards=False, progress=False)


def train_one(a, meta: dict, variant: str, k: int, seed: int) -> dict:
    from softsae.checkpoint import atomic_write_json, load_sae
    from softsae.metrics import evaluate
    from softsae.recipes import recipe_config
    from softsae.trainer import train

    out = a.runs / run_name(variant, k, seed)
    res_file = out / "result.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    arch, recipe = VARIANTS[variant]
    steps = -(-a.tokens_per_model // a.batch_size)
    cfg = recipe_config(recipe, arch=arch, dict_size=a.dict_mult * D_MODEL, k=k, steps=steps,
                        batch_size=a.batch_size, seed=seed, device=a.device, progress=False,
                        checkpoint_every=a.checkpoint_every, log_every=10)
    t0 = time.perf_counter()
    result = train(meta["paths"]["train"], cfg, out_dir=out, resume=True)
    secs = time.perf_counter() - t0
    model = load_sae(out, device=a.device)
    rep = evaluate(model, meta["paths"]["heldout"], max_rows=a.fvu_rows)
    res = {"variant": variant, "arch": arch, "recipe": recipe, "k": k, "seed": seed, "train_seconds": secs,
           "tokens_seen": steps * a.batch_size, "config": dataclasses.asdict(result.config), "eval": rep}
    atomic_write_json(res_file, res)
    print(f"{variant:14s} K={k:<3d} seed {seed}: held-out FVU {rep['fvu']:.4f}  L0 {rep['l0']['mean']:.2f}  "
          f"dead {rep['dead_fraction']:.3f}  ({secs:.0f} s)", flush=True)
    return res


MASSIVE = 10.0  # a held-out row is a massive activation when its centred norm is > 10x the median (fixed a priori)


def add_fvu_without_massive(a, meta: dict, runs: list[tuple[str, int, int]]) -> None:
    """Add ``fvu_no_massive`` to each finished run's result.json: the FVU over the held-out rows that are not
    massive activations (centred norm > MASSIVE x the median; Sun et al. 2024), and how much of the held-out
    variance those few rows carry. On SmolLM2's layer 14 about 40 of 82k held-out tokens hold ~70% of the
    variance, so the plain FVU mostly measures those tokens."""
    from softsae.checkpoint import atomic_write_json, load_sae
    from softsae.metrics import evaluate

    files = [a.runs / run_name(*r) / "result.json" for r in runs]
    todo = [f for f in files if f.exists() and "fvu_no_massive" not in json.loads(f.read_text())]
    if not todo:
        return
    path = meta["paths"]["heldout"]
    x = np.load(path, mmap_mode="r")[:a.fvu_rows].astype(np.float64)
    norm2 = ((x - x.mean(0)) ** 2).sum(1)
    massive = np.sqrt(norm2) > MASSIVE * np.median(np.sqrt(norm2))
    rest = x[~massive]
    rest_var = float(((rest - rest.mean(0)) ** 2).sum())
    for f in todo:
        res = json.loads(f.read_text())
        rep = evaluate(load_sae(f.parent, device=a.device), path, max_rows=a.fvu_rows, return_per_row=True)
        res["fvu_no_massive"] = {"fvu": float(rep["per_row"]["sse"][~massive].sum() / rest_var),
                                 "massive_rows": int(massive.sum()), "rows": int(len(massive)), "x_median": MASSIVE,
                                 "massive_variance_share": float(norm2[massive].sum() / norm2.sum())}
        atomic_write_json(f, res)


def heldout_texts(meta: dict) -> list[str]:
    """Texts of the held-out documents, in corpus order (as the extractor reads them)."""
    from softsae.corpus import python_docs_corpus
    from softsae.lm import lm_texts

    held = {doc_id for doc_id, _ in meta["documents"]["heldout"]}
    return lm_texts([d for d in python_docs_corpus() if d.id in held])


def stage_eval(a, meta: dict, runs: list[tuple[str, int, int]]) -> dict:
    """LM evaluation of every trained run without one (``<run>/lm_eval.json``, ``<run>/per_token.npz``);
    the baselines go to ``<runs>/lm_baselines.json``. Several processes may share the work (``--only``)."""
    from softsae.checkpoint import atomic_write_json, load_sae
    from softsae.lm import load_lm
    from softsae.lm_eval import LMEvaluator, information_correlations
    from softsae.metrics import softsae_diagnostics

    todo = [r for r in runs if (a.runs / run_name(*r) / "result.json").exists()
            and not (a.runs / run_name(*r) / "lm_eval.json").exists()]
    base_file = a.runs / "lm_baselines.json"
    if not todo and base_file.exists():
        return json.loads(base_file.read_text())
    t0 = time.perf_counter()
    lm = load_lm(a.lm)
    ev = LMEvaluator(lm, heldout_texts(meta), seq_len=a.seq_len, max_tokens=a.eval_tokens, batch_size=8,
                     cache_dir=a.data / "lm_eval_cache")
    base = {**ev.baselines(), "load_and_baseline_seconds": time.perf_counter() - t0}
    if not base_file.exists():
        atomic_write_json(base_file, base)
    for r in todo:
        run_dir = a.runs / run_name(*r)
        t1 = time.perf_counter()
        sae = load_sae(run_dir)
        rep = ev.evaluate(sae, per_token=True)
        per = rep.pop("per_token")
        rep["information"] = information_correlations(per)
        rep["seconds"] = time.perf_counter() - t1
        rep["tokens_per_s"] = rep["tokens"] / rep["seconds"]
        if r[0].startswith("softsae"):  # same dictionary with a uniform top-K etc. at equal L0 (held-out rows)
            rep["diagnostics"] = softsae_diagnostics(sae, meta["paths"]["heldout"], max_rows=20_000)
        np.savez_compressed(run_dir / "per_token.npz", **per)
        atomic_write_json(run_dir / "lm_eval.json", rep)
        print(f"{run_name(*r):22s} CE {rep['ce_loss_sae']:.4f} (clean {rep['ce_loss_clean']:.4f}) "
              f"rec(zero) {rep['frac_recovered_zero']:.4f} rec(mean) {rep['frac_recovered_mean']:.4f} "
              f"KL {rep['kl_mean']:.4f} L0 {rep['l0_mean']:.2f}  ({rep['seconds']:.0f} s)", flush=True)
    return base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="issue 17's scale (FULL) instead of REDUCED")
    p.add_argument("--stage", choices=("extract", "train", "eval", "report", "all"), default="all")
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "smollm2", help="activations, runs and caches")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens extracted (train + held-out)")
    p.add_argument("--tokens-per-model", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seeds-k32", type=int, nargs="+", default=None)
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored by the LM evaluation")
    p.add_argument("--fvu-rows", type=int, default=100_000, help="held-out activation rows for FVU")
    p.add_argument("--dict-mult", type=int, default=8)
    p.add_argument("--lm", default="smollm2", help="language model of the LM evaluation (the extraction's)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="train only these runs (e.g. topk_k32_s0), "
                   "in this order, instead of --worker/--workers' share; with --stage eval: evaluate only these")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    scale = FULL if a.full else REDUCED
    for key, v in scale.items():
        if getattr(a, key) is None:
            setattr(a, key, v)
    a.scale = "full" if a.full else "reduced"
    a.runs = a.data / ("runs_full" if a.full else "runs_reduced")
    a.runs.mkdir(parents=True, exist_ok=True)
    meta = stage_extract(a)  # cached: returns the finished meta at once
    print(f"activations: {meta['rows']} (d={meta['d']})", flush=True)
    todo = jobs(a)
    if a.stage in ("train", "all"):
        mine = todo[a.worker::a.workers]
        if a.only is not None:
            by_name = {run_name(*j): j for j in todo}
            unknown = [n for n in a.only if n not in by_name]
            if unknown:
                raise SystemExit(f"--only: unknown run(s) {unknown}; runs are {sorted(by_name)}")
            mine = [by_name[n] for n in a.only]
        for j in mine:
            train_one(a, meta, *j)
    if a.stage in ("eval", "all"):
        if a.only is not None:
            todo_eval = [j for j in todo if run_name(*j) in set(a.only)]
        else:
            todo_eval = todo
        add_fvu_without_massive(a, meta, todo_eval)
        stage_eval(a, meta, todo_eval)
    if a.stage in ("report", "all"):
        import sys

        sys.path.insert(0, str(HERE))  # python -P leaves the script's folder off sys.path
        from smollm2_report import write_report

        write_report(a, meta, todo)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
