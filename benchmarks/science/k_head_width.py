"""SoftSAE's k-head width on MiniLM: what a head narrower than the paper's (k_hidden < n) costs.

    python benchmarks/science/k_head_width.py               # K 16, seed 0, k_hidden 384 and 96 (n = 1536), 5M tokens
    python benchmarks/science/k_head_width.py --ks 8 16 32 --seeds 0 1 --widths 384

The head ``Linear(d, m) -> ReLU -> Linear(m, 1)`` costs two (B, m, d) GEMMs per training step
(forward and weight gradient); at the paper's m = n that is twice the encoder's GEMM, and it is
why the SoftSAE step costs about 2x a TopK step (benchmarks/bench_train_step.py). This trains
SoftSAE with narrower heads under the recipe and data of ``science_minilm.py --full`` (same
activations, dictionary, batch, tokens and seed; only ``k_hidden`` differs) and compares each with
the full experiment's width-n run and TopK frontier, which it reads from the same run directory
(and trains there, as ``science_minilm.py --full`` would, when they are missing). Everything is measured on the
held-out split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from science_minilm import FULL, RESULTS, ROOT, prepare, run_one  # this folder (the script's)

from softsae.metrics import interp_log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[384, 96], help="k_hidden values (n itself is the "
                    "full experiment's run)")
    ap.add_argument("--tokens-per-model", type=int, default=FULL["tokens_per_model"])
    ap.add_argument("--dict-size", type=int, default=1536)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "minilm_docs.npy")
    ap.add_argument("--max-acts-tokens", type=int, default=None)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "science_minilm_full",
                    help="run directory holding the width-n and TopK runs (science_minilm.py --full)")
    ap.add_argument("--eval-rows", type=int, default=None)
    ap.add_argument("--downstream-texts", type=int, default=512)
    ap.add_argument("--diag-rows", type=int, default=10_000)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "k_head_width.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    _meta, paths, _texts, splice, mean, mean_cos = prepare(a)
    run = lambda arch, k, seed, **kw: run_one(arch, k, seed, a, paths, splice, mean, mean_cos, **kw)  # noqa: E731

    rows = []
    for seed in a.seeds:
        topk = [run("topk", k, seed) for k in (8, 16, 32)]
        l0s = [r["eval"]["l0"]["mean"] for r in topk]
        fvus = [r["eval"]["fvu"] for r in topk]
        downs = [r["downstream"]["frac_recovered"] for r in topk]
        for k in a.ks:
            variants = [(a.dict_size, run("softsae", k, seed))]
            variants += [(w, run("softsae", k, seed, extra={"k_hidden": w}, name=f"softsae_k{k}_s{seed}_kh{w}"))
                         for w in a.widths]
            for w, r in variants:
                l0, fvu = r["eval"]["l0"]["mean"], r["eval"]["fvu"]
                t_fvu, extrap = interp_log(l0, l0s, fvus)
                t_down, _ = interp_log(l0, l0s, downs)
                rows.append((k, seed, w, l0, fvu, t_fvu, extrap, r["downstream"]["frac_recovered"], t_down,
                             r["train_seconds"]))

    lines = ["| K | seed | k_hidden | mean L0 | FVU | TopK FVU at that L0 | ratio | downstream SoftSAE / TopK at "
             "that L0 | train s (1 thread) |", "|---|---|---|---|---|---|---|---|---|"]
    for k, seed, w, l0, fvu, t_fvu, extrap, down, t_down, secs in sorted(rows, key=lambda r: (r[0], r[1], -r[2])):
        tag = " (n, the paper's)" if w == a.dict_size else ""
        lines.append(f"| {k} | {seed} | {w}{tag} | {l0:.2f} | {fvu:.4f} | {t_fvu:.4f}"
                     f"{' (extrapolated)' if extrap else ''} | {fvu / t_fvu:.3f} | {down:.4f} / {t_down:.4f} "
                     f"| {secs:.0f} |")
    text = (f"## SoftSAE k-head width on MiniLM (K {', '.join(map(str, a.ks))})\n\n"
            f"`{' '.join(['python benchmarks/science/k_head_width.py'] + sys.argv[1:])}`: "
            f"{a.tokens_per_model} tokens per "
            f"model, dictionary {a.dict_size}, batch {a.batch_size}, seeds {a.seeds}, the trainer's defaults "
            f"(only k_hidden differs; the width-n and TopK runs are those of science_minilm.py --full in "
            f"`{a.runs.relative_to(ROOT) if a.runs.is_relative_to(ROOT) else a.runs}`). Held-out split; ratio = "
            f"SoftSAE FVU / TopK's FVU interpolated (log-log) at SoftSAE's mean L0; train seconds were measured on "
            f"a shared 2-core machine.\n\n" + "\n".join(lines) +
            f"\n\nWall time {time.perf_counter() - t0:.0f} s (cached runs not re-trained).\n")
    print(text)
    a.markdown.write_text(text)


if __name__ == "__main__":
    main()
