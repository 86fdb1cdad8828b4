"""Loss terms of the SoftSAE recipe and dead-latent bookkeeping.

    L = recon(x, x_hat) + w_k * k_loss(k_hat, K) + a_aux * auxk_loss(...)

All inputs live in the model's normalised space; x, x_hat (B, d), pre (B, n), k_hat (B,).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from softsae.ops.sparse_decode import sparse_decode


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over d, averaged over the batch (a scalar)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def k_loss(k_hat: Tensor, k_target: float, beta: float = 5.0, group: dist.ProcessGroup | None = None) -> Tensor:
    """softplus(mean(k_hat) - K_target, beta): penalises a mean budget above K_target.

    ``group`` (data parallel): the mean is over all ranks' rows (``softsae.distributed.global_mean``;
    its backward sums the upstream gradients over the ranks, see softsae.distributed.data_parallel)."""
    if group is None:
        return F.softplus(k_hat.mean() - k_target, beta=beta)
    from softsae.distributed.stats import global_mean

    return F.softplus(global_mean(k_hat, group) - k_target, beta=beta)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)


def auxk_loss(pre: Tensor, residual: Tensor, dead: Tensor, W_dec: Tensor, k_aux: int,
              backend: str = "auto", group: dist.ProcessGroup | None = None) -> Tensor:
    """AuxK loss (Gao et al. 2024): the top ``k_aux`` dead latents of each row regress the residual.

    Args:
        pre: post-ReLU encoder activations (B, n) (differentiable).
        residual: x - x_hat (B, d); detached here.
        dead: (n,) bool mask of dead latents.
        W_dec: decoder (n, d); the auxiliary reconstruction uses no bias.
        k_aux: latents per row (clipped to the number of dead latents); d // 2 in the recipe.

    Returns ``||e - e_hat||^2 / ||e - mean(e)||^2`` (both batch means), 0 when nothing is dead.

    ``group`` (data parallel, ``dead`` identical on every rank): the means are over all ranks' rows
    and the result is this rank's SHARE (its rows' numerator over the global row count, divided by the
    global denominator): the shares sum to the global loss. Two all-reduces ((d + 1,) and (1,)).

    No host-device sync on CUDA: the top ``min(k_aux, n)`` of the dead-masked activations are
    taken with a static width and the non-dead picks padded out (idx -1), which selects the
    same latents as taking ``min(k_aux, n_dead)``. On CPU, where reading the dead set is free,
    nothing-dead returns early and the top-k runs over the dead columns alone.
    """
    e = residual.detach()
    if k_aux <= 0 or (not dead.is_cuda and not bool(dead.any())):
        return pre.sum() * 0.0
    if dead.is_cuda:
        kk = min(int(k_aux), dead.shape[0])
        masked = pre.masked_fill(~dead[None, :], float("-inf"))
        vals, idx = torch.topk(masked, kk, dim=-1, sorted=False)
        valid = dead[idx]
        vals, idx = torch.where(valid, vals, 0.0), torch.where(valid, idx, -1)
    else:  # the dead columns only: a top-k over (B, n_dead), not a masked copy of (B, n)
        cols = dead.nonzero().squeeze(1)
        vals, j = torch.topk(pre.index_select(1, cols), min(int(k_aux), cols.numel()), dim=-1, sorted=False)
        idx = cols[j]
    e_hat = sparse_decode(vals, idx, W_dec, None, backend=backend)
    if group is None:
        num = (e - e_hat).pow(2).sum(-1).mean()
        den = (e - e.mean(0)).pow(2).sum(-1).mean()
    else:
        buf = torch.cat([e.to(torch.float64).sum(0), e.new_tensor([e.shape[0]], dtype=torch.float64)])
        dist.all_reduce(buf, group=group)
        rows = buf[-1]
        sq = (e - (buf[:-1] / rows).to(e.dtype)).pow(2).sum().to(torch.float64).reshape(1)
        dist.all_reduce(sq, group=group)
        num = (e - e_hat).pow(2).sum() / rows.to(e.dtype)
        den = (sq[0] / rows).to(e.dtype)
    loss = torch.nan_to_num(num / den, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(dead.any(), loss, 0.0)


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired; dead = count >= threshold."""

    def __init__(self, n: int, threshold: int, device: torch.device | str = "cpu") -> None:
        self.threshold = int(threshold)
        self.tokens_since_fired = torch.zeros(n, dtype=torch.int64, device=device)

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """fired: (n,) bool, latents that were non-zero for some of the ``n_tokens`` rows."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)  # not fired-indexing: no host sync on CUDA

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold

    def n_dead(self) -> int:
        return int(self.dead_mask().sum())

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "tokens_since_fired": self.tokens_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = int(state["threshold"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
