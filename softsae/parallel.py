"""Parallel strategies of the training loop: one process, data parallel, dictionary parallel.

``softsae.trainer.train`` runs one loop and asks its strategy (``strategy_for(c.parallel)``) for every
step that depends on the mode; :class:`SingleProcess` does nothing beyond the plain step.

- ``data`` (:class:`DataParallel`, torchrun): every rank holds the full model and its rows of the
  global batch (``batch_size`` is global; all ranks draw the same global batch from one shared
  sampling stream and keep ``shard_range(B, rank, W)``). The training forward and loss run as the
  forward of a ``torch.nn.parallel.DistributedDataParallel`` module. Gradient convention: SUM. Each
  rank's loss is its share of the global loss (per-row terms over the GLOBAL row count; the k-loss on
  the global mean, whose gradient reaches each rank's rows with 1/B_total), so the SUM of the ranks'
  gradients is exactly dL/dtheta: DDP's average is replaced by a summing comm hook. Buffers
  (normalisation, BatchTopK's threshold) are computed identically on every rank from global
  statistics, so DDP's per-step buffer broadcast is off (rank 0's are broadcast once at the start).
- ``dictionary`` (:class:`DictionaryParallel`, torchrun): each rank holds n/W latents
  (``softsae.distributed.placement.shard_model_``); every rank draws the same global batch. Adam runs on
  each shard; checkpoints and the final model are gathered on rank 0 in the one-process format.

Both: loading, the activation dim and every batch are checked collectively, so bad data on one rank
makes every rank raise the same ``DistributedInputError``; every rank must resume from the same
checkpoint. Checkpoints are full and load at any world size in any mode.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from softsae.checkpoint import load_trainer_state
from softsae.data import check_finite_batch, load_activations
from softsae.distributed._comm import all_reduce_, comm_device
from softsae.distributed.agreement import agree_on_run
from softsae.distributed.launch import join_and_load
from softsae.distributed.placement import ShardedRows, shard_model_
from softsae.distributed.process import group_rank_world, shard_range
from softsae.distributed.state import flat_optimizer, gather_full, shard_full, unflat_optimizer
from softsae.distributed.stats import check_batch
from softsae.losses import DeadLatentTracker
from softsae.models import SparseAutoencoder, build_model
from softsae.placement import LOCAL

__all__ = ["DataParallel", "DictionaryParallel", "SingleProcess", "strategy_for"]


class SingleProcess:
    """One process: the model is its own training forward; nothing is gathered, sliced or agreed."""

    is_main = True

    def start(self, data, config):
        """(activation source, config resolved against its dim, device set)."""
        source = load_activations(data)
        return source, config.resolved(source.d)

    def read_state(self, c, path: Path | None) -> dict | None:
        """The trainer state at ``path`` (None: a new run); ValueError naming the file if it is unusable.
        Distributed: read on every rank, which must agree on it and on the settings (one error everywhere)."""
        return load_trainer_state(path) if path is not None else None

    def check_first(self, x: Tensor, source) -> None:
        """NaN/inf in the first batch (b_dec's initialisation)."""
        check_finite_batch(x, getattr(source, "name", "data"))

    def batch(self, x: Tensor, source, step: int, device: torch.device, log_every: int) -> Tensor:
        """This rank's rows of step ``step``'s global batch ``x`` on ``device``, checked: one process reads
        a CUDA batch's NaN check back only on logged steps."""
        x = x.to(device, non_blocking=True)
        if device.type == "cpu" or step % log_every == 0:
            check_finite_batch(x, getattr(source, "name", "data"))
        return x

    def place(self, model: SparseAutoencoder, train_forward: nn.Module) -> nn.Module:
        """Distribute ``model`` (in place) and return the module whose forward is the training forward."""
        return train_forward

    def any_rank(self, flag: bool) -> bool:
        return flag

    def full_state(self, model: SparseAutoencoder, opt: torch.optim.Optimizer, tracker: DeadLatentTracker
                   ) -> tuple[dict, dict, dict] | None:
        """(model, optimizer, tracker) state dicts in the one-process format on the main rank; collective."""
        return model.state_dict(), opt.state_dict(), tracker.state_dict()

    def load_state(self, state: dict, model: SparseAutoencoder, opt: torch.optim.Optimizer,
                   tracker: DeadLatentTracker) -> None:
        """Load a full trainer state's optimizer and counters (the weights were loaded before ``place``)."""
        opt.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])

    def finish(self, model: SparseAutoencoder) -> SparseAutoencoder | None:
        """The one-process model after training (None on ranks that do not hold it)."""
        model.latents = LOCAL
        return model

    def close(self) -> None:
        """Release what ``place`` set up (also after an error)."""


