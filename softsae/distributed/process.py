"""Process-group setup for softsae on torch.distributed: torchrun environment, backend choice, timeouts.

    ctx = init_from_env()                 # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    start, stop = shard_range(n, ctx.rank, ctx.world_size)   # this rank's latents [start, stop)

Backend: ``nccl`` when CUDA is available (one GPU per process, ``LOCAL_RANK`` selects it),
``gloo`` otherwise. Every collective gets a timeout (default 300 s, ``SOFTSAE_DIST_TIMEOUT``
seconds), so a rank that dies or stops calling collectives makes the others fail with an error
instead of hanging forever; the bad-data check in ``softsae.distributed.stats`` makes every rank
raise the same error before that can happen.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistContext:
    """What one process needs to know about the job: its rank, the world size, its device, the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes checkpoints and metrics)."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set; launch with torchrun "
                               f"(or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT yourself)")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {value!r}") from None


def default_timeout() -> timedelta:
    """The collective timeout: ``SOFTSAE_DIST_TIMEOUT`` seconds if set (> 0), else 300 s."""
    raw = os.environ.get("SOFTSAE_DIST_TIMEOUT")
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"SOFTSAE_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"SOFTSAE_DIST_TIMEOUT must be > 0 seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def choose_backend(device: torch.device | str | None = None) -> str:
    """``nccl`` for CUDA devices (or when CUDA is available and no device is given), else ``gloo``."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not dist.is_nccl_available():
        raise RuntimeError("CUDA device requested but this torch build has no NCCL; use a CPU device (gloo)")
    if not use_cuda and not dist.is_gloo_available():
        raise RuntimeError("this torch build has no gloo backend; CPU process groups are unavailable")
    return "nccl" if use_cuda else "gloo"


def init_from_env(backend: str | None = None, timeout: timedelta | float | None = None,
                  device: torch.device | str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (``nccl`` if CUDA is available, else ``gloo``).
        timeout: per-collective timeout (timedelta or seconds); None: :func:`default_timeout`.
        device: this process's device; None: ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.

    Returns the :class:`DistContext`. Already initialised: returns the context of the existing group.
    """
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    backend = backend or choose_backend(device)
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if isinstance(timeout, (int, float)):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        timeout = timedelta(seconds=float(timeout))
    timeout = timeout or default_timeout()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def shutdown() -> None:
    """Leave the default process group cleanly (no-op without one): a barrier, then
    ``destroy_process_group``; without the barrier a rank that finishes first tears its connections
    down while a peer's gloo threads use them, and the peer can die with SIGABRT."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # pending Work objects held only by reference cycles finish while the group is whole
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
            gc.collect()  # and a group object held by a cycle dies now, not during interpreter teardown


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``n`` items split over ``world_size`` ranks as ``torch.tensor_split`` does
    (the first ``n % world_size`` ranks get one more). Uneven splits are allowed."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    q, r = divmod(n, world_size)
    return [q + (1 if i < r else 0) for i in range(world_size)]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s slice of ``n`` items (see :func:`shard_sizes`)."""
    sizes = shard_sizes(n, world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def group_rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) within ``group`` (None: the default group); raises if not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call softsae.distributed.init_from_env() "
                           "(or torch.distributed.init_process_group) first")
    return dist.get_rank(group), dist.get_world_size(group)
