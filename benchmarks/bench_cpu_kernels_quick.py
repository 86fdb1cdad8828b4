"""Quick timing of the CPU kernels in ``softsae._C`` against the baselines they replace.

    python benchmarks/bench_cpu_kernels_quick.py            # both ops, default shapes
    python benchmarks/bench_cpu_kernels_quick.py --op soft_topk --s 1e-4 1.0 --threads 2

soft top-k: forward + backward (gate=False, grad = randn) at x = randn(R, n) float32 with
per-row k uniform in [20, 220], against ``torch.topk(x, 220)``.
sparse decode: forward + backward (dvals and dW) at B x n, d, per-row k around 64 in the
padded layout, against the dense ``z @ W`` forward + backward built from the same pairs.

Reports the median of ``--reps`` runs in wall milliseconds, plus the CPU time of one run
(process time: on a shared machine it is less disturbed by other jobs than wall time).
The main benchmarks (tables, RESULTS.md) live in bench_soft_topk.py / bench_sparse_decode.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, reps: int) -> tuple[float, float]:
    """(median wall ms, min process-CPU ms) over reps runs, after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), min(cpu)


def bench_soft_topk(ext, rows: int, n: int, scales: list[float], reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g)
    k = torch.rand(rows, generator=g, dtype=torch.float64) * 200 + 20
    grad = torch.randn(rows, n, generator=g)
    topk_w, topk_c = timed(lambda: torch.topk(x, 220), reps)
    print(f"soft_topk  x=({rows}, {n}) float32, k in [20, 220], threads={torch.get_num_threads()}")
    print(f"  {'s':>8} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} {'topk ms':>9} {'total/topk':>10}"
          f" {'cpu total':>10} {'cpu topk':>9}")
    for s in scales:
        _, t = ext.soft_topk_fwd(x, k, s, True, False)
        fw, fc = timed(lambda s=s: ext.soft_topk_fwd(x, k, s, True, False), reps)
        bw, bc = timed(lambda s=s, t=t: ext.soft_topk_bwd(grad, x, t, s, True, False), reps)
        print(f"  {s:>8g} {fw:>9.1f} {bw:>9.1f} {fw + bw:>9.1f} {topk_w:>9.1f} {(fw + bw) / topk_w:>10.2f}"
              f" {fc + bc:>10.1f} {topk_c:>9.1f}")


def bench_sparse_decode(ext, batch: int, n: int, d: int, mean_k: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    kmax = 2 * mean_k
    lens = torch.randint(1, kmax + 1, (batch,), generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:kmax] for _ in range(batch)])
    idx = torch.where(torch.arange(kmax)[None, :] < lens[:, None], idx, -1)
    vals = torch.randn(batch, kmax, generator=g)
    W = torch.randn(n, d, generator=g) / d**0.5
    grad = torch.randn(batch, d, generator=g)
    z = torch.zeros(batch, n).scatter_(1, idx.clamp(min=0), torch.where(idx >= 0, vals, 0.0))

    def sparse():
        ext.sparse_decode_fwd(vals, idx, W, None)
        ext.sparse_decode_bwd(grad, vals, idx, W, True, True, True)

    def dense():
        z @ W  # forward
        grad @ W.T  # dz
        z.T @ grad  # dW

    sw, sc = timed(sparse, reps)
    dw, dc = timed(dense, max(1, reps // 2))
    print(f"sparse_decode  B={batch} n={n} d={d} mean k={lens.float().mean():.1f}, threads={torch.get_num_threads()}")
    print(f"  sparse fwd+bwd {sw:9.1f} ms (cpu {sc:.1f})   dense fwd+bwd {dw:9.1f} ms (cpu {dc:.1f})"
          f"   speedup {dw / sw:.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=["soft_topk", "sparse_decode", "all"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--s", type=float, nargs="+", default=[1e-4, 1e-2, 1.0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--mean-k", type=int, default=64)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import softsae._C as ext
    except ImportError as err:
        raise SystemExit(f"softsae._C is not built ({err})") from err
    if args.op in ("soft_topk", "all"):
        bench_soft_topk(ext, args.rows, args.n, args.s, args.reps)
    if args.op in ("sparse_decode", "all"):
        bench_sparse_decode(ext, args.rows, args.n, args.d, args.mean_k, args.reps)


if __name__ == "__main__":
    main()
