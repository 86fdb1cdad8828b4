"""Shared pieces of the foreign formats: folding softsae's input normalisation into weights and back.

softsae models carry ``x_n = (x - shift) / scale`` (``norm_shift`` (d,), ``norm_scale`` ()) and work
in normalised space. The foreign formats either have no such record or apply it differently, so an
export folds it into the weights, choosing one of two conventions (scalar scale c, shift s)::

    "latents"  (SAELens' fold_activation_norm_scaling_factor):  latents unchanged, decoder rows scaled
        W_enc' = W_enc / c    b_enc' = b_enc      W_dec' = c W_dec    b_dec' = c b_dec + s
    "decoder"  (dictionary_learning's scale_biases):  decoder rows unchanged, latents scaled by c
        W_enc' = W_enc        b_enc' = c b_enc    W_dec' = W_dec      b_dec' = c b_dec + s   thr' = c thr

Both give the same active latents and the same reconstruction in the original activation space
(x - b_dec' = c (x_n - b_dec), so every pre-activation is exactly c^p times softsae's). The exporters
record c; ``unfold`` inverts the fold with shift 0 (s is absorbed into b_dec), giving back a
softsae model with the original decoder rows and latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE

CONVENTIONS = ("latents", "decoder")


SAELENS_ARCHITECTURE = "softsae"  # the architecture name softsae registers with SAELens

@dataclass
class Params:
    """Plain SAE weights in softsae's orientation (float32, CPU).

    W_enc (n, d), b_enc (n,), W_dec (n, d), b_dec (d,); ``threshold`` is BatchTopK's inference
    threshold (a float, None for other archs); ``k_est`` holds the SoftSAE head
    {"0.weight" (n, d), "0.bias" (n,), "2.weight" (1, n), "2.bias" (1,)}.
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: float | None = None
    k_est: dict[str, Tensor] = field(default_factory=dict)


def _f32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def fold(model: SparseAutoencoder, convention: str) -> Params:
    """Weights of ``model`` with its normalisation folded in (see the module doc for the formulas)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if isinstance(model, SoftSAE) and model.k_hidden != model.n:
        raise ValueError(f"k_hidden={model.k_hidden}: the exported SoftSAE layouts have a k head of width "
                         f"d_sae = {model.n}; only a model with k_hidden == n can be exported")
    c = float(model.norm_scale)
    s = _f32(model.norm_shift)
    W_enc, b_enc, W_dec, b_dec = (_f32(t) for t in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    b_dec_f = c * b_dec + s
    thr = float(model.threshold) if isinstance(model, BatchTopKSAE) else None
    k_est: dict[str, Tensor] = {}
    if isinstance(model, SoftSAE):  # the head sees x_n - b_dec = (x - b_dec') / c in both conventions
        k_est = {k: _f32(v) for k, v in model.k_estimator.state_dict().items()}
        k_est["0.weight"] = k_est["0.weight"] / c
    if convention == "latents":
        return Params(W_enc / c, b_enc, W_dec * c, b_dec_f, thr, k_est)
    return Params(W_enc, b_enc * c, W_dec, b_dec_f, None if thr is None else thr * c, k_est)


def unfold(p: Params, scale: float, convention: str) -> Params:
    """Invert ``fold`` for a recorded scale (shift 0): the weights a softsae model with norm_scale=scale needs."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not (scale > 0 and torch.isfinite(torch.tensor(scale))):
        raise ValueError(f"normalisation scale must be finite and > 0, got {scale}")
    c = float(scale)
    k_est = dict(p.k_est)
    if k_est:
        k_est["0.weight"] = k_est["0.weight"] * c
    if convention == "latents":
        return Params(p.W_enc * c, p.b_enc, p.W_dec / c, p.b_dec / c, p.threshold, k_est)
    thr = None if p.threshold is None else p.threshold / c
    return Params(p.W_enc, p.b_enc / c, p.W_dec, p.b_dec / c, thr, k_est)


def build(arch: str, p: Params, k: float, scale: float = 1.0, k_max: float | None = None,
          alpha: float = 1e-4, backend: str = "auto") -> SparseAutoencoder:
    """A softsae model (eval mode) holding exactly the weights ``p`` and input scale ``scale``."""
    n, d = p.W_enc.shape
    for name, t, shape in (("W_dec", p.W_dec, (n, d)), ("b_enc", p.b_enc, (n,)), ("b_dec", p.b_dec, (d,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match W_enc {(n, d)}, got {tuple(t.shape)}")
    model: SparseAutoencoder
    if arch == "topk":
        model = TopKSAE(d, n, int(k), backend=backend)
    elif arch == "batchtopk":
        model = BatchTopKSAE(d, n, int(k), backend=backend)
        if p.threshold is not None:
            model.threshold.fill_(float(p.threshold))
    elif arch == "softsae":
        model = SoftSAE(d, n, k, k_max=k_max, alpha=alpha, backend=backend)
        missing = {"0.weight", "0.bias", "2.weight", "2.bias"} - set(p.k_est)
        if missing:
            raise ValueError(f"SoftSAE weights lack the k-estimator head entries {sorted(missing)}")
        model.k_estimator.load_state_dict({k_: v.float() for k_, v in p.k_est.items()})
    else:
        raise ValueError(f"unknown arch {arch!r}; expected softsae, topk or batchtopk")
    with torch.no_grad():
        model.W_enc.copy_(p.W_enc)
        model.b_enc.copy_(p.b_enc)
        model.W_dec.copy_(p.W_dec)
        model.b_dec.copy_(p.b_dec)
        model.set_normalization(None, scale)
    return model.eval()


def check_threshold(model: SparseAutoencoder, fmt: str) -> None:
    """A BatchTopK model must have an estimated threshold to be exported (its inference rule)."""
    if isinstance(model, BatchTopKSAE) and float(model.threshold) < 0:
        raise ValueError(f"cannot export this BatchTopK SAE to {fmt}: its inference threshold was never estimated "
                         "(threshold < 0; softsae then falls back to per-row top-k, which the format cannot express)")
