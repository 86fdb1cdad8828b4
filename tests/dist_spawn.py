"""Helpers of the multi-process tests: spawn W gloo ranks on CPU with a hard time limit, tiny configs.

``spawn(fn, world, *args)`` runs ``fn(rank, world, store, *args)`` in W spawned processes; each joins a
gloo group through a FileStore (``join``). It returns the exceptions of the ranks that failed (a rank
killed by a signal shows up as ``ProcessExitedException``) and fails the test if the ranks are not done
within ``limit_s`` (a hang), killing what is left either way.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from softsae.data import ArraySource
from softsae.trainer import TrainConfig

SPAWN_LIMIT_S = 240.0
COLLECTIVE_TIMEOUT_S = 60.0


def join(rank: int, world: int, store: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join a gloo group of ``world`` ranks through the FileStore ``store`` (one thread per process)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def spawn(fn, world: int, tmp: Path, *args, limit_s: float = SPAWN_LIMIT_S) -> list[BaseException]:
    """Run ``fn(rank, world, store_path, *args)`` on ``world`` spawned ranks; the ranks' failures."""
    store = str(tmp / f"store_{time.monotonic_ns()}")
    ctx = mp.start_processes(fn, args=(world, store, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    failures: list[BaseException] = []
    try:
        while True:
            try:
                if ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                    break
            except ProcessException as e:  # join() stops the other ranks and reports the first failure
                failures.append(e)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {limit_s} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return failures


def cfg(arch: str, **kw) -> TrainConfig:
    """A tiny run: d=16, n=50 (uneven over 3 ranks), 8 steps of 32 rows, soft and hard phases, dead latents."""
    base = dict(arch=arch, dict_size=50, k=4, steps=8, batch_size=32, lr=1e-3, warmup_steps=2, decay_start=6,
                hard_frac=0.25, dead_feature_threshold=32, device="cpu", progress=False, log_every=1,
                checkpoint_every=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def grad_model(arch: str, x: torch.Tensor, make_cfg=None):
    """(model, resolved config) of the one-step gradient tests: SGD-ready, no clipping, k-loss active,
    normalised by x's scale, b_dec at x's geometric median (``make_cfg``: the test file's ``cfg``)."""
    from softsae.trainer import geometric_median, new_model

    torch.manual_seed(5)
    c = (make_cfg or cfg)(arch, grad_clip=0.0, k=2 if arch == "softsae" else 4, k_max=8).resolved(x.shape[1])
    model = new_model(c, x.shape[1])
    model.set_normalization(None, float(x.pow(2).sum(-1).mean().sqrt()))
    with torch.no_grad():
        model.b_dec.copy_(geometric_median(model.normalize(x)))
    return model, c


def acts(rows: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, d)).astype(np.float32) * np.linspace(0.5, 2.0, d, dtype=np.float32)


class Interrupted(RuntimeError):
    """Raised by :class:`FaultySource` to stop a run in the middle."""


class FaultySource(ArraySource):
    """An in-memory source whose ``at``-th ``sample`` call misbehaves: ``"kill"`` (SIGKILL this process),
    ``"raise"`` (:class:`Interrupted`) or ``"nan"`` (a NaN in the returned batch). Call 1 is the
    trainer's b_dec batch, call s + 2 the batch of step s."""

    def __init__(self, data: np.ndarray, at: int, fault: str) -> None:
        super().__init__(data, "faulty")
        self.at, self.fault, self.calls = at, fault, 0

    def sample(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        self.calls += 1
        x = super().sample(batch_size, rng)
        if self.calls == self.at:
            if self.fault == "kill":
                os.kill(os.getpid(), 9)
            if self.fault == "raise":
                raise Interrupted(f"interrupted at sample call {self.calls}")
            x[1, 2] = float("nan")
        return x
