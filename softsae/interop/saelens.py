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

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from softsae.checkpoint import atomic_write, atomic_write_json
from softsae.interop._common import SAELENS_ARCHITECTURE, Params, build, check_threshold, fold, unfold
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
    atomic_write(out / WEIGHTS, lambda tmp: save_file(sd, tmp))
    atomic_write_json(out / CFG, cfg)
    return out


def is_saelens_dir(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def read(path: str | Path, backend: str = "auto") -> SparseAutoencoder:
    """Read an SAELens directory (written by SAELens or by ``write``) as a softsae model.

    Supported: ``topk`` (also with ``rescale_acts_by_decoder_norm``, folded in), ``jumprelu`` with one
    threshold >= 0 shared by all latents (a saved BatchTopK SAE), ``softsae``; ``apply_b_dec_to_input``
    false is folded into ``b_enc``. Other architectures and per-input normalisations raise ValueError.
    """
    path = Path(path)
    cfg = json.loads((path / CFG).read_text())
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        sd = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    mine = meta.get("softsae") or {}
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):  # the latter has no effect in SAELens' inference SAE
        raise ValueError(f"{path}: normalize_activations={norm!r} is a per-input normalisation softsae cannot express")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    need = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if [k for k in need if k not in sd]:
        raise ValueError(f"{path}: {WEIGHTS} lacks {[k for k in need if k not in sd]} (has {sorted(sd)})")
    W_enc = sd["W_enc"].t().contiguous()  # (n, d)
    b_enc, W_dec, b_dec = sd["b_enc"], sd["W_dec"], sd["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + W_enc @ b_dec
    if cfg.get("rescale_acts_by_decoder_norm", False):  # hidden_pre * |W_dec| on the way in, / |W_dec| on the way out
        nrm = W_dec.norm(dim=-1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * nrm[:, None], b_enc * nrm, W_dec / nrm[:, None]
    p = Params(W_enc, b_enc, W_dec, b_dec)
    scale = float(mine.get("norm_scale", 1.0))
    if arch == "topk":
        return build("topk", unfold(p, scale, "latents"), int(cfg["k"]), scale, backend=backend)
    if arch == "jumprelu":
        thr = sd["threshold"]
        if not bool((thr == thr[0]).all()) or float(thr[0]) < 0:
            raise ValueError(f"{path}: a JumpReLU SAE with per-latent (or negative) thresholds has no softsae "
                             "equivalent; only the BatchTopK inference form (one threshold >= 0) is supported")
        k = mine.get("k", cfg.get("k"))
        if k is None:  # SAELens keeps no k for a saved BatchTopK; softsae trains with it, infers by the threshold
            warnings.warn(f"{path}: no k recorded (metadata.softsae.k or k); the BatchTopK model gets k=1, which "
                          "affects only further training, not inference", stacklevel=2)
            k = 1
        p.threshold = float(thr[0])
        return build("batchtopk", unfold(p, scale, "latents"), int(k), scale, backend=backend)
    if arch == ARCHITECTURE:
        p.k_est = {k[len("k_estimator."):]: v for k, v in sd.items() if k.startswith("k_estimator.")}
        return build("softsae", unfold(p, scale, "latents"), float(cfg["k"]), scale, k_max=float(cfg["k_max"]),
                     alpha=float(cfg["alpha"]), backend=backend)
    raise ValueError(f"{path}: SAELens architecture {arch!r} has no softsae equivalent "
                     "(supported: topk, jumprelu from BatchTopK, softsae)")


def register() -> None:
    """Register the ``softsae`` architecture with SAELens (idempotent; imports sae_lens)."""
    from softsae.interop import saelens_arch

    saelens_arch.register()
