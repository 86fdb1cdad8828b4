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

__all__ = ["DataParallel", "OverlappedGradReduce", "allreduce_grads_", "broadcast_module_", "setup_data_parallel"]


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel group of one training process."""

    group: dist.ProcessGroup  # never None: None means "one process" to the losses and models
    rank: int
    world_size: int
    reducer: OverlappedGradReduce | None = None  # gradients all-reduced during backward (else after it)

    def sync_grads(self, params) -> None:
        """After ``loss.backward()``: every gradient of ``params`` holds the SUM over the ranks."""
        if self.reducer is not None:
            self.reducer.wait()
        else:
            allreduce_grads_(params, self.group)

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


class OverlappedGradReduce:
    """SUM-all-reduce gradients while the backward still runs, as DDP does.

    A post-accumulate-grad hook on every parameter that needs a gradient starts an asynchronous
    all-reduce of that gradient as soon as autograd has finished accumulating it, so the
    communication of the decoder's gradient overlaps the encoder's backward, and so on.
    Gradients smaller than ``bucket_bytes`` wait in one flat bucket that is reduced as soon as it is
    full, and in any case by ``wait()``. Every rank runs the same graph, so the hooks fire in the same
    order everywhere and the collectives match. ``wait()`` (before clipping and the optimizer) blocks
    until every reduction has landed and copies bucketed gradients back. ``remove()`` detaches the hooks.
    """

    def __init__(self, params, group: dist.ProcessGroup, bucket_bytes: int = 1 << 20) -> None:
        self.group, self.bucket_bytes = group, int(bucket_bytes)
        self._works: list = []
        self._bucket: list[Tensor] = []
        self._flats: list[tuple[Tensor, list[Tensor]]] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params if p.requires_grad]

    def _on_grad(self, p: Tensor) -> None:
        g = p.grad
        if g.numel() * g.element_size() >= self.bucket_bytes:
            self._works.append(dist.all_reduce(g, group=self.group, async_op=True))
            return
        if self._bucket and (self._bucket[0].dtype, self._bucket[0].device) != (g.dtype, g.device):
            self._flush()
        self._bucket.append(g)
        if sum(t.numel() * t.element_size() for t in self._bucket) >= self.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in self._bucket])
        self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))
        self._flats.append((flat, self._bucket))
        self._bucket = []

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every reduction started since the last ``wait`` (and the partly filled bucket)."""
        self._flush()
        for w in self._works:
            w.wait()
        for flat, grads in self._flats:
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
        self._works, self._flats = [], []

    @property
    def in_flight(self) -> int:
        """Reductions started and not yet waited for (for tests and diagnostics)."""
        return len(self._works) + (1 if self._bucket else 0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
