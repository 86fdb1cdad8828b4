"""Distributed training throughput and memory: tokens/s against world size, data vs dictionary mode.

    python benchmarks/bench_distributed.py                                  # CPU gloo, W = 1, 2
    python benchmarks/bench_distributed.py --d 128 --n 8192 --batch-size 256 --steps 14 --out results.md

Each configuration runs ``softsae.trainer.train`` for ``--steps`` steps in W spawned gloo processes
(one thread each) on an in-memory synthetic array: ``none`` (one process, no group), ``data``
(rows split over the ranks) and ``dictionary`` (latents split over the ranks). tokens/s is the
global batch over the mean step time between the logged steps ``--warmup`` and the last one
(rank 0's ``elapsed_s`` in metrics.jsonl). Memory per rank: the peak resident set (ru_maxrss, which
includes the ~0.9 GB of the Python/torch CUDA-build runtime), its growth during ``train()``, and the
exact bytes of the training state the rank holds (parameters, gradients and the two Adam moments, float32).

On CPU with gloo this is indicative only: W processes share the machine's cores, gloo's
collectives go through loopback TCP, and the sharded soft top-k threshold search is plain PyTorch in
float64 (every other part of the step runs the one-process models' own kernels on each shard; one
rank holds the whole model, placed locally). ``--sharded-one-rank`` adds a ``dictionary-sharded`` row:
one rank with the sharded placement forced (its collectives are identities), the cost of the sharded
code path itself against the local one. On a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softsae.distributed.process import shard_range, shutdown
from softsae.distributed.state import SHARD_DIM
from softsae.trainer import TrainConfig, new_model, train


def _config(a, arch: str, parallel: str) -> TrainConfig:
    return TrainConfig(arch=arch, dict_size=a.n, k=a.k, steps=a.steps, batch_size=a.batch_size, device="cpu",
                       warmup_steps=1, hard_frac=0.0, progress=False, log_every=a.warmup, checkpoint_every=0,
                       parallel=parallel, seed=0)


def _worker(rank: int, world: int, store: str, a, arch: str, parallel: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if parallel == "dictionary-sharded":  # one rank, the sharded placement instead of the local one
        import softsae.parallel
        from softsae.distributed.placement import ShardedLatents

        def shard_model_(model, group=None):
            model.latents = ShardedLatents(group, model.n)
            return model

        softsae.parallel.shard_model_ = shard_model_
        parallel = "dictionary"
    if parallel != "none":
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    try:
        x = np.random.default_rng(0).standard_normal((a.rows, a.d)).astype(np.float32)
        run_dir = Path(out) / "run"
        before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # runtime + data, before training
        train(x, _config(a, arch, parallel), out_dir=run_dir if rank == 0 else None)
        maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem = {"maxrss_mb": maxrss_mb, "growth_mb": maxrss_mb - before_mb}
        Path(out, f"rss{rank}.json").write_text(json.dumps(mem))
    finally:
        if parallel != "none":
            shutdown()


def _state_mb(a, arch: str, parallel: str, world: int) -> float:
    """Largest per-rank training state (params + grads + 2 Adam moments), MB."""
    model = new_model(_config(a, arch, "none").resolved(a.d), a.d)
    worst = 0
    for r in range(world if parallel == "dictionary" else 1):
        lo, hi = shard_range(a.n, r, world)
        numel = 0
        for name, p in model.named_parameters():
            numel += p.numel() // a.n * (hi - lo) if parallel == "dictionary" and name in SHARD_DIM else p.numel()
        worst = max(worst, numel)
    return 4 * 4 * worst / 2**20


def run(a, arch: str, parallel: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, str(Path(tmp) / "store"), a, arch, parallel, tmp),
                                 nprocs=world, join=False, start_method="spawn")
        while not ctx.join(timeout=a.timeout):
            pass
        lines = [json.loads(s) for s in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        first = next(m for m in lines if m["step"] == a.warmup)
        last = lines[-1]
        step_s = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
        rss = [json.loads(Path(tmp, f"rss{r}.json").read_text()) for r in range(world)]
    return {"arch": arch, "parallel": parallel, "world": world, "step_ms": 1e3 * step_s,
            "tokens_per_s": a.batch_size / step_s, "maxrss_mb": max(m["maxrss_mb"] for m in rss),
            "growth_mb": max(m["growth_mb"] for m in rss), "state_mb": _state_mb(a, arch, parallel, world)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3, help="logged step the timing starts from")
    ap.add_argument("--archs", nargs="+", default=["softsae", "topk"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["data", "dictionary"], choices=["data", "dictionary"])
    ap.add_argument("--sharded-one-rank", action="store_true",
                    help="also run one dictionary rank with the sharded placement forced")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", help="also write the markdown table to this file")
    a = ap.parse_args()
    if (a.steps - 1) % a.warmup:
        ap.error("--steps - 1 must be a multiple of --warmup (the logged steps)")
    rows = []
    for arch in a.archs:
        rows.append(run(a, arch, "none", 1))
        for parallel in a.modes:
            for world in a.worlds:
                rows.append(run(a, arch, parallel, world))
                print(rows[-1], flush=True)
        if a.sharded_one_rank:
            rows.append(run(a, arch, "dictionary-sharded", 1))
            print(rows[-1], flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = (f"d={a.d}, n={a.n}, k={a.k}, global batch {a.batch_size}, {a.steps} steps (timed from step {a.warmup}), "
            f"CPU gloo, 1 thread per process, torch {torch.__version__}, {stamp}")
    table = [head, "", "| arch | mode | ranks | ms/step | tokens/s | peak RSS per rank (MB) | RSS growth in train() "
             "per rank (MB) | train state per rank (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['arch']} | {r['parallel']} | {r['world']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['maxrss_mb']:.0f} | {r['growth_mb']:.0f} | {r['state_mb']:.1f} |" for r in rows]
    text = "\n".join(table)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
