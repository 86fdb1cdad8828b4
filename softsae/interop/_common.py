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

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import Tensor

from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE

CONVENTIONS = ("latents", "decoder")
_MISSING = object()
R = TypeVar("R")


# ----------------------------------------------------------------------------- checked reading


def checked_reader(read: Callable[..., R]) -> Callable[..., R]:
    """Decorate a reader ``read(path, ...)``: any failure on a malformed file becomes one ValueError that
    names ``path`` (a missing file stays FileNotFoundError), never a traceback from deep inside."""
    @functools.wraps(read)
    def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> R:
        try:
            return read(path, *args, **kwargs)
        except (FileNotFoundError, MemoryError):
            raise
        except ValueError as err:
            if str(path) in str(err):
                raise
            raise ValueError(f"{path}: {err}") from None
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, OverflowError, OSError,
                UnicodeDecodeError) as err:
            raise ValueError(f"{path}: malformed SAE files ({type(err).__name__}: {err})") from None
    return wrapper


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (ValueError naming ``path`` otherwise)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors as float32 where floating point, metadata) of a .safetensors file; ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file of any kind
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{path}: tensors {bad} are not floating point")
    return {k: v.to(torch.float32) for k, v in sd.items()}, meta


def mapping(obj: Any, key: str, where: str | Path) -> dict:
    """``obj[key]`` if it is a mapping, {} if it is absent or null; ValueError otherwise."""
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where}: {key} must be a JSON object, got {type(v).__name__}")
    return v


def number(obj: dict, key: str, where: str | Path, default: Any = _MISSING, integer: bool = False) -> Any:
    """A finite number (an int if ``integer``) stored under ``key``; ``default`` if absent (else an error)."""
    v = obj.get(key)
    if v is None:
        if default is _MISSING:
            raise ValueError(f"{where}: {key} is missing")
        return default
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key} must be a finite number, got {v!r}")
    if integer:
        if int(v) != v:
            raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
        return int(v)
    return float(v)


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
    if p.W_enc.dim() != 2 or min(p.W_enc.shape) < 1:
        raise ValueError(f"W_enc must be a non-empty 2-D matrix, got shape {tuple(p.W_enc.shape)}")
    n, d = p.W_enc.shape
    for name, t, shape in (("W_dec", p.W_dec, (n, d)), ("b_enc", p.b_enc, (n,)), ("b_dec", p.b_dec, (d,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match W_enc {(n, d)}, got {tuple(t.shape)}")
    for name, t in (("W_enc", p.W_enc), ("W_dec", p.W_dec), ("b_enc", p.b_enc), ("b_dec", p.b_dec),
                    *((f"k_estimator.{k_}", v) for k_, v in p.k_est.items())):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or inf values")
    for name, v in (("k", k), ("k_max", k_max), ("alpha", alpha), ("scale", scale), ("threshold", p.threshold)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
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
        head = {"0.weight": (n, d), "0.bias": (n,), "2.weight": (1, n), "2.bias": (1,)}
        for k_, shape in head.items():
            if tuple(p.k_est[k_].shape) != shape:
                raise ValueError(f"k_estimator.{k_} must have shape {shape}, got {tuple(p.k_est[k_].shape)}")
        if set(p.k_est) != set(head):
            raise ValueError(f"unexpected k-estimator entries {sorted(set(p.k_est) - set(head))}")
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
