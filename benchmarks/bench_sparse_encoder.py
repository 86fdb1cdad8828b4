"""Encoder backward, dense vs sparse (issue #11 item 2).

    python benchmarks/bench_sparse_encoder.py                       # CPU: B=4096, d=768, n=16384, K=32
    python benchmarks/bench_sparse_encoder.py --B 1024 --n 4096 --repeat 5 --markdown out.md

The encoder is ``pre = relu(x @ W_enc.T + b_enc)`` (B, n), fp32, followed by a top-K gate, so the
gradient reaching pre is non-zero at K latents per row. Timed (each p20/p50/p80 over --repeat runs):

Only backward passes are timed (the forward GEMM runs once and its graph is re-differentiated).

- ``dense``: autograd through ``F.relu(F.linear(x, W, b))`` given that (B, n) gradient: dx, dW, db
  by the two dense GEMMs (what a model without the sparse path runs);
- ``encoder_pre``: the same backward through ``softsae.ops.sparse_encoder.encoder_pre`` (compaction of
  dpre * (pre > 0) to pairs + the sparse op), the path the models take;
- ``op``: ``sparse_encoder_bwd`` alone on the (B, K) pairs (what a gate that already holds the
  pairs pays), per backend.

Gradients of the sparse paths are checked against the dense ones before timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import environment, percentiles_ms

import softsae
from softsae.ops.sparse_encoder import encoder_pre, sparse_encoder_bwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    B, d, n, K = args.B, args.d, args.n, args.K
    x = torch.randn(B, d, device=dev, requires_grad=True)
    W = (torch.randn(n, d, device=dev) / d**0.5).requires_grad_()
    b = torch.zeros(n, device=dev, requires_grad=True)
    leaves = (x, W, b)
    with torch.no_grad():
        pre0 = F.relu(F.linear(x, W, b))
        top = torch.topk(pre0, K, dim=1)
        grad = torch.zeros(B, n, device=dev).scatter_(1, top.indices, torch.randn(B, K, device=dev))
        dvals = torch.where(top.values > 0, grad.gather(1, top.indices), 0.0)
        idx = torch.where(top.values > 0, top.indices, -1)
    nnz = int((idx >= 0).sum())

    # Backward only: the forward runs once, its graph is kept (retain_graph) and re-differentiated.
    pre_dense = F.relu(F.linear(x, W, b))
    pre_sparse = {bk: encoder_pre(x, W, b, backend=bk) for bk in softsae.available_backends(dev)}

    def dense():
        return torch.autograd.grad(pre_dense, leaves, grad, retain_graph=True)

    def sparse(backend: str):
        return torch.autograd.grad(pre_sparse[backend], leaves, grad, retain_graph=True)

    backends = [bk for bk in softsae.available_backends(dev) if bk not in ("reference", "triton")]
    want = dense()
    rows = []
    for bk in backends:  # check first
        for g, w in zip(sparse(bk), want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)

    def time(label: str, fn) -> None:
        p = percentiles_ms(fn, dev, warmup=1, repeat=args.repeat)
        rows.append((label, p))
        print(f"{label:40s} p20 {p['p20_ms']:9.2f}  p50 {p['p50_ms']:9.2f}  p80 {p['p80_ms']:9.2f} ms", flush=True)

    print(f"B={B} d={d} n={n} K={K} nnz={nnz} device={dev} threads={torch.get_num_threads()}")
    time("dense autograd backward (2 GEMMs + sum)", dense)
    for bk in backends:
        time(f"encoder_pre backward [{bk}]", lambda bk=bk: sparse(bk))
        time(f"sparse_encoder_bwd op [{bk}]",
             lambda bk=bk: sparse_encoder_bwd(dvals, idx, x.detach(), W.detach(), backend=bk, validate=False))
    if args.markdown:
        lines = [f"\n### B={B}, d={d}, n={n}, K={K} (fp32, {dev}, {torch.get_num_threads()} threads)\n",
                 f"{environment(dev)}; command: `python benchmarks/bench_sparse_encoder.py "
                 f"--B {B} --d {d} --n {n} --K {K} --repeat {args.repeat}`\n",
                 "| path | p20 ms | p50 ms | p80 ms | vs dense (p50) |", "|---|---|---|---|---|"]
        base = rows[0][1]["p50_ms"]
        for label, p in rows:
            lines.append(f"| {label} | {p['p20_ms']:.1f} | {p['p50_ms']:.1f} | {p['p80_ms']:.1f} | "
                         f"{base / p['p50_ms']:.1f}x |")
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
