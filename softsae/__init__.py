"""softsae: adaptive sparse autoencoders with fused Soft Top-K and sparse-decode kernels.

    import softsae
    p = softsae.soft_topk(x, k, alpha)                 # differentiable per-row soft top-k
    z = softsae.soft_topk_gate(x, k, alpha)            # x * p, fused
    vals, idx = softsae.topk_per_row(z, k)             # hard top-k, per-row k, padded layout
    x_hat = softsae.sparse_decode(vals, idx, W_dec, b_dec)
    softsae.available_backends()
"""

from softsae._backends import available_backends
from softsae.ops.soft_topk import K_EPS, soft_topk, soft_topk_gate
from softsae.ops.sparse_decode import sparse_decode
from softsae.ops.topk_per_row import topk_per_row

__version__ = "0.1.0"

__all__ = [
    "K_EPS",
    "available_backends",
    "soft_topk",
    "soft_topk_gate",
    "sparse_decode",
    "topk_per_row",
]
# --- SAE models, trainer and tools (softsae/models.py and friends) ---
from softsae.checkpoint import load_sae as load_sae  # noqa: E402
from softsae.checkpoint import save_sae as save_sae  # noqa: E402
from softsae.interop import export_sae as export_sae  # noqa: E402
from softsae.interop._hook import install as _install_saelens_hook  # noqa: E402
from softsae.models import BatchTopKSAE as BatchTopKSAE  # noqa: E402
from softsae.models import SoftSAE as SoftSAE  # noqa: E402
from softsae.models import TopKSAE as TopKSAE  # noqa: E402
from softsae.synthetic import make_synthetic as make_synthetic  # noqa: E402
from softsae.trainer import TrainConfig as TrainConfig  # noqa: E402
from softsae.trainer import train as train  # noqa: E402

# SAELens' "softsae" architecture (softsae/interop): registered when, and only if, sae_lens is imported
_install_saelens_hook()
