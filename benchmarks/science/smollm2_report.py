"""Tables, plots and JSON of benchmarks/science/smollm2.py (its ``report`` stage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from softsae.metrics import interp_log

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABELS = {"softsae": "SoftSAE", "softsae_paper": "SoftSAE (paper recipe)", "topk": "TopK", "batchtopk": "BatchTopK"}
METRICS = {"fvu": ("held-out FVU", False), "fvu_nm": ("held-out FVU without massive-activation rows", False),
           "frac_recovered_zero": ("CE loss recovered (vs zero abl.)", True),
           "kl_mean": ("KL(clean || SAE), nats/token", False)}


def collect(runs_dir: Path, names: list[str]) -> list[dict]:
    """One row per finished run: FVU / L0 of the activations, CE / KL / information of the LM evaluation."""
    rows = []
    for name in names:
        f = runs_dir / name / "result.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        g = runs_dir / name / "lm_eval.json"
        e = json.loads(g.read_text()) if g.exists() else {}
        rows.append({"run": name, "variant": r["variant"], "k": r["k"], "seed": r["seed"],
                     "fvu": r["eval"]["fvu"], "l0": r["eval"]["l0"]["mean"], "l0_p05": r["eval"]["l0"].get("p05"),
                     "l0_p95": r["eval"]["l0"].get("p95"), "dead": r["eval"]["dead_fraction"],
                     "fvu_nm": r.get("fvu_no_massive", {}).get("fvu"), "massive": r.get("fvu_no_massive"),
                     "train_seconds": r["train_seconds"], "tokens_seen": r["tokens_seen"],
                     "lm_l0": e.get("l0_mean"), "k_hat": e.get("k_hat_mean"),
                     "ce_sae": e.get("ce_loss_sae"), "ce_increase": e.get("ce_loss_increase"),
                     "frac_recovered_zero": e.get("frac_recovered_zero"),
                     "frac_recovered_mean": e.get("frac_recovered_mean"), "kl_mean": e.get("kl_mean"),
                     "information": e.get("information"), "lm_tokens": e.get("tokens"),
                     "lm_tokens_per_s": e.get("tokens_per_s"), "diagnostics": e.get("diagnostics")})
    return rows


def mean_over_seeds(rows: list[dict]) -> dict[tuple[str, int], dict]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["k"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        m = {"n_seeds": len(rs)}
        for f in ("fvu", "fvu_nm", "l0", "lm_l0", "frac_recovered_zero", "frac_recovered_mean", "kl_mean",
                  "ce_increase", "dead", "k_hat"):
            vals = [r[f] for r in rs if r[f] is not None]
            m[f] = float(np.mean(vals)) if vals else None
            m[f + "_sd"] = float(np.std(vals)) if len(vals) > 1 else None
        out[key] = m
    return out


def frontier_comparison(agg: dict, ks: list[int]) -> list[dict]:
    """Each SoftSAE variant against TopK's frontier (interpolated in log L0) at its own mean L0."""
    topk = sorted((k, m) for (v, k), m in agg.items() if v == "topk")
    comps = []
    if len(topk) < 2:
        return comps
    for variant in ("softsae", "softsae_paper", "batchtopk"):
        for k in ks:
            m = agg.get((variant, k))
            if m is None:
                continue
            c = {"variant": variant, "k": k, "l0": m["l0"]}
            for metric, (_, higher_better) in METRICS.items():
                l0_key = "l0" if metric.startswith("fvu") else "lm_l0"
                if m.get(metric) is None or any(t.get(metric) is None for _, t in topk):
                    continue
                x = m[l0_key]
                ref, ex = interp_log(x, [t[l0_key] for _, t in topk], [t[metric] for _, t in topk])
                ok = m[metric] >= ref if higher_better else m[metric] <= ref
                c[metric] = {"value": m[metric], "topk_at_l0": ref, "extrapolated": ex, "on_or_better": bool(ok)}
            comps.append(c)
    return comps


