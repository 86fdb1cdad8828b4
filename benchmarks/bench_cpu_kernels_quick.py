"""Quick timing of the CPU kernels in ``softsae._C`` against the baselines they replace.

    python benchmarks/bench_cpu_kernels_quick.py            # both ops, default shapes
    python benchmarks/bench_cpu_kernels_quick.py --op soft_topk --s 1e-4 1.0 --threads 2

soft top-k: forward + backward (gate=False, grad = randn) at x = randn(R, n) float32 with
per-row k uniform in [20, 220], against ``torch.topk(x, 220)``.
sparse decode: forward + backward (dvals and dW) at B x n, d, per-row k around 64 in the
padded layout, against the dense ``z @ W`` forward + backward built from the same pairs.

Reports the median of ``--reps`` runs in wall milliseconds, plus the least CPU time of one run
(process time: on a shared machine it is less disturbed by other jobs than wall time), both from
``_timing.percentiles_ms``; --rows-file FILE.jsonl appends p20/p50/p80 rows (``_timing.write_rows``).
The main benchmarks (tables, RESULTS.md) live in bench_soft_topk.py / bench_sparse_decode.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import add_rows_args, percentiles_ms, write_rows  # noqa: E402

CPU = torch.device("cpu")
ROWS: list[dict] = []  # one per timing, written by --rows


def timed(fn, reps: int, **row) -> tuple[float, float]:
    """(median wall ms, min process-CPU ms) over reps runs after one warm-up; records a row."""
    t = percentiles_ms(fn, CPU, warmup=1, repeat=reps, cpu_time=True)
    ROWS.append({**row, "dtype": "float32", "repeat": reps, "threads": torch.get_num_threads(), **t})
    return t["p50_ms"], t["cpu_min_ms"]


def bench_soft_topk(ext, rows: int, n: int, scales: list[float], reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g)
    k = torch.rand(rows, generator=g, dtype=torch.float64) * 200 + 20
    grad = torch.randn(rows, n, generator=g)
    shape = {"op": "soft_topk_kernel", "B": rows, "n": n}
    topk_w, topk_c = timed(lambda: torch.topk(x, 220), reps, **shape, backend="torch.topk(x, 220)", pass_="fwd")
    print(f"soft_topk  x=({rows}, {n}) float32, k in [20, 220], threads={torch.get_num_threads()}")
    print(f"  {'s':>8} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} {'topk ms':>9} {'total/topk':>10}"
          f" {'cpu total':>10} {'cpu topk':>9}")
    for s in scales:
        _, t = ext.soft_topk_fwd(x, k, s, True, False)
        fw, fc = timed(lambda s=s: ext.soft_topk_fwd(x, k, s, True, False), reps, **shape, backend="softsae._C",
                       pass_="fwd", alpha=s)
        bw, bc = timed(lambda s=s, t=t: ext.soft_topk_bwd(grad, x, t, s, True, False), reps, **shape,
                       backend="softsae._C", pass_="bwd", alpha=s)
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

    shape = {"op": "sparse_decode_kernel", "B": batch, "n": n, "d": d, "k_mean": mean_k, "pass_": "fwd+bwd"}
    sw, sc = timed(sparse, reps, **shape, backend="softsae._C")
    dw, dc = timed(dense, max(1, reps // 2), **shape, backend="dense z @ W")
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
    add_rows_args(p, "--rows-file")
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
    if args.rows_file:
        write_rows(args.rows_file, [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in ROWS], CPU,
                   note=args.note)


if __name__ == "__main__":
    main()