class _Distributed(SingleProcess):
    """What data and dictionary mode share: the agreed start, checks and resume."""

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:  # type: ignore[override]
        return group_rank_world(self.group)[0] == 0

    def start(self, data, config):
        return join_and_load(data, config)  # one agreed outcome on every rank

    def read_state(self, c, path: Path | None) -> dict | None:
        return agree_on_run(c, path, f"parallel={c.parallel!r} training")

    def check_first(self, x: Tensor, source) -> None:
        check_batch(x, source.d, self.group, what="activations (first batch)")

    def batch(self, x: Tensor, source, step: int, device: torch.device, log_every: int) -> Tensor:
        check_batch(x, source.d, self.group, what=f"activations (step {step})")  # the same error on every rank
        return self.local_rows(x).to(device, non_blocking=True)

    def local_rows(self, x: Tensor) -> Tensor:
        return x

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=comm_device(self.group))
        return bool(all_reduce_(t, dist.ReduceOp.MAX, self.group).item())


def _sum_hook(group, bucket):  # no annotations: DDP checks them and this module's are strings
    """DDP comm hook: SUM (not average) the bucket (``dist.GradBucket``) over the ranks of ``group``
    (see the module doc); returns the future of the reduced flat buffer."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DataParallel(_Distributed):
    """Rows of the global batch split over the ranks; the training forward runs under DDP."""

    def __init__(self) -> None:
        super().__init__()
        self.ddp: nn.Module | None = None

    def start(self, data, config):
        source, c = super().start(data, config)
        _, world = group_rank_world(self.group)
        if c.batch_size < world:
            raise ValueError(f"batch_size ({c.batch_size}) is the global batch and must be >= the world size "
                             f"({world})")
        return source, c

    def local_rows(self, x: Tensor) -> Tensor:
        lo, hi = shard_range(x.shape[0], *group_rank_world(self.group))
        return x[lo:hi]

    def place(self, model: SparseAutoencoder, train_forward: nn.Module) -> nn.Module:
        model.latents = ShardedRows(self.group)
        dev = next(model.parameters()).device
        ddp = nn.parallel.DistributedDataParallel
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"  # (torch < 2.14)
        self.ddp = ddp(train_forward, device_ids=[dev.index] if dev.type == "cuda" else None, process_group=self.group,
                       find_unused_parameters=model.arch == "softsae",  # the k head drops out in the hard phase
                       gradient_as_bucket_view=True, **{no_sync: False})  # no copies between grads and buckets
        self.ddp.register_comm_hook(self.group, _sum_hook)
        return self.ddp

    def close(self) -> None:
        self.ddp = None  # the returned model must not start collectives on a later backward


class DictionaryParallel(_Distributed):
    """The dictionary split over the ranks (``softsae.distributed.placement.ShardedLatents``)."""

    def place(self, model: SparseAutoencoder, train_forward: nn.Module) -> nn.Module:
        shard_model_(model, self.group)
        return train_forward

    def _names(self, model: SparseAutoencoder) -> list[str]:
        return [name for name, _ in model.named_parameters()]

    def full_state(self, model, opt, tracker):
        names = self._names(model)
        opt_state = opt.state_dict()
        weights = gather_full(model.state_dict(), model.n, self.group)
        moments = gather_full(flat_optimizer(opt_state, names), model.n, self.group)
        counters = gather_full({"tracker": tracker.tokens_since_fired}, model.n, self.group)
        if weights is None:
            return None
        return (weights, unflat_optimizer(moments, names, opt_state["param_groups"]),
                {"threshold": tracker.threshold, "tokens_since_fired": counters["tracker"]})

    def load_state(self, state, model, opt, tracker) -> None:
        names, (rank, world) = self._names(model), group_rank_world(self.group)
        local = shard_full(flat_optimizer(state["optimizer"], names), rank, world, model.n)
        opt.load_state_dict(unflat_optimizer(local, names, state["optimizer"]["param_groups"]))
        counters = shard_full({"tracker": state["tracker"]["tokens_since_fired"]}, rank, world, model.n)
        tracker.load_state_dict({"threshold": state["tracker"]["threshold"], "tokens_since_fired": counters["tracker"]})

    def finish(self, model: SparseAutoencoder) -> SparseAutoencoder | None:
        weights = gather_full(model.state_dict(), model.n, self.group)
        if weights is None:
            return None
        full = build_model(model.config())
        full.load_state_dict(weights)
        full.train(model.training)
        return full


def strategy_for(parallel: str) -> SingleProcess:
    """The strategy of ``TrainConfig.parallel``: "none", "data" or "dictionary"."""
    strategies = {"none": SingleProcess, "data": DataParallel, "dictionary": DictionaryParallel}
    if parallel not in strategies:
        raise ValueError(f"parallel must be one of {tuple(strategies)}, got {parallel!r}")
    return strategies[parallel]()

