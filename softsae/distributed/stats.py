"""Collective checks and bookkeeping over the ranks' rows (identical results on every rank):

    fired, tokens = merge_fired(fired_r, n_tokens_r)  # dead-latent counters of data-parallel ranks
    check_batch(x_r, d)                               # bad data on any rank -> the same error on every rank

The data-mode batch statistics of the models (BatchTopK's global selection, the global mean of
k_hat, aux-k's means) are methods of ``softsae.distributed.placement.ShardedRows``; normalisation
and b_dec's geometric median use the global batch, which every rank draws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed._comm import all_gather_stack, all_reduce_, comm_device, raise_everywhere
from softsae.distributed.process import group_rank_world

__all__ = ["check_batch", "merge_fired"]


def merge_fired(fired: Tensor, n_tokens: int, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """Merge dead-latent bookkeeping of data-parallel ranks (full dictionary on every rank).

    fired: (n,) bool, latents non-zero for some of this rank's ``n_tokens`` rows. Returns
    (fired on ANY rank (n,) bool, total tokens over all ranks): feed them to
    ``DeadLatentTracker.update`` on every rank and the trackers stay identical. One all-reduce of
    (n + 1,). With a dictionary-sharded model each rank tracks its own latents: only the token
    count (identical rows) is needed, no merge.
    """
    if not isinstance(fired, Tensor) or fired.dim() != 1 or fired.dtype != torch.bool:
        raise ValueError(f"fired must be a 1-D bool tensor, got {fired!r:.60}")
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    group_rank_world(group)
    buf = torch.cat([fired.to(torch.float64), fired.new_tensor([n_tokens], dtype=torch.float64)])
    table = all_gather_stack(torch.tensor(float(fired.numel()), dtype=torch.float64, device=fired.device), group)
    raise_everywhere([f"rank {r} tracks {int(v)} latents, rank 0 {int(table[0])}"
                      for r, v in enumerate(table.tolist()) if v != table[0]], "merge_fired")
    all_reduce_(buf, group=group)
    return buf[:-1] > 0, int(buf[-1])


def check_batch(x, d: int | None = None, group: dist.ProcessGroup | None = None, what: str = "batch") -> None:
    """Collective sanity check of every rank's batch; raises the same error on every rank.

    A rank whose ``x`` is not a 2-D float tensor, has ``x.shape[1] != d`` (when ``d`` is given, else
    differs from rank 0's width), or holds NaN/inf makes EVERY rank raise
    :class:`~softsae.distributed.DistributedInputError` naming the rank(s), the problem and the
    first bad row, instead of one rank failing while the others hang in the next collective.
    Cost: one all-gather of (W, 5) float64 (and an isfinite pass over x).
    """
    group_rank_world(group)
    dev = x.device if isinstance(x, Tensor) and dist.get_backend(group) != "nccl" else comm_device(group)
    # [kind (0 ok, 1 not 2-D float), rows, cols, non-finite count, first bad row]
    meta = torch.tensor([0.0, -1.0, -1.0, 0.0, -1.0], dtype=torch.float64)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        meta[0] = 1
        if isinstance(x, Tensor):
            meta[1] = x.shape[0] if x.dim() else -1
            meta[2] = x.shape[-1] if x.dim() else -1
    else:
        meta[1], meta[2] = x.shape
        bad = ~torch.isfinite(x.detach())
        meta[3] = float(bad.sum())
        if meta[3] > 0:
            meta[4] = float(bad.any(dim=1).nonzero()[0, 0])
    table = all_gather_stack(meta.to(dev), group).cpu()
    want = d if d is not None else next((int(r[2]) for r in table if r[0] == 0), None)  # the first valid rank
    msgs = []
    for r, (kind, rows, cols, nonfinite, first) in enumerate(table.tolist()):
        if kind == 1:
            shape = "" if rows < 0 and cols < 0 else f" (shape (..., {int(cols)}))"
            msgs.append(f"rank {r} got no 2-D float tensor{shape}")
        elif want is not None and int(cols) != want:
            msgs.append(f"rank {r} has {int(cols)} columns, expected {want}")
        if nonfinite > 0:
            msgs.append(f"rank {r} has {int(nonfinite)} NaN/inf values (first in row {int(first)})")
    raise_everywhere(msgs, f"bad {what}")
