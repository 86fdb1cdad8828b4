"""A dictionary-sharded SAE for training: each rank holds n/N latents of a SoftSAE / TopKSAE / BatchTopKSAE.

Layout (W ranks of one process group, rank r owning latents ``shard_range(n, r, W) = [lo, hi)``)::

    sharded (rows lo:hi)      W_enc, b_enc, W_dec, k_estimator.0.weight, k_estimator.0.bias
    sharded (columns lo:hi)   k_estimator.2.weight
    replicated                b_dec, k_estimator.2.bias, norm_shift, norm_scale, threshold

Parameter names and order are those of the one-process model (``softsae.models``), so a full
state dict (model, Adam state, dead-latent counters) is sliced into shards and gathered back by
name (:data:`SHARD_DIM`): checkpoints stay in the one-process format and load at any world size.

Forward (training only; rows are replicated, the batch is the same on every rank)::

    x_in  = copy_to_shards(x_n - b_dec)                        backward sums the ranks' gradients
    pre_r = relu(x_in @ W_enc_r.T + b_enc_r)                   (B, n_r)
    k_hat = k_max sigmoid(reduce_from_shards(relu(x_in @ W0_r.T + b0_r) @ W2_r.T) + b2)
    codes = sharded soft top-k gate (docs/math.md 1.7) | global per-row top-k | global BatchTopK
    x_hat = reduce_from_shards(codes_r @ W_dec_r) + b_dec      (B, d), replicated

The loss is computed identically on every rank (the Megatron convention of
``softsae.distributed.sharded_ops``): sharded parameters get their own gradient, replicated ones
their full gradient on every rank, so no gradient all-reduce is needed; only the global gradient
norm for clipping (:func:`clip_grad_norm_`) combines the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from softsae.distributed._comm import all_reduce_
from softsae.distributed.process import group_rank_world, shard_range, shard_sizes
from softsae.distributed.sharded_ops import (
    copy_to_shards,
    reduce_from_shards,
    sharded_batch_topk,
    sharded_decode,
    sharded_gate_k_direction,
    sharded_soft_topk,
    sharded_soft_topk_gate,
    sharded_topk_per_row,
)
from softsae.models import (
    BatchTopKSAE,
    Codes,
    SoftSAE,
    SparseAutoencoder,
    TopKSAE,
    build_model,
    normalize_rows_,
    project_row_grad_,
    straight_through,
)

__all__ = ["SHARD_DIM", "ShardedOutput", "ShardedSAE", "clip_grad_norm_", "gather_full", "shard_full",
           "sharded_auxk_loss"]

# Which axis of each named tensor is split over the ranks; every other tensor is replicated.
SHARD_DIM: dict[str, int] = {"W_dec": 0, "W_enc": 0, "b_enc": 0, "k_estimator.0.weight": 0,
                             "k_estimator.0.bias": 0, "k_estimator.2.weight": 1}


class _Linear(nn.Module):
    """``weight``/``bias`` holder with nn.Linear's parameter names (no initialisation, no RNG use)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class ShardedOutput:
    """One sharded forward: replicated ``x_hat`` (B, d) and ``k_hat`` (B,) or None; this rank's
    ``pre`` (B, n_r) and ``codes`` (local latent indices, ``Codes.n = n_r``)."""

    def __init__(self, x_hat: Tensor, pre: Tensor, codes: Codes, k_hat: Tensor | None) -> None:
        self.x_hat, self.pre, self.codes, self.k_hat = x_hat, pre, codes, k_hat


