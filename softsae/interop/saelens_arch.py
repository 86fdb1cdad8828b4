"""The ``softsae`` architecture for SAELens: ``SAE.load_from_disk(DIR)`` on a directory written by
``softsae export --format saelens`` of a SoftSAE returns a ``SoftSAELensSAE`` whose ``encode`` /
``decode`` equal softsae's (hard top floor(k_hat) per input, ties to the lower index).

This module imports sae_lens; ``register()`` is idempotent. Nothing here is imported by ``import softsae``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn

from softsae.interop._common import SAELENS_ARCHITECTURE as ARCHITECTURE
from softsae.ops.topk_per_row import topk_per_row


@dataclass
class SoftSAELensConfig(SAEConfig):
    """SAELens config of a SoftSAE: target mean budget ``k``, head range ``k_max``, soft top-k ``alpha``."""

    k: float = 32.0
    k_max: float = 64.0
    alpha: float = 1e-4

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class SoftSAELensSAE(SAE[SoftSAELensConfig]):
    """Inference-only SoftSAE inside SAELens.

    ``k_hat(x) = clamp(k_max * sigmoid(head(sae_in)), 1, d_sae)`` with ``head`` = Linear(d_in, d_sae),
    ReLU, Linear(d_sae, 1) (``k_estimator``) applied to ``x - b_dec``; ``encode`` keeps the
    floor(k_hat) largest post-ReLU pre-activations of each input.
    """

    b_enc: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        kw = {"dtype": self.dtype, "device": self.device}
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))
        self.k_estimator = nn.Sequential(nn.Linear(self.cfg.d_in, self.cfg.d_sae, **kw), nn.ReLU(),
                                         nn.Linear(self.cfg.d_sae, 1, **kw))

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        return sae_in if self.cfg.apply_b_dec_to_input else sae_in - self.b_dec

    def _k_hat(self, centered: torch.Tensor) -> torch.Tensor:
        logit = self.k_estimator(centered).squeeze(-1).float()
        return (self.cfg.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.cfg.d_sae))

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted budget k_hat, shape x.shape[:-1], float32."""
        return self._k_hat(self._centered(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (..., d_sae): the floor(k_hat) largest post-ReLU pre-activations of each input."""
        centered = self._centered(x)
        hidden_pre = self.hook_sae_acts_pre(centered @ self.W_enc + self.b_enc)
        k_hat = self._k_hat(centered)
        pre = torch.relu(hidden_pre)
        flat = pre.reshape(-1, self.cfg.d_sae)
        vals, idx = topk_per_row(flat, k_hat.reshape(-1))
        acts = torch.zeros(flat.shape[0], self.cfg.d_sae + 1, dtype=flat.dtype, device=flat.device)
        acts.scatter_(1, torch.where(idx >= 0, idx, self.cfg.d_sae), vals)
        return self.hook_sae_acts_post(acts[:, : self.cfg.d_sae].reshape(pre.shape))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction (..., d_in) = feature_acts @ W_dec + b_dec."""
        sae_out_pre = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)


def register() -> None:
    """Add ``softsae`` to SAELens' architecture registry (no-op if it is already there)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, SoftSAELensSAE, SoftSAELensConfig)
