"""Full (one-process format) training state <-> this rank's dictionary shard, by name.

Sharded entries (:data:`SHARD_DIM`: parameter name -> latent axis) are cut with ``shard_range``;
``"<param>/<Adam moment>"`` entries follow their parameter, ``"tracker"`` (dead-latent counters) is
per latent; everything else (and 0-d entries such as Adam's step) is replicated. So checkpoints stay
in the one-process format and load at any world size and in any mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed.process import group_rank_world, shard_range, shard_sizes

__all__ = ["SHARD_DIM", "flat_optimizer", "gather_full", "shard_full", "unflat_optimizer"]

SHARD_DIM: dict[str, int] = {"W_dec": 0, "W_enc": 0, "b_enc": 0, "k_estimator.0.weight": 0,
                             "k_estimator.0.bias": 0, "k_estimator.2.weight": 1}
_LATENT_AXIS: dict[str, int] = {**SHARD_DIM, "tracker": 0}


def _shard_axis(name: str, t: Tensor) -> int | None:
    axis = _LATENT_AXIS.get(name.split("/")[0])
    return axis if axis is not None and t.dim() > axis else None


def shard_full(state: dict[str, Tensor], rank: int, world: int, n: int) -> dict[str, Tensor]:
    """Rank ``rank``'s slice of a full state dict (cloned, contiguous tensors)."""
    lo, hi = shard_range(n, rank, world)
    out = {}
    for name, t in state.items():
        axis = _shard_axis(name, t)
        if axis is not None and t.shape[axis] != n:
            raise ValueError(f"state entry {name!r} has {t.shape[axis]} latents on axis {axis}, expected {n}")
        out[name] = (t.narrow(axis, lo, hi - lo) if axis is not None else t).clone().contiguous()
    return out


def _gather_axis(t: Tensor, axis: int, n: int, group) -> Tensor | None:
    """Every rank's ``t`` concatenated along ``axis`` on rank 0 (uneven shards padded to the largest)."""
    rank, world = group_rank_world(group)
    sizes = shard_sizes(n, world)
    moved = t.movedim(axis, 0)
    pad = moved.new_zeros((max(sizes), *moved.shape[1:]))
    pad[: moved.shape[0]] = moved
    if dist.get_backend(group) == "nccl":
        pad = pad.cuda()
    bufs = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
    dist.gather(pad, bufs, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if rank != 0:
        return None
    return torch.cat([b[:s].cpu() for b, s in zip(bufs, sizes, strict=True)]).movedim(0, axis).contiguous()


def gather_full(state: dict[str, Tensor], n: int, group: dist.ProcessGroup | None = None
                ) -> dict[str, Tensor] | None:
    """Inverse of :func:`shard_full`: the full state on rank 0 (CPU tensors), None on the others.
    Collective: one gather per sharded entry, in the (identical) key order."""
    rank, _ = group_rank_world(group)
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        axis = _shard_axis(name, t)
        full = _gather_axis(t.detach(), axis, n, group) if axis is not None else t.detach().cpu().clone()
        if rank == 0:
            out[name] = full
    return out if rank == 0 else None


def flat_optimizer(opt_state: dict, names: list[str]) -> dict[str, Tensor]:
    """An optimizer state dict's per-parameter entries as ``{"<param name>/<key>": tensor}``."""
    return {f"{names[int(i)]}/{key}": v for i, st in opt_state["state"].items() for key, v in st.items()}


def unflat_optimizer(flat: dict[str, Tensor], names: list[str], param_groups: list[dict]) -> dict:
    """Inverse of :func:`flat_optimizer`."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in flat.items():
        pname, field = key.split("/", 1)
        state.setdefault(names.index(pname), {})[field] = v
    return {"state": state, "param_groups": param_groups}
