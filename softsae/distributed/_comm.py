"""Small collective helpers shared by the sharded ops and the global statistics (no autograd here)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed.process import group_rank_world


class DistributedInputError(ValueError):
    """Raised with the same message on every rank when some rank's input is unusable."""


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Device that collectives of ``group`` need: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_stack(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(W, *t.shape): every rank's ``t`` (same shape and dtype on every rank), in rank order."""
    _, world = group_rank_world(group)
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def all_reduce_(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                group: dist.ProcessGroup | None = None) -> Tensor:
    """In-place all-reduce of ``t`` (returned for chaining)."""
    dist.all_reduce(t, op=op, group=group)
    return t


def raise_everywhere(messages: list[str], what: str, cause: BaseException | None = None) -> None:
    """Raise the same :class:`DistributedInputError` on every rank if ``messages`` (built from gathered,
    identical data) is non-empty (chained to ``cause``, this rank's own error, if any)."""
    if messages:
        msg = f"{what}: " + "; ".join(messages) + " (every rank stops with this error)"
        raise DistributedInputError(msg) from cause
