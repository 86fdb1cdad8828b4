"""Start of a distributed training run: join the torchrun group, then load the data on every rank with
one agreed outcome.

    source, c = join_and_load(data, config)   # c = config.resolved(source.d), c.device = this rank's device

A rank that cannot load its activations (missing file, NaN rows, ...) or whose activation dim differs
from rank 0's makes EVERY rank raise the same :class:`~softsae.distributed.DistributedInputError`
naming it, instead of failing alone while the others wait in their first collective.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from softsae.data import load_activations
from softsae.distributed._comm import raise_everywhere
from softsae.distributed.process import group_rank_world, init_from_env

__all__ = ["join", "join_and_load"]


def join(device: torch.device, what: str) -> torch.device:
    """Join (or reuse) the default process group; a bare ``cuda`` device becomes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        init_from_env(device=device)
    return device


def agree(error: BaseException | None, d: int | None, what: str) -> None:
    """One all-gather of every rank's (error, d): any error, or a d other than rank 0's, raises the same
    DistributedInputError on every rank (chained to this rank's own error)."""
    _, world = group_rank_world(None)
    table: list = [None] * world
    dist.all_gather_object(table, (None if error is None else f"{type(error).__name__}: {error}", d))
    msgs = [f"rank {r}: {e}" for r, (e, _) in enumerate(table) if e is not None]
    d0 = table[0][1]
    msgs += [f"rank {r} has activation dim {dr}, rank 0 has {d0}" for r, (e, dr) in enumerate(table)
             if e is None and d0 is not None and dr != d0]
    raise_everywhere(msgs, what, cause=error)


def join_and_load(data, config):
    """Join the group, then ``load_activations(data)`` and ``config.resolved(d)`` on every rank, agreed
    (see the module doc). Returns (source, resolved config with this rank's device)."""
    want = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = join(torch.device(want), f"parallel={config.parallel!r}")
    error, source, c = None, None, None
    try:
        source = load_activations(data)
        c = dataclasses.replace(config.resolved(source.d), device=str(device))
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree()
        error = e
    agree(error, source.d if source is not None and error is None else None,
          f"parallel={config.parallel!r} training cannot start")
    return source, c
