"""Sparse decode speed (forward+backward) vs dense matmul decode and F.embedding_bag.

    python benchmarks/bench_sparse_decode.py                  # CPU: n=16384, d=512, mean k in {32, 64, 128, 220}
    python benchmarks/bench_sparse_decode.py --device cuda --full
    python benchmarks/bench_sparse_decode.py --markdown out.md
    python benchmarks/bench_sparse_decode.py --device cuda --full --quick --json sd.json

Setting (issue #3): B = 4096, per-row k uniform in [k/2, 3k/2] (padded to the row max), float32.
Each implementation runs forward and backward (grads to the values/z, W_dec and b_dec).
"dense" starts from the dense z (B, n) a user of a dense gate already holds.
Effective GB/s counts the bytes the sparse op must move: the gathered W_dec rows (twice:
forward and dvals), their dW writes, vals/idx and x_hat/grad:
``bytes = (3 nnz d + 2 B d) e + 12 nnz`` (e = element size, nnz = non-padding pairs).
--json writes one record per (shape, backend) with p20/p50/p80 ms, those bytes and the peak
CUDA memory of one call; --quick skips the dense and embedding_bag baselines and times the
reference (the dense scatter + matmul) with the other backends. --rows FILE.jsonl appends those
records plus the baselines' as rows (_timing.write_rows), from which results_table.py renders
RESULTS.md's table; on CPU the memory is the process max-RSS growth.
"""

from __future__ import annotations

import itertools

import _timing
import torch
import torch.nn.functional as F

import softsae
from softsae.ops.sparse_decode_ref import densify


def make_codes(B: int, n: int, k_mean: int, device: torch.device):
    ks = torch.randint(k_mean // 2, k_mean + k_mean // 2 + 1, (B,), device=device)
    K = int(ks.max())
    idx = torch.stack([torch.randperm(n, device=device)[:K] for _ in range(min(B, 64))])
    idx = idx.repeat((B + 63) // 64, 1)[:B]  # distinct latents per row, cheap to build
    idx = idx[:, torch.randperm(K, device=device)] if K else idx
    idx = torch.where(torch.arange(K, device=device)[None] < ks[:, None], idx, -1)
    vals = torch.where(idx >= 0, torch.rand(B, K, device=device), 0.0)
    return vals, idx


def run(device, B, grid, backends, repeat, quick=False, with_reference=False):
    """(headers, table rows, JSON records, baseline records) for every (n, d, mean k) of ``grid``."""
    rows, records, base = [], [], []
    for n, d, k_mean in grid:
        r, rec, b = _rows_for(device, B, n, d, k_mean, backends, repeat, quick, with_reference or quick)
        rows += r
        records += rec
        base += b
    headers = ["n", "d", "mean k", "implementation", "fwd+bwd ms", "eff. GB/s", "dense / this", "emb_bag / this",
               "extra MiB"]
    return headers, rows, records, base


def _rows_for(device, B, n, d, k_mean, backends, repeat, quick=False, with_reference=False):
    rows, records, base = [], [], []
    W = torch.randn(n, d, device=device, requires_grad=True)
    b = torch.zeros(d, device=device, requires_grad=True)
    vals, idx = make_codes(B, n, k_mean, device)
    vals.requires_grad_()
    g = torch.randn(B, d, device=device)
    z = densify(vals.detach(), idx, n).requires_grad_()

    def dense():
        torch.autograd.backward(z @ W + b, g)

    flat_idx = idx.clamp(min=0)

    def bag():
        out = F.embedding_bag(flat_idx, W, per_sample_weights=vals * (idx >= 0), mode="sum") + b
        torch.autograd.backward(out, g)

    nnz = int((idx >= 0).sum())
    bytes_moved = (3 * nnz * d + 2 * B * d) * W.element_size() + nnz * 12
    dense_ms = bag_ms = None
    if not quick:
        shape = {"op": "sparse_decode", "B": B, "n": n, "d": d, "k_mean": k_mean, "K": int(idx.shape[1]), "nnz": nnz,
                 "dtype": "float32", "pass": "fwd+bwd", "bytes": bytes_moved, "repeat": repeat}
        for label, fn in (("dense z @ W", dense), ("F.embedding_bag", bag)):
            mem = _timing.peak_memory(fn, device)
            t = _timing.percentiles_ms(fn, device, warmup=1, repeat=repeat)
            base.append({**shape, "backend": label, **t, **mem})
        dense_ms, bag_ms = base[0]["p50_ms"], base[1]["p50_ms"]
        rows.append([n, d, k_mean, "dense z @ W", dense_ms, "", 1.0, "", ""])
        rows.append([n, d, k_mean, "F.embedding_bag", bag_ms, bytes_moved / bag_ms / 1e6, dense_ms / bag_ms, 1.0,
                     ""])
    for name in backends:
        if name == "reference" and not with_reference:
            continue  # the reference *is* the dense product plus a scatter

        def ours(name=name):
            torch.autograd.backward(softsae.sparse_decode(vals, idx, W, b, backend=name), g)

        mem = _timing.peak_memory(ours, device)  # first: on CPU the max-RSS growth is only seen once
        t = _timing.percentiles_ms(ours, device, repeat=repeat)
        ms = t["p50_ms"]
        records.append({"op": "sparse_decode", "backend": name, "B": B, "n": n, "d": d, "k_mean": k_mean,
                        "K": int(idx.shape[1]), "nnz": nnz, "dtype": "float32", "pass": "fwd+bwd",
                        "bytes": bytes_moved, "repeat": repeat, **t, **mem})
        extra = _timing.row_mem_bytes(mem)
        rows.append([n, d, k_mean, f"softsae {name}", ms, bytes_moved / ms / 1e6,
                     dense_ms / ms if dense_ms else "", bag_ms / ms if bag_ms else "",
                     extra / 2**20 if extra is not None else ""])
    return rows, records, base


def main() -> None:
    ap = _timing.bench_parser(__doc__)
    ap.add_argument("--full", action="store_true",
                    help="d in {512, 2304}, n in {16384, 65536}, k in {32, 64, 128, 220}")
    args = ap.parse_args()
    device, backends = _timing.device_and_backends(args)
    grid = (list(itertools.product([16384, 65536], [512, 2304], [32, 64, 128, 220])) if args.full
            else [(16384, 512, k) for k in (32, 64, 128, 220)])
    torch.manual_seed(0)
    headers, rows, records, base = run(device, args.B, grid, backends, args.repeat, args.quick,
                                       with_reference=bool(args.backends and "reference" in args.backends))
    title = f"Sparse decode fwd+bwd, B={args.B}, float32 — {_timing.environment(device)}; medians of {args.repeat}"
    _timing.write_outputs(args, "sparse_decode", device, title, headers, rows, records, base, B=args.B,
                          repeat=args.repeat,
                          byte_model="(3 nnz d + 2 B d) e + 12 nnz: W rows gathered twice (fwd, dvals) and written "
                                     "once (dW), x_hat and grad, vals + idx")


if __name__ == "__main__":
    main()
