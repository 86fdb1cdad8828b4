"""The model placements over a process group (the interface is ``softsae.placement.Local``).

    shard_model_(model, group)           # dictionary mode: this rank keeps latents [lo, hi) (ShardedLatents)
    model.latents = ShardedRows(group)   # data mode: every rank the full model, its rows of the global batch

Dictionary layout (rank r owns latents ``shard_range(n, r, W)``): W_enc, b_enc, W_dec and the k head's
first layer sharded by rows, the head's output weight by columns (:data:`SHARD_DIM`); b_dec, the head's
output bias and the buffers replicated. Rows are replicated, the loss is computed identically on every
rank, so sharded parameters get their own gradient and replicated ones their full gradient on every
rank (``softsae.distributed.sharded_ops``); only the gradient norm for clipping combines the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from softsae.distributed import sharded_ops as so
from softsae.distributed._comm import all_reduce_, comm_device
from softsae.distributed.process import group_rank_world, shard_range
from softsae.distributed.state import SHARD_DIM, shard_full
from softsae.distributed.stats import merge_fired
from softsae.placement import LOCAL, Local, padded_to_dense

__all__ = ["ShardedLatents", "ShardedRows", "shard_model_"]


class ShardedLatents(Local):
    """The dictionary split over ``group``'s ranks (this rank: latents ``[lo, hi)`` of ``n``); rows replicated."""

    sharded_latents = True

    def __init__(self, group: dist.ProcessGroup | None, n: int) -> None:
        self.group, self.n = group, n
        self.rank, self.world = group_rank_world(group)
        self.lo, self.hi = shard_range(n, self.rank, self.world)

    def replicate(self, x: Tensor) -> Tensor:
        return so.copy_to_shards(x, self.group)

    def partial_sum(self, x: Tensor) -> Tensor:
        return so.reduce_from_shards(x, self.group)

    def count(self, t: Tensor) -> Tensor:
        return all_reduce_(t.clone(), group=self.group)

    def topk_per_row(self, pre: Tensor, k: Tensor | int, width: int | None = None) -> tuple[Tensor, Tensor]:
        return so.sharded_topk_per_row(pre, k, self.group)

    def soft_gate(self, pre: Tensor, k: Tensor, alpha: float, backend: str) -> Tensor:
        return so.sharded_soft_topk_gate(pre, k, alpha, self.group)

    def soft_gate_sparse(self, pre: Tensor, k: Tensor, alpha: float, backend: str) -> tuple[Tensor, Tensor]:
        return self.nonzero(self.soft_gate(pre, k, alpha, backend))

    def soft_topk(self, y: Tensor, k: Tensor, alpha: float, backend: str) -> Tensor:
        return so.sharded_soft_topk(y, k, alpha, self.group)

    def row_max(self, y: Tensor) -> Tensor:
        m = y.amax(-1, keepdim=True) if y.shape[1] else y.new_full((y.shape[0], 1), float("-inf"))
        return all_reduce_(m.clone(), dist.ReduceOp.MAX, self.group)

    def gate_k_direction(self, y: Tensor, k: Tensor, alpha: float, W: Tensor, backend: str) -> Tensor:
        return so.sharded_gate_k_direction(y, k, alpha, W, self.group, backend=backend)

    def batch_topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        _, idx, low = so.sharded_batch_topk(pre, k, self.group, split="latents", positive_only=True)
        return padded_to_dense(idx >= 0, idx, pre.shape[1]), low, ~torch.isnan(low)

    def dead_topk(self, pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor] | None:
        if float(self.count(dead.sum().to(torch.float64).reshape(1))) == 0:
            return None
        vals, idx = so.sharded_topk_per_row(pre.masked_fill(~dead[None, :], float("-inf")), min(k_aux, self.n),
                                         self.group)
        valid = (idx >= 0) & dead[idx.clamp(min=0)] if dead.numel() else idx >= 0
        return torch.where(valid, vals, 0.0), torch.where(valid, idx, -1)

    def decode(self, vals: Tensor, idx: Tensor, W: Tensor, b: Tensor | None, backend: str) -> Tensor:
        return so.sharded_decode(vals, idx, W, b, self.group, backend=backend)

    def decode_dense(self, z: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        out = self.partial_sum(z @ W)
        return out if b is None else out + b

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Global norm: sharded parameters' squares summed over the ranks, replicated ones counted once."""
        grads = [(name in SHARD_DIM, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float32, device=model.W_dec.device)
        for sharded, g in grads:
            if sharded:
                sq += g.detach().float().pow(2).sum()
        all_reduce_(sq, group=self.group)
        for sharded, g in grads:
            if not sharded:
                sq += g.detach().float().pow(2).sum()
        total = sq.sqrt()[0]
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            g.mul_(coef.to(g.dtype))
        return total


class ShardedRows(Local):
    """Data mode: every rank holds the whole dictionary and its rows of the global batch."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def batch_topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        _, idx, low = so.sharded_batch_topk(pre, k, self.group, split="rows", positive_only=True)
        return padded_to_dense(idx >= 0, idx, pre.shape[1]), low, ~torch.isnan(low)

    def total_rows(self, rows: int) -> int:
        t = torch.tensor([float(rows)], dtype=torch.float64, device=comm_device(self.group))
        return int(all_reduce_(t, group=self.group).item())

    def sum_rows(self, t: Tensor) -> Tensor:
        return all_reduce_(t.clone(), group=self.group)

    def mean_rows(self, t: Tensor) -> Tensor:
        """The global mean's value; the gradient of this rank's rows is 1/B_total each (no backward collective)."""
        buf = torch.stack([t.detach().double().sum(), torch.tensor(float(t.numel()), dtype=torch.float64,
                                                                   device=t.device)])
        all_reduce_(buf, group=self.group)
        share = t.sum() / buf[1].to(t.dtype)
        return share + ((buf[0] / buf[1]).to(t.dtype) - share).detach()

    def aux_terms(self, e: Tensor, e_hat: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of the numerator (its rows over B_total), the global denominator."""
        buf = torch.cat([e.to(torch.float64).sum(0), e.new_tensor([e.shape[0]], dtype=torch.float64)])
        all_reduce_(buf, group=self.group)
        rows = buf[-1]
        sq = (e - (buf[:-1] / rows).to(e.dtype)).pow(2).sum().to(torch.float64).reshape(1)
        all_reduce_(sq, group=self.group)
        return (e - e_hat).pow(2).sum() / rows.to(e.dtype), (sq[0] / rows).to(e.dtype)

    def merge_fired(self, fired: Tensor, rows: int) -> tuple[Tensor, int]:
        return merge_fired(fired, rows, self.group)


@torch.no_grad()
def shard_model_(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep this rank's latents of ``model`` (identical on every rank) in place and place it on the
    group's dictionary shards (a group of one rank: the whole model, placed locally). Raises ValueError
    if the dictionary has fewer latents than ranks, or the SoftSAE k head is narrower than the
    dictionary (its hidden layer is sharded with it)."""
    if getattr(model, "k_hidden", model.n) != model.n:
        raise ValueError(f"dictionary mode shards the k head's hidden layer with the dictionary, so it needs "
                         f"k_hidden == n = {model.n}, got k_hidden={model.k_hidden}")
    _, world = group_rank_world(group)
    if model.n < world:
        raise ValueError(f"dict_size ({model.n}) must be >= the number of ranks ({world}) to shard the dictionary")
    if world == 1:  # one rank holds the whole dictionary: the collectives are identities, so the local placement
        model.latents = LOCAL
        return model
    placement = ShardedLatents(group, model.n)
    local = shard_full({name: p.detach() for name, p in model.named_parameters()}, placement.rank, world, model.n)
    for name, p in model.named_parameters():
        if name in SHARD_DIM:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, nn.Parameter(local[name],
                                                                                       p.requires_grad))
    model.latents = placement
    return model
