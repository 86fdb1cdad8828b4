"""softsae: adaptive sparse autoencoders with fused Soft Top-K and sparse-decode kernels.

    import softsae
    p = softsae.soft_topk(x, k, alpha)                 # differentiable per-row soft top-k
    z = softsae.soft_topk_gate(x, k, alpha)            # x * p, fused
    vals, idx = softsae.topk_per_row(z, k)             # hard top-k, per-row k, padded layout
    x_hat = softsae.sparse_decode(vals, idx, W_dec, b_dec)
    softsae.available_backends()

    sae = softsae.SoftSAE(d, n, k)                     # or TopKSAE / BatchTopKSAE
    result = softsae.train(acts, softsae.TrainConfig(arch="softsae", dict_size=n, k=k))
    softsae.save_sae(sae, "runs/x"); softsae.load_sae("runs/x"); softsae.export_sae(...)
"""

from softsae._backends import available_backends
from softsae.checkpoint import load_sae, save_sae
from softsae.interop import export_sae
from softsae.interop._hook import install as _install_saelens_hook
from softsae.models import BatchTopKSAE, SoftSAE, TopKSAE
from softsae.ops.soft_topk import K_EPS, S_MIN, soft_topk, soft_topk_gate
from softsae.ops.sparse_decode import sparse_decode
from softsae.ops.topk_per_row import topk_per_row
from softsae.synthetic import make_synthetic
from softsae.trainer import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "K_EPS",
    "S_MIN",
    "BatchTopKSAE",
    "SoftSAE",
    "TopKSAE",
    "TrainConfig",
    "available_backends",
    "export_sae",
    "load_sae",
    "make_synthetic",
    "save_sae",
    "soft_topk",
    "soft_topk_gate",
    "sparse_decode",
    "topk_per_row",
    "train",
]

# SAELens' "softsae" architecture (softsae/interop): registered when, and only if, sae_lens is imported.
_install_saelens_hook()
