"""The SoftSAE paper's reference state-dict format (read and write).

Reference format (dictionary_learning-style keys, as released with the SoftSAE paper)::

    encoder.weight (n, d), encoder.bias (n,), decoder.weight (d, n), b_dec (d,),
    k, alpha, k_max (scalars), norm_factor, shift_factor (scalar or (d,)),
    k_estimator.0.weight (n, d), k_estimator.0.bias (n,), k_estimator.2.weight (1, n), k_estimator.2.bias (1,)

with input normalisation ``x_n = (x - shift_factor) / norm_factor`` and output
``x_hat = x_hat_n * norm_factor + shift_factor`` (the dictionary_learning convention of dividing
activations by ``norm_factor``). Without ``k_estimator.*`` keys the dict is read as a TopK SAE
(or BatchTopK with ``arch="batchtopk"`` and a ``threshold`` key).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE

__all__ = ["from_reference_state_dict", "to_reference_state_dict"]


def _scalar(state: dict, key: str, default: float | None = None, source: str = "state dict") -> float | None:
    """The finite number stored under ``key`` (a one-element tensor or a number), or ``default`` if absent."""
    v = state.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise ValueError(f"{source}: {key} must be a number, got {type(v).__name__}")
    if isinstance(v, Tensor) and (v.numel() != 1 or v.is_complex()):
        raise ValueError(f"{source}: {key} must hold one number, got shape {tuple(v.shape)}")
    x = float(v.reshape(())) if isinstance(v, Tensor) else float(v)
    if not math.isfinite(x):
        raise ValueError(f"{source}: {key} must be finite, got {x}")
    return x


def _tensor(state: dict, key: str, shape: tuple[int, ...] | None, source: str) -> Tensor:
    """state[key] as float32: a finite floating-point tensor of exactly ``shape`` (any 2-D shape if None)."""
    v = state[key]
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise ValueError(f"{source}: {key} must be a floating-point tensor, got "
                         f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
    if (shape is None and (v.dim() != 2 or min(v.shape) < 1)) or (shape is not None and tuple(v.shape) != shape):
        raise ValueError(f"{source}: {key} must have shape {shape or '(n, d)'}, got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{source}: {key} holds NaN or inf values")
    return v.float()


def from_reference_state_dict(state: dict[str, Tensor], arch: str | None = None,
                              backend: str = "auto", source: str = "reference state dict") -> SparseAutoencoder:
    """Build an SAE from a reference-format state dict (see module doc); outputs match it exactly.
    Shapes must be exact and numbers finite; problems raise ValueError starting with ``source``."""
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    need = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{source}: not a reference SAE state dict: missing {missing} "
                         f"(has {sorted(map(str, state))[:12]})")
    W_enc = _tensor(state, "encoder.weight", None, source)
    n, d = W_enc.shape
    b_enc = _tensor(state, "encoder.bias", (n,), source)
    W_dec_t = _tensor(state, "decoder.weight", (d, n), source)
    b_dec = _tensor(state, "b_dec", (d,), source)
    k = _scalar(state, "k", source=source)
    if k is None:
        raise ValueError(f"{source}: reference state dict has no 'k'")
    if not 0 < k <= n:
        raise ValueError(f"{source}: k={k} must lie in (0, n={n}]")
    arch = arch or ("softsae" if "k_estimator.0.weight" in state else "topk")
    norm_factor = _scalar(state, "norm_factor", 1.0, source)
    if not norm_factor > 0:
        raise ValueError(f"{source}: norm_factor must be > 0, got {norm_factor}")
    shift = state.get("shift_factor")
    if shift is not None:
        shift = shift if isinstance(shift, Tensor) else torch.tensor(_scalar(state, "shift_factor", source=source))
        shift = _tensor({"shift_factor": shift.reshape(()) if shift.numel() == 1 else shift}, "shift_factor",
                        () if shift.numel() == 1 else (d,), source)
    model: SparseAutoencoder
    try:
        if arch == "softsae":
            if "k_estimator.0.weight" not in state:
                raise ValueError("a SoftSAE needs the k_estimator.* keys")
            head0 = _tensor(state, "k_estimator.0.weight", None, source)
            m = head0.shape[0]
            if head0.shape != (m, d) or m > n:
                raise ValueError(f"k_estimator.0.weight must have shape (m, d={d}) with m <= n={n}, "
                                 f"got {tuple(head0.shape)}")
            head = {"0.weight": head0, "0.bias": _tensor(state, "k_estimator.0.bias", (m,), source),
                    "2.weight": _tensor(state, "k_estimator.2.weight", (1, m), source),
                    "2.bias": _tensor(state, "k_estimator.2.bias", (1,), source)}
            alpha = abs(_scalar(state, "alpha", 1e-4, source))
            model = SoftSAE(d, n, k, k_max=_scalar(state, "k_max", source=source), alpha=alpha, backend=backend,
                            k_hidden=int(m))
            model.k_estimator.load_state_dict(head)
        elif arch in ("topk", "batchtopk"):
            if int(k) != k:
                raise ValueError(f"{arch} needs an integer k, got {k}")
            model = (TopKSAE if arch == "topk" else BatchTopKSAE)(d, n, int(k), backend=backend)
            if arch == "batchtopk" and "threshold" in state:
                model.threshold.fill_(_scalar(state, "threshold", source=source))
        else:
            raise ValueError(f"unknown arch {arch!r}")
    except KeyError as err:
        raise ValueError(f"{source}: missing {err}") from None
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec_t.t())
        model.b_dec.copy_(b_dec)
        shift_t = torch.zeros(d) if shift is None else shift.expand(d).clone()
        model.set_normalization(shift_t, norm_factor)
    return model.eval()


def to_reference_state_dict(model: SparseAutoencoder) -> dict[str, Tensor]:
    """Export to the reference key layout (inverse of ``from_reference_state_dict``)."""
    sd = {
        "encoder.weight": model.W_enc.detach().clone(),
        "encoder.bias": model.b_enc.detach().clone(),
        "decoder.weight": model.W_dec.detach().t().contiguous(),
        "b_dec": model.b_dec.detach().clone(),
        "k": torch.tensor(float(model.k)),
        "norm_factor": model.norm_scale.detach().clone(),
        "shift_factor": model.norm_shift.detach().clone(),
    }
    if isinstance(model, SoftSAE):
        if model.k_hidden != model.n:
            raise ValueError(f"k_hidden={model.k_hidden}: the reference layout has a k head of width n = "
                             f"{model.n}; only a model with k_hidden == n can be exported to it")
        sd["alpha"] = torch.tensor(model.alpha)
        sd["k_max"] = torch.tensor(model.k_max)
        for k, v in model.k_estimator.state_dict().items():
            sd[f"k_estimator.{k}"] = v.detach().clone()
    if isinstance(model, BatchTopKSAE):
        sd["threshold"] = model.threshold.detach().clone()
    return sd
