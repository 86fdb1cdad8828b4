"""EleutherAI sparsify format (``eai-sparsify``): ``DIR/cfg.json`` + ``DIR/sae.safetensors``, TopK only.

``sae.safetensors``: ``encoder.weight`` (n, d), ``encoder.bias`` (n,), ``W_dec`` (n, d), ``b_dec`` (d,).
``cfg.json``: the SparseCoderConfig fields (``activation`` "topk", ``k``, ``num_latents``,
``expansion_factor``, ``normalize_decoder``, ``multi_topk``, ``skip_connection``, ``transcode``) plus
``d_in``. sparsify computes ``relu(encoder(x - b_dec))``, keeps the top k, and decodes
``acts @ W_dec + b_dec``, exactly softsae's TopK.

sparsify records no input normalisation; softsae's ``(x - shift) / scale`` is folded in with the
decoder rows kept (unit norm, as ``normalize_decoder`` expects): ``b_enc * scale``,
``b_dec * scale + shift``, latents scale times softsae's. The scale is written to the safetensors
metadata as ``softsae_norm_scale`` (sparsify ignores it), so reading back restores softsae's weights.
"""

from __future__ import annotations

from pathlib import Path

from softsae.fileio import atomic_save_safetensors, atomic_write_json
from softsae.interop._common import (
    Params,
    build,
    checked_reader,
    fold,
    number,
    read_json_object,
    read_safetensors,
    unfold,
)
from softsae.models import SparseAutoencoder, TopKSAE

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"


def write(model: SparseAutoencoder, out: str | Path) -> Path:
    """Write a TopK ``model`` to directory ``out`` in sparsify's layout; other archs raise ValueError."""
    if not isinstance(model, TopKSAE):
        raise ValueError(f"sparsify stores TopK SAEs only; cannot export arch {model.arch!r} "
                         "(use --format saelens or dictionary_learning)")
    out = Path(out)
    p = fold(model, "decoder")
    sd = {"encoder.weight": p.W_enc.contiguous(), "encoder.bias": p.b_enc, "W_dec": p.W_dec.contiguous(),
          "b_dec": p.b_dec}
    cfg = {"activation": "topk", "expansion_factor": max(1, model.n // model.d), "normalize_decoder": True,
           "num_latents": model.n, "k": int(model.k), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": model.d}
    meta = {"format": "pt", "softsae_norm_scale": repr(float(model.norm_scale))}
    atomic_save_safetensors(sd, out / WEIGHTS, metadata=meta)
    atomic_write_json(out / CFG, cfg)
    return out


def is_sparsify_dir(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


@checked_reader
def read(path: str | Path, backend: str = "auto") -> SparseAutoencoder:
    """Read a sparsify SAE directory (TopK activation, no skip connection, not a transcoder); a malformed
    one raises ValueError naming the file."""
    path = Path(path)
    cfg = read_json_object(path / CFG)
    for key, ok in (("activation", "topk"), ("skip_connection", False), ("transcode", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{path}: sparsify {key}={cfg[key]!r} has no softsae equivalent (need {key}={ok!r})")
    sd, meta = read_safetensors(path / WEIGHTS)
    need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    if [k for k in need if k not in sd]:
        raise ValueError(f"{path / WEIGHTS}: lacks {[k for k in need if k not in sd]} (has {sorted(sd)})")
    p = Params(sd["encoder.weight"], sd["encoder.bias"], sd["W_dec"], sd["b_dec"])
    if p.W_enc.dim() != 2:
        raise ValueError(f"{path / WEIGHTS}: encoder.weight must be 2-D, got shape {tuple(p.W_enc.shape)}")
    for key, size in (("d_in", p.W_enc.shape[1]), ("num_latents", p.W_enc.shape[0])):
        if cfg.get(key) and number(cfg, key, path / CFG, integer=True) != size:
            raise ValueError(f"{path}: {CFG} says {key}={cfg[key]} but encoder.weight has shape "
                             f"{tuple(p.W_enc.shape)}")
    scale = number(meta, "softsae_norm_scale", f"{path / WEIGHTS} metadata", default=1.0)
    return build("topk", unfold(p, scale, "decoder"), number(cfg, "k", path / CFG, integer=True), scale,
                 backend=backend)
