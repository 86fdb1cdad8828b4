"""Loss terms of the SoftSAE recipe and dead-latent bookkeeping.

    L = recon(x, x_hat) + w_k * k_loss(k_hat, K) + a_aux * auxk_loss(...)

All inputs live in the model's normalised space; x, x_hat (B, d), pre (B, n), k_hat (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softsae.placement import LOCAL, Local


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over d, averaged over the batch (a scalar)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def k_loss(k_hat: Tensor, k_target: float, beta: float = 5.0, latents: Local = LOCAL) -> Tensor:
    """softplus(mean(k_hat) - K_target, beta): penalises a mean budget above K_target.

    The mean is the placement's (``latents.mean_rows``): over the global batch in data mode, where
    each rank's rows get the exact share 1/B_total of its gradient."""
    return F.softplus(latents.mean_rows(k_hat) - k_target, beta=beta)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)


def auxk_loss(pre: Tensor, residual: Tensor, dead: Tensor, W_dec: Tensor, k_aux: int,
              backend: str = "auto", latents: Local = LOCAL) -> Tensor:
    """AuxK loss (Gao et al. 2024): the top ``k_aux`` dead latents of each row regress the residual.

    Args:
        pre: post-ReLU encoder activations (B, n) (differentiable).
        residual: x - x_hat (B, d); detached here.
        dead: (n,) bool mask of dead latents.
        W_dec: decoder (n, d); the auxiliary reconstruction uses no bias.
        k_aux: latents per row (clipped to the number of dead latents); d // 2 in the recipe.
        latents: the placement (``softsae.placement``): with the dictionary sharded, ``pre``, ``dead``
            and ``W_dec`` are this rank's latents and the selection is global; with the rows sharded
            the means are over the global batch and the result is this rank's SHARE (the shares sum
            to the global loss).

    Returns ``||e - e_hat||^2 / ||e - mean(e)||^2`` (both batch means), 0 when nothing is dead.

    No host-device sync on CUDA: the top ``min(k_aux, n)`` of the dead-masked activations are
    taken with a static width and the non-dead picks padded out (idx -1), which selects the
    same latents as taking ``min(k_aux, n_dead)``. On CPU, where reading the dead set is free,
    nothing-dead returns early and the top-k runs over the dead columns alone.
    """
    e = residual.detach()
    picked = latents.dead_topk(pre, dead, k_aux) if k_aux > 0 else None
    if picked is None:
        return pre.sum() * 0.0
    e_hat = latents.decode(picked[0], picked[1], W_dec, None, backend)
    num, den = latents.aux_terms(e, e_hat)
    loss = torch.nan_to_num(num / den, nan=0.0, posinf=0.0, neginf=0.0)
    if dead.is_cuda and not latents.sharded_latents:  # the static-width selection ran with nothing dead
        loss = torch.where(dead.any(), loss, 0.0)
    return loss


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
