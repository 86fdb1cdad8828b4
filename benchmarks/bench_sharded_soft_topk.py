"""Measure the dictionary-sharded Soft Top-K on CPU gloo ranks against the unsharded float64 reference.

    python benchmarks/bench_sharded_soft_topk.py --rows 64 --n 4096 --world 2 --alpha 1e-4 1e-2 1.0
    python benchmarks/bench_sharded_soft_topk.py --threshold --rows 256 --n 8192 --world 1 --alpha 1 0.1 0.01 0.003

Prints, per alpha: the collectives of the forward (all-gathers incl. the metadata check, all-reduces:
the threshold's fallback search adds one per iteration), sharded forward and backward wall time
(rank 0, after a barrier), the unsharded fwd+bwd time in one process (reference and default backend,
float64), and the max relative error of p, dx, dk, dalpha over all ranks. ``--threshold``: only the
global threshold of a float64 randn shard with k fixed, the one-gather solve (``_global_threshold``)
against the bracket search it falls back to (``_search_threshold``), best of 3 on rank 0, and the
largest difference of the two t.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softsae
from softsae.distributed import reduce_from_shards, shard_range, sharded_soft_topk
from softsae.distributed import sharded_ops as _ops


def _best_ms(fn, reps: int = 3) -> tuple[float, torch.Tensor]:
    fn()
    best, out = math.inf, None
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best, out


def _threshold_only(rank: int, world: int, rows: int, n: int, k: float, alphas: list[float]) -> None:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = shard_range(n, rank, world)
    ys, kk = x[:, lo:hi].contiguous(), torch.full((rows,), k, dtype=torch.float64)
    for alpha in alphas:
        s = torch.tensor(alpha, dtype=torch.float64)
        fast_ms, t_fast = _best_ms(lambda s=s: _ops._global_threshold(ys, kk, s, n, None))
        search_ms, t_search = _best_ms(lambda s=s: _ops._search_threshold(ys, kk, s, n, None))
        if rank == 0:
            print(f"rows={rows} n={n} world={world} k={k:g} alpha={alpha:g}: one-gather {fast_ms:.1f} ms, "
                  f"bracket search {search_ms:.1f} ms, max |t difference| {(t_fast - t_search).abs().max():.1e}",
                  flush=True)


def _worker(rank: int, world: int, store_path: str, rows: int, n: int, alphas: list[float],
            threshold_k: float | None) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    if threshold_k is not None:
        try:
            _threshold_only(rank, world, rows, n, threshold_k, alphas)
        finally:
            dist.destroy_process_group()
        return
    calls = {"gather": 0, "reduce": 0}
    orig_reduce, orig_gather = _ops.all_reduce_, _ops.all_gather_stack

    def counting_reduce(t, op=dist.ReduceOp.SUM, group=None):
        calls["reduce"] += 1
        return orig_reduce(t, op, group)

    def counting_gather(t, group=None):
        calls["gather"] += 1
        return orig_gather(t, group)

    _ops.all_reduce_, _ops.all_gather_stack = counting_reduce, counting_gather
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, n, generator=g, dtype=torch.float64)
        k = torch.rand(rows, generator=g, dtype=torch.float64) * min(200, n - 2) + 1
        w = torch.randn(rows, n, generator=g, dtype=torch.float64)
        lo, hi = shard_range(n, rank, world)
        for alpha in alphas:
            xs, ks = x[:, lo:hi].clone().requires_grad_(), k.clone().requires_grad_()
            a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
            dist.barrier()
            calls.update(gather=0, reduce=0)
            t0 = time.perf_counter()
            p = sharded_soft_topk(xs, ks, a)
            t1 = time.perf_counter()
            coll = f"{calls['gather']} all-gathers, {calls['reduce']} all-reduces"
            reduce_from_shards((w[:, lo:hi] * p).sum()).backward()
            t2 = time.perf_counter()
            xf, kf = x.clone().requires_grad_(), k.clone().requires_grad_()
            af = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
            t3 = time.perf_counter()
            pf = softsae.soft_topk(xf, kf, af, backend="reference")
            (w * pf).sum().backward()
            t4 = time.perf_counter()
            xc, kc = x.clone().requires_grad_(), k.clone().requires_grad_()
            t5 = time.perf_counter()
            (w * softsae.soft_topk(xc, kc, alpha)).sum().backward()  # default backend, one process
            t6 = time.perf_counter()

            def err(a_, b_):
                return ((a_ - b_).abs() / b_.abs().clamp_min(1)).max().item() if a_.numel() else 0.0

            errs = torch.tensor([err(p, pf[:, lo:hi]), err(xs.grad, xf.grad[:, lo:hi]), err(ks.grad, kf.grad),
                                 err(a.grad, af.grad)], dtype=torch.float64)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"rows={rows} n={n} world={world} alpha={alpha:g}: forward {coll}, "
                      f"sharded fwd {t1 - t0:.3f} s bwd {t2 - t1:.3f} s; one process fwd+bwd: reference "
                      f"{t4 - t3:.3f} s, default backend {t6 - t5:.3f} s; "
                      f"max rel err p {errs[0]:.1e} dx {errs[1]:.1e} dk {errs[2]:.1e} dalpha {errs[3]:.1e}",
                      flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the measurement on ``--world`` spawned gloo processes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--alpha", type=float, nargs="+", default=[1e-4, 1e-2, 1.0])
    ap.add_argument("--threshold", action="store_true", help="time only the global threshold (k = --k)")
    ap.add_argument("--k", type=float, default=32.0)
    args = ap.parse_args(argv)
    if args.rows < 1 or args.n < 2 or args.world < 1:
        ap.error("need --rows >= 1, --n >= 2, --world >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        k = args.k if args.threshold else None
        run = (args.world, os.path.join(tmp, "store"), args.rows, args.n, args.alpha, k)
        mp.start_processes(_worker, args=run, nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
