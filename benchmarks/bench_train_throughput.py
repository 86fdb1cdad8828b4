"""Training throughput: tokens/s of one full training step (forward, losses, backward, Adam,
decoder projection) per architecture and ops backend, fast backends vs the reference.

    python benchmarks/bench_train_throughput.py                          # CPU, d=384, n=4096, B=1024
    python benchmarks/bench_train_throughput.py --device cuda --n 16384 65536 --batch-size 4096

Rows: SoftSAE in the soft phase (dense gate + GEMM decode, and sparse gate + sparse_decode),
SoftSAE in the hard phase (per-row top-k + sparse_decode), TopK, BatchTopK. Columns: median ms
per step and tokens/s for every backend available on the device, and the speed-up of the
fastest non-reference backend over the reference. --rows FILE.jsonl appends one row per
(n, variant, backend) with p20/p50/p80 ms per step, tokens/s and memory (_timing.write_rows).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _timing import add_rows_args, environment, markdown_table, peak_memory, percentiles_ms, write_rows

import softsae
from softsae.losses import DeadLatentTracker
from softsae.trainer import TrainConfig, make_optimizer, new_model, train_step

VARIANTS = [  # (label, arch, hard phase, decode_mode)
    ("SoftSAE soft, dense decode", "softsae", False, "dense"),
    ("SoftSAE soft, sparse gate+decode", "softsae", False, "sparse"),
    ("SoftSAE hard", "softsae", True, "auto"),
    ("TopK", "topk", False, "auto"),
    ("BatchTopK", "batchtopk", False, "auto"),
]


def make_train_step(device, backend, arch, hard, decode_mode, d, n, B, k, alpha, x=None, dead_frac=0.1, k_hidden=None):
    """A closure running one softsae training step (``train_step``) on the batch ``x`` (B, d), default
    N(0, 1). Before each step the first ``dead_frac`` of the latents are marked dead, so the auxk path
    runs on every step, not only until they fire."""
    c = TrainConfig(arch=arch, dict_size=n, k=k, steps=10, batch_size=B, backend=backend, alpha=alpha,
                    decode_mode=decode_mode, warmup_steps=0, hard_topk_steps=10 if hard else 0,
                    dead_feature_threshold=B * 1000, device=str(device), k_hidden=k_hidden).resolved(d)
    torch.manual_seed(0)
    model = new_model(c, d).to(device)
    opt = make_optimizer(model.parameters(), c.lr)
    tracker = DeadLatentTracker(n, c.dead_feature_threshold, device)
    n_dead = int(n * dead_frac)
    x = torch.randn(B, d, device=device) if x is None else x

    def step():
        tracker.tokens_since_fired[:n_dead] = c.dead_feature_threshold
        return train_step(model, opt, tracker, x, 5, c)

    return step


def step_ms(device, backend, arch, hard, decode_mode, d, n, B, k, alpha, repeat) -> dict:
    """p20/p50/p80 ms of one training step (after 2 warm-up steps) and the memory of one step."""
    step = make_train_step(device, backend, arch, hard, decode_mode, d, n, B, k, alpha)
    step()
    mem = peak_memory(step, device)
    return {**percentiles_ms(step, device, warmup=1, repeat=repeat), **mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n", type=int, nargs="+", default=[4096])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=3e-3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    add_rows_args(ap)
    a = ap.parse_args()
    device = torch.device(a.device)
    backends = a.backends or [b for b in softsae.available_backends(device) if b != "triton" or device.type == "cuda"]
    headers = ["n", "variant"] + [f"{b} ms" for b in backends] + [f"{b} tok/s" for b in backends]
    fast = [b for b in backends if b != "reference"]
    if "reference" in backends and fast:
        headers.append("best fast / reference")
    rows, records = [], []
    for n in a.n:
        for label, arch, hard, mode in VARIANTS:
            stats = {b: step_ms(device, b, arch, hard, mode, a.d, n, a.batch_size, a.k, a.alpha, a.repeat)
                     for b in backends}
            ms = {b: t["p50_ms"] for b, t in stats.items()}
            records += [{"op": "train_step", "variant": label, "arch": arch, "hard": hard, "decode_mode": mode,
                         "backend": b, "n": n, "d": a.d, "B": a.batch_size, "k": a.k, "alpha": a.alpha,
                         "dtype": "float32", "repeat": a.repeat, "tokens_per_s": a.batch_size / t["p50_ms"] * 1e3,
                         **t} for b, t in stats.items()]
            row = [n, label] + [ms[b] for b in backends] + [a.batch_size / ms[b] * 1e3 for b in backends]
            if "reference" in backends and fast:
                row.append(f"{ms['reference'] / min(ms[b] for b in fast):.2f}x")
            rows.append(row)
            print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.4g}" for v in row), flush=True)
    table = markdown_table(headers, rows)
    env = (f"{environment(device)}; d={a.d}, B={a.batch_size}, K={a.k}, alpha={a.alpha:g}, "
           f"float32, 10% dead latents (auxk on)")
    print()
    print(table)
    print()
    print(env)
    if a.markdown:
        a.markdown.write_text(table + "\n\n" + env + "\n")
    if a.rows:
        write_rows(a.rows, records, device, note=a.note)


if __name__ == "__main__":
    main()
