"""Data-parallel training plumbing for ``softsae.trainer.train(..., parallel="data")``.

Layout: every rank holds the full model; the global batch of B rows (``batch_size``) is split by
rows, rank r taking rows ``shard_range(B, r, W)``. All ranks share ONE sampling stream: each draws
the same global batch (same seed, same ``source.sample(B, rng)``) and keeps its slice, so a run
means the same thing at any world size (memory-mapped data makes the unused rows cheap).

Gradient convention (SUM): each rank's loss is its share of the global loss, sum_r L_r = L:
per-row terms are sums over the local rows divided by the GLOBAL B; terms computed identically on
every rank from global statistics (the k-loss on ``global_mean(k_hat)``) are divided by W. Then
the SUM of the ranks' gradients is exactly dL/dtheta: ``global_mean``'s backward sums the
upstream gradients w_k * softplus'/W over the W ranks, giving each row the exact w_k * softplus'/B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from softsae.distributed._comm import all_reduce_
from softsae.distributed.process import group_rank_world, init_from_env, shard_range

__all__ = ["DataParallel", "allreduce_grads_", "broadcast_module_", "setup_data_parallel"]


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel group of one training process."""

    group: dist.ProcessGroup  # never None: None means "one process" to the losses and models
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    def rows(self, batch_size: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's rows of a global batch of ``batch_size`` rows."""
        return shard_range(batch_size, self.rank, self.world_size)

    def global_rows(self, local_rows: int, device: torch.device) -> int:
        """Total rows over all ranks (one all-reduce)."""
        t = torch.tensor([float(local_rows)], dtype=torch.float64, device=device)
        return int(all_reduce_(t, group=self.group).item())


def setup_data_parallel(device: torch.device, batch_size: int) -> tuple[DataParallel, torch.device]:
    """Join (or reuse) the default process group; returns the group info and this rank's device.

    Not initialised yet: ``init_from_env`` (torchrun variables; nccl for CUDA, gloo for CPU). A bare
    ``cuda`` device becomes ``cuda:LOCAL_RANK``. Raises if ``batch_size`` < world size (a rank
    without rows).
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_available():
        raise RuntimeError("parallel='data' needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        init_from_env(device=device)
    rank, world = group_rank_world(None)
    if batch_size < world:
        raise ValueError(f"batch_size ({batch_size}) is the global batch and must be >= the world size ({world})")
    return DataParallel(dist.group.WORLD, rank, world), device


@torch.no_grad()
def broadcast_module_(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0, group=group)


@torch.no_grad()
def allreduce_grads_(params, group: dist.ProcessGroup | None = None) -> None:
    """SUM the gradients of ``params`` over the ranks in one flat bucket (params without grad skipped;
    which ones have a grad must agree over the ranks, as it does when all ranks run the same graph)."""
    grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    by_dtype: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        all_reduce_(flat, group=group)
        off = 0
        for g in gs:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
