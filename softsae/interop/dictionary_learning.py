"""dictionary_learning format: ``DIR/ae.pt`` (a torch state dict) + ``DIR/config.json`` as its trainers write them.

``ae.pt`` keys (dictionary_learning orientation): ``encoder.weight`` (n, d), ``encoder.bias`` (n,),
``decoder.weight`` (d, n), ``b_dec`` (d,), and the buffers ``k`` (int32 scalar) and ``threshold``
(float32 scalar). ``config.json`` is ``{"trainer": {...}}`` with ``dict_class`` (``AutoEncoderTopK``,
``BatchTopKSAE``), ``trainer_class``, ``activation_dim``, ``dict_size``, ``k`` and, when the trainer
normalised activations, ``norm_factor``.

Normalisation follows the library: a model trained on ``x / norm_factor`` is saved after
``scale_biases(norm_factor)`` (encoder bias, b_dec and threshold times norm_factor), so ``ae.pt`` works
on raw activations and its latents are norm_factor times the normalised-space ones. softsae's
``(x - shift) / scale`` is folded the same way (shift into b_dec) and ``norm_factor`` = scale is
recorded; reading divides it back out (see ``softsae.interop._common``, convention "decoder").

SoftSAE has no class in dictionary_learning: it is written in the authors' format (the keys of
``softsae.interop.reference.to_reference_state_dict``, normalisation kept as ``norm_factor``/``shift_factor``
keys) with ``dict_class`` "SoftSAE", and read back by ``softsae.interop.reference.from_reference_state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from softsae.fileio import atomic_torch_save, atomic_write_json
from softsae.interop._common import (
    Params,
    build,
    check_threshold,
    checked_reader,
    fold,
    mapping,
    number,
    read_json_object,
    unfold,
)
from softsae.interop.reference import _scalar, from_reference_state_dict, to_reference_state_dict
from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE

AE = "ae.pt"
CONFIG = "config.json"
DICT_CLASSES = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE", "softsae": "SoftSAE"}
TRAINER_CLASSES = {"topk": "TopKTrainer", "batchtopk": "BatchTopKTrainer", "softsae": "SoftTopKTrainer"}


def write(model: SparseAutoencoder, out: str | Path, lm_name: str | None = None, layer: int | None = None,
          submodule_name: str | None = None) -> Path:
    """Write ``model`` to directory ``out`` as ``ae.pt`` + ``config.json``; returns ``out``."""
    check_threshold(model, "dictionary_learning")
    out = Path(out)
    trainer: dict[str, Any] = {"trainer_class": TRAINER_CLASSES[model.arch], "dict_class": DICT_CLASSES[model.arch],
                               "activation_dim": model.d, "dict_size": model.n, "lm_name": lm_name, "layer": layer,
                               "submodule_name": submodule_name, "exported_by": "softsae"}
    if isinstance(model, SoftSAE):
        sd = {k: v.detach().cpu().float() for k, v in to_reference_state_dict(model).items()}
        trainer.update(k=float(model.k), soft_topk_alpha=float(model.alpha), k_max=float(model.k_max))
    elif isinstance(model, (TopKSAE, BatchTopKSAE)):
        p = fold(model, "decoder")
        sd = {"k": torch.tensor(int(model.k), dtype=torch.int32),
              "threshold": torch.tensor(-1.0 if p.threshold is None else p.threshold, dtype=torch.float32),
              "encoder.weight": p.W_enc, "encoder.bias": p.b_enc, "decoder.weight": p.W_dec.t().contiguous(),
              "b_dec": p.b_dec}
        trainer.update(k=int(model.k), norm_factor=float(model.norm_scale))
        if isinstance(model, BatchTopKSAE):
            trainer["threshold_beta"] = float(model.threshold_beta)
    else:
        raise ValueError(f"cannot export arch {model.arch!r} to dictionary_learning")
    atomic_torch_save(sd, out / AE)
    atomic_write_json(out / CONFIG, {"trainer": trainer})
    return out


def is_dictionary_learning_dir(path: Path) -> bool:
    return (path / AE).is_file()


@checked_reader
def read(path: str | Path, backend: str = "auto") -> SparseAutoencoder:
    """Read a dictionary_learning directory (``AutoEncoderTopK``, ``BatchTopKSAE``, or a SoftSAE in the
    authors' format) as a softsae model. ``config.json`` is optional for the authors' format. A malformed
    directory raises ValueError naming the file."""
    path = Path(path)
    try:
        sd = torch.load(path / AE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file of any kind
        raise ValueError(f"{path / AE}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path / AE}: expected a state dict, got {type(sd).__name__}")
    trainer: dict = {}
    if (path / CONFIG).is_file():
        trainer = mapping(read_json_object(path / CONFIG), "trainer", path / CONFIG)
    dict_class = trainer.get("dict_class")
    if dict_class in ("SoftSAE", "SoftTopKSAE") or "k_estimator.0.weight" in sd:
        return from_reference_state_dict(sd, arch="softsae", backend=backend, source=str(path / AE))
    arch = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk"}.get(dict_class)
    if arch is None:
        raise ValueError(f"{path}: dictionary_learning dict_class {dict_class!r} has no softsae equivalent "
                         f"(supported: {sorted(DICT_CLASSES.values())})")
    need = ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"]
    if [k for k in need if k not in sd]:
        raise ValueError(f"{path / AE}: lacks {[k for k in need if k not in sd]} (has {sorted(map(str, sd))})")
    bad = [k for k in need if not isinstance(sd[k], torch.Tensor) or not sd[k].is_floating_point()]
    if bad:
        raise ValueError(f"{path / AE}: {bad} must be floating-point tensors")
    if sd["decoder.weight"].dim() != 2:
        raise ValueError(f"{path / AE}: decoder.weight must be 2-D (d, n), got {tuple(sd['decoder.weight'].shape)}")
    k = number(trainer, "k", path / CONFIG, default=None, integer=True)
    if k is None:
        k = _scalar(sd, "k", source=str(path / AE))
    if k is None:
        raise ValueError(f"{path}: neither config.json nor ae.pt records k")
    if int(k) != k:
        raise ValueError(f"{path / AE}: k must be an integer, got {k}")
    thr = _scalar(sd, "threshold", source=str(path / AE))
    p = Params(sd["encoder.weight"].float(), sd["encoder.bias"].float(), sd["decoder.weight"].float().t().contiguous(),
               sd["b_dec"].float(), thr if arch == "batchtopk" else None)
    scale = number(trainer, "norm_factor", path / CONFIG, default=None) or 1.0
    return build(arch, unfold(p, scale, "decoder"), int(k), scale, backend=backend)