def paired_against_topk(runs_dir: Path, rows: list[dict], block: int = 128) -> list[dict]:
    """Per-token CE (with the SAE spliced in) and KL of each model minus TopK's at the same K and seed, on the
    same held-out tokens: the mean difference and its standard error over blocks of ``block`` consecutive
    tokens (tokens of one window are correlated, blocks much less so). Negative = better than TopK."""
    have = {(r["variant"], r["k"], r["seed"]): runs_dir / r["run"] / "per_token.npz" for r in rows}
    have = {key: f for key, f in have.items() if f.exists()}
    out = []
    for (variant, k, seed), f in sorted(have.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        ref = have.get(("topk", k, seed))
        if variant == "topk" or ref is None:
            continue
        a, b = np.load(f), np.load(ref)
        row = {"variant": variant, "k": k, "seed": seed}
        for key in ("ce_sae", "kl"):
            d = a[key].astype(np.float64) - b[key].astype(np.float64)
            nb = len(d) // block
            means = d[:nb * block].reshape(nb, block).mean(axis=1)
            row[key] = {"diff": float(d.mean()), "se": float(means.std(ddof=1) / np.sqrt(nb)) if nb > 1 else None,
                        "tokens": len(d)}
        out.append(row)
    return out


def plot(rows: list[dict], agg: dict, out_png: Path, info_png: Path, runs_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
    for ax, (metric, (label, _)) in zip(axes, METRICS.items(), strict=True):
        for variant, marker in (("topk", "o-"), ("batchtopk", "s-"), ("softsae", "^-"), ("softsae_paper", "v-")):
            pts = sorted((m["l0" if metric.startswith("fvu") else "lm_l0"], m[metric]) for (v, _k), m in agg.items()
                         if v == variant and m.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, label=LABELS[variant])
        # the axis spans the TopK / BatchTopK / SoftSAE points; a model far outside it is named, not plotted
        main = [m[metric] for (v, _k), m in agg.items() if v != "softsae_paper" and m.get(metric) is not None]
        if main:
            lo, hi = min(main), max(main)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
            off = [f"{LABELS[v]} K={k}: {m[metric]:.3g}" for (v, k), m in sorted(agg.items())
                   if m.get(metric) is not None and not lo - (hi - lo) <= m[metric] <= hi + (hi - lo)]
            if off:
                ax.text(0.02, 0.02, "off scale: " + "; ".join(off), transform=ax.transAxes, fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean L0 (held-out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M, residual stream after block 15 of 30 (model.layers.14), dictionary 4608")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

    # information: Spearman bars + k_hat / L0 against surprisal bins for K = 32
    with_info = [r for r in rows if r["information"]]
    if not with_info:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    labels, vals = [], []
    for r in with_info:
        for name, c in r["information"].items():
            if r["variant"] == "topk":
                continue
            labels.append(f"{LABELS[r['variant']]} K={r['k']} s{r['seed']}: {name}")
            vals.append([c["surprisal"], c["entropy"], c["norm"]])
    vals = np.array(vals)
    y = np.arange(len(labels))
    for j, (m, off) in enumerate((("surprisal", -0.27), ("entropy", 0.0), ("norm", 0.27))):
        axes[0].barh(y + off, vals[:, j], height=0.26, label=m)
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].axvline(0, color="k", lw=0.6)
    axes[0].set_xlabel("Spearman correlation over held-out tokens")
    axes[0].legend(fontsize=8)
    for variant, key, style in (("softsae", "k_hat", "-"), ("softsae", "l0", "--"), ("softsae_paper", "k_hat", ":"),
                                ("batchtopk", "l0", "-.")):
        f = runs_dir / f"{variant}_k32_s0" / "per_token.npz"
        if not f.exists():
            continue
        z = np.load(f)
        if key not in z.files:
            continue
        s, v = z["surprisal"], z[key]
        edges = np.quantile(s, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 9)
        xs = [s[idx == b].mean() for b in range(10)]
        ys = [v[idx == b].mean() for b in range(10)]
        axes[1].plot(xs, ys, style, marker="o", label=f"{LABELS[variant]} {key}")
    axes[1].set_xlabel("next-token surprisal (nats; decile bins)")
    axes[1].set_ylabel("mean k_hat / L0 in the bin (K = 32)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(info_png, dpi=110)
    plt.close(fig)


def _f(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(a, meta: dict, rows: list[dict], agg: dict, comps: list[dict], base: dict, ks: list[int],
             missing: list[str], paired: list[dict]) -> str:
    full = a.scale == "full"
    lines = [f"# SmolLM2-135M: SoftSAE vs TopK vs BatchTopK ({'full' if full else 'REDUCED'} scale)", ""]
    if full:
        n_train = meta["rows"]["train"]
        lines += [f"**Scale.** {a.tokens_per_model:,} training tokens per model (batch {a.batch_size}), drawn "
                  f"uniformly with replacement from {n_train:,} train activation rows (the corpus holds about "
                  f"1.4M tokens, so each row is drawn ~{a.tokens_per_model / n_train:.1f} times); "
                  f"{meta['rows']['heldout']:,} held-out rows; LM evaluation on {base.get('tokens', 0):,} "
                  f"held-out tokens; seeds {', '.join(map(str, a.seeds_k32))} at K = 32, seed 0 elsewhere. "
                  f"Run on {a.device}" + (" (2 CPU cores, one thread per training process)" if a.device == "cpu"
                                          else "") + "."
                  + (f" **Not finished** (time; no model or no LM evaluation): {', '.join(missing)}."
                     if missing else ""), ""]
    if not full:
        lines += ["**Reduced run.** CPU only (2 shared cores), so the issue's scale (>= 2M training tokens per model, "
                  "two seeds at K = 32) was not run. Here: "
                  f"{a.tokens_per_model:,} training tokens per model (batch {a.batch_size}), seeds "
                  f"{', '.join(map(str, a.seeds_k32))} at K = 32 and seed 0 elsewhere, "
                  f"{meta['rows']['train']:,} train / {meta['rows']['heldout']:,} held-out activation rows, "
                  f"LM evaluation on {base.get('tokens', 0):,} held-out tokens. The SAEs are far from converged; "
                  "read the numbers as a first look, not as the issue's answer. Full scale: "
                  "`python benchmarks/science/smollm2.py --full`.", ""]
    lines += ["Setup: packaged SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), residual stream after "
              "block 15 of 30 (`model.layers.14`), documents of the Python docs corpus windowed at "
              f"{a.seq_len} tokens with BOS first, BOS excluded; 10% of the documents held out by a hash of "
              f"their id. Dictionary {a.dict_mult} x 576 = {a.dict_mult * 576}. Every setting is a recipe default "
              "(`--recipe default` / `--recipe paper`); nothing was tuned on the held-out split.", "",
              f"LM baselines on the held-out tokens: CE clean {_f(base.get('ce_loss_clean'))}, zero ablation "
              f"{_f(base.get('ce_loss_zero'))}, mean ablation {_f(base.get('ce_loss_mean'))} nats/token.", "",
              "| model | K | seed | held-out FVU | FVU w/o massive | mean L0 | L0 p5-p95 | dead % | CE increase "
              "| CE rec. (zero) | CE rec. (mean) | KL | mean k_hat | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["k"], list(LABELS).index(r["variant"]), r["seed"])):
        lines.append(f"| {LABELS[r['variant']]} | {r['k']} | {r['seed']} | {r['fvu']:.4f} | {_f(r['fvu_nm'])} | "
                     f"{r['l0']:.2f} | "
                     f"{_f(r['l0_p05'], '.0f')}-{_f(r['l0_p95'], '.0f')} | {100 * r['dead']:.1f} | "
                     f"{_f(r['ce_increase'])} | {_f(r['frac_recovered_zero'])} | {_f(r['frac_recovered_mean'])} | "
                     f"{_f(r['kl_mean'])} | {_f(r['k_hat'], '.2f')} | {r['train_seconds']:.0f} |")
    lines += ["", "Against TopK's frontier at the model's own mean L0 (TopK interpolated linearly in log L0 between "
              "its K points; 'extrap.' = outside them; means over the seeds; FVU at the activations' mean L0, CE and "
              "KL at the mean L0 of the LM evaluation's tokens). On/below = FVU and KL no higher, CE recovered no "
              "lower:", "",
              "| model | K | mean L0 | FVU (TopK at L0) | FVU w/o massive (TopK at L0) | CE rec. (TopK at L0) "
              "| KL (TopK at L0) |", "|---|---|---|---|---|---|---|"]

    def cell(c, m):
        if m not in c:
            return "—"
        v = c[m]
        mark = "on/below" if v["on_or_better"] else "ABOVE"
        return f"{v['value']:.4f} ({v['topk_at_l0']:.4f}{', extrap.' if v['extrapolated'] else ''}) {mark}"

    for c in comps:
        lines.append(f"| {LABELS[c['variant']]} | {c['k']} | {c['l0']:.2f} | {cell(c, 'fvu')} | {cell(c, 'fvu_nm')} | "
                     f"{cell(c, 'frac_recovered_zero')} | {cell(c, 'kl_mean')} |")
    lines += ["", "Targets (issue 17: SoftSAE on or below TopK's frontier at >= 2 of 3 K, in FVU and in CE recovered "
              "or KL):", ""]
    for variant in ("softsae", "softsae_paper"):
        cs = [c for c in comps if c["variant"] == variant]
        n_fvu = sum(c.get("fvu", {}).get("on_or_better", False) for c in cs)
        n_ce = sum(c.get("frac_recovered_zero", {}).get("on_or_better", False)
                   or c.get("kl_mean", {}).get("on_or_better", False) for c in cs)
        met = n_fvu >= 2 and n_ce >= 2
        lines.append(f"- {LABELS[variant]}: FVU on/below at {n_fvu} of {len(cs)} K; CE recovered or KL on/below at "
                     f"{n_ce} of {len(cs)} K -> target {'met' if met else 'NOT met'} at this scale.")
    m = next((r["massive"] for r in rows if r.get("massive")), None)
    if m is not None:
        lines += ["", f"Massive activations: {m['massive_rows']} of the {m['rows']:,} held-out rows have a centred "
                  f"norm above {m['x_median']:g}x the median (fixed before any comparison) and carry "
                  f"{100 * m['massive_variance_share']:.0f}% of the held-out variance, so the plain FVU mostly "
                  "measures how those few tokens are reconstructed; 'FVU w/o massive' is the FVU over the other rows. "
                  "The target is read on the plain FVU, as the issue states it."]
    if paired:
        lines += ["", "Paired on the same held-out tokens, against TopK at the same K and seed (not at equal L0: "
                  "SoftSAE's and BatchTopK's mean L0 is below K, so a difference <= 0 here is conservative for them): "
                  "mean per-token difference +- its standard error over blocks of 128 consecutive tokens.", "",
                  "| model | K | seed | CE with SAE minus TopK's | KL minus TopK's |", "|---|---|---|---|---|"]
        for c in paired:
            lines.append(f"| {LABELS[c['variant']]} | {c['k']} | {c['seed']} | {c['ce_sae']['diff']:+.4f} "
                         f"+- {_f(c['ce_sae']['se'])} | {c['kl']['diff']:+.4f} +- {_f(c['kl']['se'])} |")
    diag = [r for r in rows if r.get("diagnostics")]
    if diag:
        lines += ["", "Diagnostics (`softsae eval --diagnostics`, first 20k held-out rows): the same SoftSAE "
                  "dictionary read out with its own floor(k_hat), with a uniform top-K at the same mean L0, with one "
                  "batch threshold at that L0, and with the soft gate. If the uniform top-K on SoftSAE's dictionary is "
                  "already above TopK's frontier, the gap is the dictionary, not the allocation. (Other rows than "
                  "the table above: its floor(k_hat) FVU is over all held-out rows.)", "",
                  "| model | K | floor(k_hat) FVU (L0) | uniform top-K, same dict. | one threshold, same dict. "
                  "| soft gate FVU (L0) |", "|---|---|---|---|---|---|"]
        for r in sorted(diag, key=lambda r: (r["k"], r["variant"], r["seed"])):
            d = r["diagnostics"]

            def fl(key, d=d):
                v = d.get(key)
                return "—" if v is None else f"{v['fvu']:.4f} ({v['mean_l0']:.1f})"

            lines.append(f"| {LABELS[r['variant']]} | {r['k']} | {fl('floor')} | {fl('uniform_topk')} | "
                         f"{fl('batch_threshold')} | {fl('soft')} |")
    lines += ["", "Information (issue 17 item 3): Spearman correlation over held-out tokens of k_hat and of the "
              "actual L0 with the clean model's next-token surprisal, predictive entropy and the residual norm "
              "at the hooked layer (TopK's L0 is constant):", "",
              "| model | K | seed | measure | surprisal | entropy | residual norm |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["k"], list(LABELS).index(r["variant"]), r["seed"])):
        for name, c in (r["information"] or {}).items():
            if r["variant"] == "topk":
                continue
            lines.append(f"| {LABELS[r['variant']]} | {r['k']} | {r['seed']} | {name} | {c['surprisal']:+.3f} | "
                         f"{c['entropy']:+.3f} | {c['norm']:+.3f} |")
    pt = next((f for f in sorted(Path(a.runs).glob("*/per_token.npz"))), None)
    if pt is not None:
        from softsae.metrics import spearman

        z = np.load(pt)
        lines += ["", f"Between the LM's own measures on the same tokens: Spearman(surprisal, norm) "
                  f"{spearman(z['surprisal'], z['norm']):+.3f}, (surprisal, entropy) "
                  f"{spearman(z['surprisal'], z['entropy']):+.3f}, (entropy, norm) "
                  f"{spearman(z['entropy'], z['norm']):+.3f}."]
    stem = "smollm2" if full else "smollm2_reduced"
    lines += ["", f"Plots: `{stem}_frontiers.png` (L0 vs FVU, CE recovered, KL), `{stem}_information.png`.", ""]
    return "\n".join(lines)


def write_report(a, meta: dict, todo: list[tuple[str, int, int]]) -> dict:
    from softsae.checkpoint import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    names = [f"{v}_k{k}_s{s}" for v, k, s in todo]
    rows = collect(a.runs, names)
    bf = a.runs / "lm_baselines.json"
    base = json.loads(bf.read_text()) if bf.exists() else {}
    ks = sorted({r["k"] for r in rows})
    agg = mean_over_seeds(rows)
    comps = frontier_comparison(agg, ks)
    stem = "smollm2" if a.scale == "full" else "smollm2_reduced"
    missing = sorted(set(names) - {r["run"] for r in rows if r.get("kl_mean") is not None})
    paired = paired_against_topk(a.runs, rows)
    plot(rows, agg, RESULTS / f"{stem}_frontiers.png", RESULTS / f"{stem}_information.png", a.runs)
    out = {"scale": a.scale, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "activations": {"rows": meta["rows"], "d": meta["d"], "extract_tokens_per_s": meta.get("tokens_per_s")},
           "lm_baselines": base, "rows": rows, "frontier": comps, "paired_vs_topk": paired,
           "not_run": missing}
    atomic_write_json(RESULTS / f"{stem}.json", out)
    md = markdown(a, meta, rows, agg, comps, base, ks, missing, paired)
    (RESULTS / f"{stem}.md").write_text(md, encoding="utf-8")
    print((RESULTS / f"{stem}.md").read_text())
    return out
