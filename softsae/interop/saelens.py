"""SAELens format: ``DIR/cfg.json`` + ``DIR/sae_weights.safetensors`` (SAELens >= 6).

Weights (SAELens orientation): ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in),
``b_dec`` (d_in,); config: ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations`` and ``metadata``
(``model_name``, ``hook_name``, ``sae_lens_version``, ... and a ``softsae`` entry written by us).

Architectures:

- softsae ``topk``      -> SAELens ``topk`` (``k``; ``rescale_acts_by_decoder_norm`` false).
- softsae ``batchtopk`` -> SAELens ``jumprelu`` with every latent's ``threshold`` equal to softsae's
  inference threshold: this is the inference form SAELens itself saves a BatchTopK SAE in.
- softsae ``softsae``   -> ``softsae``, an architecture registered with SAELens by ``register()``
  (extra weights ``k_estimator.{0,2}.{weight,bias}``, config ``k``, ``k_max``, ``alpha``).

Normalisation: SAELens applies no affine input normalisation at inference, so softsae's
``(x - shift) / scale`` is folded into the weights with SAELens' own convention (latents unchanged,
``W_enc / scale``, ``W_dec * scale``, ``b_dec * scale + shift``; see ``softsae.interop._common``),
``normalize_activations`` is "none" and ``metadata.softsae.norm_scale`` records the scale so that
reading the directory back gives softsae's original weights (the shift stays folded into b_dec).

Importing needs no SAELens; ``register()`` (called by ``load_sae`` never, by ``import softsae``
only once ``sae_lens`` is imported: see ``softsae.interop._hook``) needs it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softsae.fileio import atomic_save_safetensors, atomic_write_json
from softsae.interop._common import (
    SAELENS_ARCHITECTURE,
    Params,
    build,
    check_threshold,
    checked_reader,
    fold,
    mapping,
    number,
    read_json_object,
    read_safetensors,
    unfold,
)
from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ARCHITECTURE = SAELENS_ARCHITECTURE  # the name softsae registers with SAELens
# SAELens reads configs without metadata.sae_lens_version >= 6 through its pre-6.0 converter.
FORMAT_VERSION = "6.0.0"


def _sae_lens_version() -> str:
    try:
        from importlib.metadata import version

        return version("sae-lens")
    except Exception:  # noqa: BLE001 - not installed: write the format version we follow
        return FORMAT_VERSION


def write(model: SparseAutoencoder, out: str | Path, model_name: str | None = None, hook_name: str | None = None,
          metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to directory ``out`` in SAELens' layout; returns ``out``."""
    check_threshold(model, "SAELens")
    out = Path(out)
    p = fold(model, "latents")
    n, d = p.W_enc.shape
    sd: dict[str, Tensor] = {"W_enc": p.W_enc.t().contiguous(), "b_enc": p.b_enc, "W_dec": p.W_dec.contiguous(),
                             "b_dec": p.b_dec}
    cfg: dict[str, Any] = {"d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                           "normalize_activations": "none", "reshape_activations": "none"}
    if isinstance(model, TopKSAE):
        cfg.update(architecture="topk", k=int(model.k), rescale_acts_by_decoder_norm=False)
    elif isinstance(model, BatchTopKSAE):
        cfg.update(architecture="jumprelu")
        sd["threshold"] = torch.full((n,), float(p.threshold))
    elif isinstance(model, SoftSAE):
        cfg.update(architecture=ARCHITECTURE, k=float(model.k), k_max=float(model.k_max), alpha=float(model.alpha))
        sd.update({f"k_estimator.{k}": v for k, v in p.k_est.items()})
    else:
        raise ValueError(f"cannot export arch {model.arch!r} to SAELens")
    meta = {"sae_lens_version": _sae_lens_version(), "model_name": model_name, "hook_name": hook_name,
            **(metadata or {}),
            "softsae": {"arch": model.arch, "k": float(model.k), "norm_scale": float(model.norm_scale),
                        "normalization": "folded into the weights (latents unchanged)"}}
    cfg["metadata"] = meta
    sd = {k: v.contiguous() for k, v in sd.items()}
    atomic_save_safetensors(sd, out / WEIGHTS)
    atomic_write_json(out / CFG, cfg)
    return out


def is_saelens_dir(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


@checked_reader
def read(path: str | Path, backend: str = "auto") -> SparseAutoencoder:
    """Read an SAELens directory (written by SAELens or by ``write``) as a softsae model.

    Supported: ``topk`` (also with ``rescale_acts_by_decoder_norm``, folded in), ``jumprelu`` with one
    threshold >= 0 shared by all latents (a saved BatchTopK SAE), ``softsae``; ``apply_b_dec_to_input``
    false is folded into ``b_enc``. Other architectures, per-input normalisations and malformed files
    raise ValueError naming the file.
    """
    path = Path(path)
    cfg = read_json_object(path / CFG)
    where = path / CFG
    sd, _ = read_safetensors(path / WEIGHTS)
    arch = cfg.get("architecture", "standard")
    meta = mapping(cfg, "metadata", where)
    mine = mapping(meta, "softsae", f"{where} metadata")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", None):  # the latter has no effect in SAELens' inference SAE
        raise ValueError(f"{path}: normalize_activations={norm!r} is a per-input normalisation softsae cannot express")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    need = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if [k for k in need if k not in sd]:
        raise ValueError(f"{path}: {WEIGHTS} lacks {[k for k in need if k not in sd]} (has {sorted(sd)})")
    if sd["W_enc"].dim() != 2:
        raise ValueError(f"{path / WEIGHTS}: W_enc must be 2-D (d_in, d_sae), got shape {tuple(sd['W_enc'].shape)}")
    W_enc = sd["W_enc"].t().contiguous()  # (n, d)
    b_enc, W_dec, b_dec = sd["b_enc"], sd["W_dec"], sd["b_dec"]
    for key, size in (("d_in", W_enc.shape[1]), ("d_sae", W_enc.shape[0])):
        if cfg.get(key) is not None and number(cfg, key, where, integer=True) != size:
            raise ValueError(f"{path}: {CFG} says {key}={cfg[key]} but W_enc has shape {tuple(sd['W_enc'].shape)}")
    if tuple(b_dec.shape) != (W_enc.shape[1],) or tuple(b_enc.shape) != (W_enc.shape[0],):
        raise ValueError(f"{path / WEIGHTS}: b_enc / b_dec have shapes {tuple(b_enc.shape)} / {tuple(b_dec.shape)}, "
                         f"W_enc needs {(W_enc.shape[0],)} / {(W_enc.shape[1],)}")
    if not _flag(cfg, "apply_b_dec_to_input", True, where):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + ...
        b_enc = b_enc + W_enc @ b_dec
    if _flag(cfg, "rescale_acts_by_decoder_norm", False, where):  # hidden_pre * |W_dec| in, / |W_dec| out
        if tuple(W_dec.shape) != tuple(W_enc.shape):
            raise ValueError(f"{path / WEIGHTS}: W_dec has shape {tuple(W_dec.shape)}, expected {tuple(W_enc.shape)}")
        nrm = W_dec.norm(dim=-1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * nrm[:, None], b_enc * nrm, W_dec / nrm[:, None]
    p = Params(W_enc, b_enc, W_dec, b_dec)
    scale = number(mine, "norm_scale", f"{where} metadata.softsae", default=1.0)
    if arch == "topk":
        return build("topk", unfold(p, scale, "latents"), number(cfg, "k", where, integer=True), scale,
                     backend=backend)
    if arch == "jumprelu":
        if "threshold" not in sd:
            raise ValueError(f"{path / WEIGHTS}: a JumpReLU SAE needs a 'threshold' tensor")
        thr = sd["threshold"]
        if tuple(thr.shape) != (W_enc.shape[0],):
            raise ValueError(f"{path / WEIGHTS}: threshold must have shape {(W_enc.shape[0],)}, got {tuple(thr.shape)}")
        if not bool((thr == thr[0]).all()) or not float(thr[0]) >= 0 or not math.isfinite(float(thr[0])):
            raise ValueError(f"{path}: a JumpReLU SAE with per-latent (or negative) thresholds has no softsae "
                             "equivalent; only the BatchTopK inference form (one threshold >= 0) is supported")
        k = number(mine, "k", f"{where} metadata.softsae", default=None, integer=True)
        k = number(cfg, "k", where, default=None, integer=True) if k is None else k
        if k is None:  # SAELens keeps no k for a saved BatchTopK; softsae trains with it, infers by the threshold
            warnings.warn(f"{path}: no k recorded (metadata.softsae.k or k); the BatchTopK model gets k=1, which "
                          "affects only further training, not inference", stacklevel=2)
            k = 1
        p.threshold = float(thr[0])
        return build("batchtopk", unfold(p, scale, "latents"), k, scale, backend=backend)
    if arch == ARCHITECTURE:
        p.k_est = {k[len("k_estimator."):]: v for k, v in sd.items() if k.startswith("k_estimator.")}
        return build("softsae", unfold(p, scale, "latents"), number(cfg, "k", where), scale,
                     k_max=number(cfg, "k_max", where), alpha=number(cfg, "alpha", where), backend=backend)
    raise ValueError(f"{path}: SAELens architecture {arch!r} has no softsae equivalent "
                     "(supported: topk, jumprelu from BatchTopK, softsae)")


def _flag(cfg: dict, key: str, default: bool, where: Path) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def register() -> None:
    """Register the ``softsae`` architecture with SAELens (idempotent; imports sae_lens)."""
    from softsae.interop import saelens_arch

    saelens_arch.register()