class ShardedSAE(nn.Module):
    """This rank's shard of a one-process SAE (built from the full ``model``, which is not kept).

    Args:
        model: the full SoftSAE / TopKSAE / BatchTopKSAE (identical on every rank).
        group: the tensor-parallel process group (None: the default group).

    Raises ValueError if the dictionary has fewer latents than the group has ranks.
    """

    def __init__(self, model: SparseAutoencoder, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(model, (SoftSAE, TopKSAE, BatchTopKSAE)):
            raise TypeError(f"model must be a SoftSAE, TopKSAE or BatchTopKSAE, got {type(model).__name__}")
        if isinstance(model, SoftSAE) and model.k_hidden != model.n:
            raise ValueError(f"dictionary mode shards the k head's hidden layer with the dictionary, so it needs "
                             f"k_hidden == n = {model.n}, got k_hidden={model.k_hidden}")
        rank, world = group_rank_world(group)
        if model.n < world:
            raise ValueError(f"dict_size ({model.n}) must be >= the number of ranks ({world}) to shard the dictionary")
        self.group, self.rank, self.world = group, rank, world
        self.full_config = model.config()
        self.arch, self.d, self.n, self.k = model.arch, model.d, model.n, model.k
        self.backend, self.decode_mode = model.backend, model.decode_mode
        self.lo, self.hi = shard_range(model.n, rank, world)
        self.n_local = self.hi - self.lo
        self.hard = False
        local = shard_full(model.state_dict(), rank, world, model.n)
        self.W_dec = nn.Parameter(local["W_dec"])
        self.W_enc = nn.Parameter(local["W_enc"])
        self.b_enc = nn.Parameter(local["b_enc"])
        self.b_dec = nn.Parameter(local["b_dec"])
        self.register_buffer("norm_shift", local["norm_shift"])
        self.register_buffer("norm_scale", local["norm_scale"])
        if isinstance(model, SoftSAE):
            self.k_max, self.alpha, self.k_round = model.k_max, model.alpha, model.k_round
            self.alpha_relative = model.alpha_relative
            self.straight_through, self.hard_encoder_grad = False, True
            self.st_mode = model.st_mode
            self.k_estimator = nn.Sequential(
                _Linear(local["k_estimator.0.weight"], local["k_estimator.0.bias"]), nn.ReLU(),
                _Linear(local["k_estimator.2.weight"], local["k_estimator.2.bias"]))
        if isinstance(model, (TopKSAE, BatchTopKSAE)):
            self.k_train: int | None = None
        if isinstance(model, BatchTopKSAE):
            self.threshold_beta = model.threshold_beta
            self.register_buffer("threshold", local["threshold"])
        want = [name for name, _ in model.named_parameters()]
        got = [name for name, _ in self.named_parameters()]
        if got != want:  # checkpoints map the Adam state by parameter position
            raise RuntimeError(f"sharded parameters {got} do not follow the model's order {want}")

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The one-process ``state_dict`` gathered on rank 0 (None on the other ranks)."""
        return gather_full(self.state_dict(), self.n, self.group)

    def full_model(self) -> SparseAutoencoder | None:
        """The one-process model with these weights, on rank 0 (CPU, train mode); None elsewhere."""
        state = self.full_state_dict()
        if state is None:
            return None
        model = build_model(self.full_config)
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------ pieces
    @property
    def is_hard(self) -> bool:
        return self.hard or not self.training

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.norm_shift) / self.norm_scale

    def _use_sparse(self, hard: bool) -> bool:
        return self.decode_mode == "sparse" or (self.decode_mode == "auto" and hard)

    def k_hat_norm(self, x_in: Tensor) -> Tensor:
        """Predicted budget (B,) from ``x_in = copy_to_shards(x_n - b_dec)``; replicated."""
        h = F.relu(F.linear(x_in, self.k_estimator[0].weight, self.k_estimator[0].bias))
        part = reduce_from_shards(F.linear(h, self.k_estimator[2].weight), self.group)
        logit = (part + self.k_estimator[2].bias).squeeze(-1).float()
        return (self.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.n))

    def hard_k(self, k_hat: Tensor) -> Tensor:
        k = k_hat.detach()
        k = torch.floor(k + 0.5) if self.k_round == "round" else torch.floor(k)
        return k.clamp(1.0, float(self.n))

    def _hard_codes(self, pre: Tensor, k) -> Codes:
        vals, idx = sharded_topk_per_row(pre, k, self.group)
        codes = Codes(self.n_local, vals=vals, idx=idx)
        return codes if self._use_sparse(True) else Codes(self.n_local, dense=codes.to_dense())

    def _soft_dense(self, pre: Tensor, k_hat: Tensor) -> Tensor:
        if not self.alpha_relative:
            return sharded_soft_topk_gate(pre, k_hat, self.alpha, self.group)
        row_max = pre.detach().amax(-1, keepdim=True) if self.n_local else pre.new_zeros(pre.shape[0], 1)
        scale = all_reduce_(row_max.clone(), dist.ReduceOp.MAX, self.group).clamp_min(1e-12)
        return pre * sharded_soft_topk(pre / scale, k_hat, self.alpha, self.group)

    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Codes, Tensor | None]:
        """This rank's codes and the replicated k_hat (SoftSAE) or None, as the one-process ``select``."""
        if self.arch == "softsae":
            k_hat = self.k_hat_norm(x_in)
            if self.is_hard:
                src = pre if (self.hard_encoder_grad or not self.training) else pre.detach()
                return self._hard_codes(src, self.hard_k(k_hat)), k_hat
            if self.straight_through:  # as SoftSAE.select
                if self.st_mode == "k":  # k_hat's gradient: forward_train adds k_direction
                    return self._hard_codes(pre, self.hard_k(k_hat)), k_hat
                z_hard = self._hard_codes(pre, self.hard_k(k_hat)).to_dense()
                z = straight_through(z_hard, pre, k_hat, self._soft_dense)
                return Codes(self.n_local, dense=z), k_hat
            return Codes(self.n_local, dense=self._soft_dense(pre, k_hat), soft_pre=pre), k_hat
        if not self.training:
            raise RuntimeError("ShardedSAE is for training; evaluate the gathered model (full_model())")
        k = self.k_train if self.k_train is not None else self.k
        if self.arch == "topk":
            return self._hard_codes(pre, int(k)), None
        vals, idx, low = sharded_batch_topk(pre, int(k), self.group, split="latents", positive_only=True)
        self._update_threshold(low.to(self.threshold.dtype), ~torch.isnan(low))
        codes = Codes(self.n_local, vals=vals, idx=idx)
        return (codes if self._use_sparse(True) else Codes(self.n_local, dense=codes.to_dense())), None

    @torch.no_grad()
    def _update_threshold(self, batch_min: Tensor, valid: Tensor) -> None:
        ema = self.threshold * self.threshold_beta + (1 - self.threshold_beta) * batch_min
        new = torch.where(self.threshold < 0, batch_min, ema)
        self.threshold.copy_(torch.where(valid.to(new.device), new, self.threshold))

    def decode_codes(self, codes: Codes) -> Tensor:
        """Replicated reconstruction (B, d): the ranks' partial decodes summed, plus b_dec."""
        if codes.is_sparse:
            return sharded_decode(codes.vals.to(self.W_dec.dtype), codes.idx, self.W_dec, self.b_dec, self.group,
                                  backend=self.backend)
        return reduce_from_shards(F.linear(codes.dense, self.W_dec.t()), self.group) + self.b_dec

    def forward_train(self, x_n: Tensor) -> ShardedOutput:
        """Sharded pass in normalised space; x_n (B, d) identical on every rank."""
        x_in = copy_to_shards(x_n - self.b_dec, self.group)
        pre = F.relu(F.linear(x_in, self.W_enc, self.b_enc))
        codes, k_hat = self.select(pre, x_in)
        x_hat = self.decode_codes(codes)
        if self.arch == "softsae" and self.training and not self.hard and self.straight_through \
                and self.st_mode == "k":
            x_hat = x_hat + self.k_direction(pre, k_hat)
        return ShardedOutput(x_hat, pre, codes, k_hat)

    def k_direction(self, pre: Tensor, k_hat: Tensor) -> Tensor:
        """As ``SoftSAE.k_direction``, over the sharded dictionary (``sharded_gate_k_direction``)."""
        y, scale = pre.detach(), None
        if self.alpha_relative:
            row_max = y.amax(-1, keepdim=True) if self.n_local else y.new_zeros(y.shape[0], 1)
            scale = all_reduce_(row_max.clone(), dist.ReduceOp.MAX, self.group).clamp_min(1e-12)
            y = y / scale
        v = sharded_gate_k_direction(y, k_hat.detach(), self.alpha, self.W_dec, self.group, backend=self.backend)
        if scale is not None:
            v = v * scale.to(v.dtype)
        return (k_hat - k_hat.detach()).unsqueeze(-1).to(v.dtype) * v

    def global_l0(self, codes: Codes) -> Tensor:
        """Active latents per row over the whole dictionary, (B,) float64 (one all-reduce)."""
        return all_reduce_(codes.l0().to(torch.float64), group=self.group)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        normalize_rows_(self.W_dec)  # this rank's rows: the norm is per row, no collective

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        project_row_grad_(self.W_dec)

    def sharded_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(sharded, replicated) parameters."""
        sharded, replicated = [], []
        for name, p in self.named_parameters():
            (sharded if name in SHARD_DIM else replicated).append(p)
        return sharded, replicated


# ----------------------------------------------------------------------------- state (de)sharding


# State entries beyond the parameters: "<param>/<Adam moment>" follows its parameter; the dead-latent
# counters ("tracker") are per latent.
_LATENT_AXIS: dict[str, int] = {**SHARD_DIM, "tracker": 0}


def _shard_axis(name: str, t: Tensor, n: int) -> int | None:
    """The split axis of state entry ``name`` (a parameter, ``"<param>/exp_avg"`` or ``"tracker"``),
    None if replicated (0-d entries such as Adam's step always are)."""
    axis = _LATENT_AXIS.get(name.split("/")[0])
    return axis if axis is not None and t.dim() > axis else None


def shard_full(state: dict[str, Tensor], rank: int, world: int, n: int) -> dict[str, Tensor]:
    """Rank ``rank``'s slice of a full state dict (entries named as in :data:`SHARD_DIM` are cut along
    their axis; the rest are copied). Tensors are cloned, contiguous."""
    lo, hi = shard_range(n, rank, world)
    out = {}
    for name, t in state.items():
        axis = _shard_axis(name, t, n)
        if axis is not None and t.shape[axis] != n:
            raise ValueError(f"state entry {name!r} has {t.shape[axis]} latents on axis {axis}, expected {n}")
        out[name] = (t.narrow(axis, lo, hi - lo) if axis is not None else t).clone().contiguous()
    return out


def _gather_axis(t: Tensor, axis: int, n: int, group) -> Tensor | None:
    """Concatenate every rank's ``t`` along ``axis`` on rank 0 (uneven shards: padded to the largest)."""
    rank, world = group_rank_world(group)
    sizes = shard_sizes(n, world)
    m = max(sizes)
    moved = t.movedim(axis, 0)
    pad = moved.new_zeros((m, *moved.shape[1:]))
    pad[: moved.shape[0]] = moved
    if dist.get_backend(group) == "nccl":
        pad = pad.cuda()
    bufs = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
    dist.gather(pad, bufs, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if rank != 0:
        return None
    full = torch.cat([b[:s].cpu() for b, s in zip(bufs, sizes, strict=True)])
    return full.movedim(0, axis).contiguous()


def gather_full(state: dict[str, Tensor], n: int, group: dist.ProcessGroup | None = None
                ) -> dict[str, Tensor] | None:
    """Inverse of :func:`shard_full`: the full state on rank 0 (CPU tensors), None on the others.
    Collective: one gather per sharded entry, in the (identical) key order."""
    rank, _ = group_rank_world(group)
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        axis = _shard_axis(name, t, n)
        if axis is None:
            if rank == 0:
                out[name] = t.detach().cpu().clone()
            continue
        full = _gather_axis(t.detach(), axis, n, group)
        if rank == 0:
            out[name] = full
    return out if rank == 0 else None


# ----------------------------------------------------------------------------- losses and clipping


def sharded_auxk_loss(pre: Tensor, residual: Tensor, dead: Tensor, W_dec: Tensor, k_aux: int, n: int,
                      backend: str = "auto", group: dist.ProcessGroup | None = None) -> Tensor:
    """``softsae.losses.auxk_loss`` with the dictionary sharded: the top ``k_aux`` dead latents of each
    row over ALL shards regress the (replicated) residual.

    pre (B, n_r) and dead (n_r,) bool are this rank's latents, W_dec (n_r, d) its decoder rows,
    residual (B, d) replicated, n the global dictionary size. Returns the replicated scalar loss
    (0 when no latent is dead on any rank). Collectives: one all-reduce (dead count), the global
    top-k and the summed partial decode.
    """
    e = residual.detach()
    n_dead = all_reduce_(dead.sum().to(torch.float64).reshape(1), group=group)
    if k_aux <= 0 or float(n_dead) == 0:
        return pre.sum() * 0.0
    kk = min(int(k_aux), n)
    masked = pre.masked_fill(~dead[None, :], float("-inf"))
    vals, idx = sharded_topk_per_row(masked, kk, group)
    valid = (idx >= 0) & dead[idx.clamp(min=0)] if dead.numel() else idx >= 0
    vals, idx = torch.where(valid, vals, 0.0), torch.where(valid, idx, -1)
    e_hat = sharded_decode(vals, idx, W_dec, None, group, backend=backend)
    num = (e - e_hat).pow(2).sum(-1).mean()
    den = (e - e.mean(0)).pow(2).sum(-1).mean()
    return torch.nan_to_num(num / den, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def clip_grad_norm_(model: ShardedSAE, max_norm: float) -> Tensor:
    """Clip every gradient by the GLOBAL norm (sharded parameters summed over the ranks, replicated ones
    counted once), as ``torch.nn.utils.clip_grad_norm_`` on the one-process model. Returns the norm."""
    sharded, replicated = model.sharded_parameters()
    dev = model.W_dec.device
    sq = torch.zeros(1, dtype=torch.float32, device=dev)
    for p in sharded:
        if p.grad is not None:
            sq += p.grad.detach().float().pow(2).sum()
    all_reduce_(sq, group=model.group)
    for p in replicated:
        if p.grad is not None:
            sq += p.grad.detach().float().pow(2).sum()
    total = sq.sqrt()[0]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in sharded + replicated:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total
