"""Saving and loading SAEs: ``save_sae(model, DIR)`` / ``load_sae(DIR)``, the checked reading of
``trainer_state.pt``. The atomic writers
(``atomic_write``, ``atomic_write_json``, ``atomic_torch_save`` ...) live in ``softsae.fileio`` and are
re-exported here.

Layout of a saved model directory::

    DIR/model.safetensors   parameters and buffers; the model config is also in its metadata
    DIR/config.json         the same config, human-readable

Every file is written to a temporary sibling, fsynced and moved into place with ``os.replace`` (the
directory fsynced too), so a crash or a power loss never leaves a half-written file. Reading checks
before trusting: the config's sizes against the header's tensor shapes (on the meta device, nothing
allocated), exact shapes, finite numbers; a malformed file raises ValueError naming it.

The paper's reference format is read and written by ``softsae.interop.reference`` (re-exported here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from softsae.fileio import (  # re-exported: the atomic writers used to live here
    atomic_save_npy,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)
from softsae.interop.reference import from_reference_state_dict, to_reference_state_dict
from softsae.models import SparseAutoencoder, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1

__all__ = ["CONFIG", "FORMAT_VERSION", "WEIGHTS", "atomic_save_npy", "atomic_save_safetensors", "atomic_torch_save",
           "atomic_write", "atomic_write_json", "atomic_write_text", "build_checked", "check_model_config",
           "check_resume_state", "from_reference_state_dict", "load_checked", "load_sae", "load_trainer_state",
           "save_sae", "shapes_of", "to_reference_state_dict"]


def save_sae(model: SparseAutoencoder, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` goes into config.json too."""
    directory = Path(directory)
    config = {"format_version": FORMAT_VERSION, "model": model.config(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(tensors, directory / WEIGHTS, metadata={"softsae_config": json.dumps(config)})
    atomic_write_json(directory / CONFIG, config)
    return directory


def load_sae(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> SparseAutoencoder:
    """Load a model saved by ``save_sae`` (a directory or its model.safetensors), a reference-format
    state dict (``.pt``/``.safetensors`` file), or a directory written by SAELens, dictionary_learning
    or sparsify (detected by its files, see ``softsae.interop``); returns it in eval mode on ``device``,
    running its ops on ``backend`` (the backend it was trained with is not assumed to exist here).

    Files are checked before they are trusted: the sizes in a file's config are compared with the tensor
    shapes in its header before anything is allocated, every number must be finite and every shape exact.
    Any problem with a file raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or file")
    weights = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        from softsae.interop import detect_format, read_foreign  # (interop imports this module)

        fmt = detect_format(path)
        if fmt is None:
            raise FileNotFoundError(
                f"{path}: no {WEIGHTS} in this directory (not a saved softsae model), nor the files of an "
                "SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors) or "
                "dictionary_learning (ae.pt) SAE")
        model = read_foreign(path, fmt, backend=backend)
        model.backend = backend
        return model.to(device).eval()
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} in this directory (not a saved softsae model)")
    model = _read_model(weights, backend)
    model.backend = backend
    return model.to(device).eval()


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_model(path: Path, backend: str) -> SparseAutoencoder:
    """A softsae model file (config in the metadata, checked against the header first) or a reference file."""
    if path.suffix != ".safetensors":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a corrupt file of any kind
            raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
        return from_reference_state_dict(state, backend=backend, source=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype() in _FLOAT_DTYPES)
                      for k in keys}
            raw = meta.get("softsae_config")
            model = None
            if raw is not None:
                model = build_checked(_config_from_metadata(raw, path), header, path)
            state = {k: f.get_tensor(k) for k in keys}
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file of any kind
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if model is None:
        return from_reference_state_dict(state, backend=backend, source=str(path))
    _load_state(model, state, path)
    return model


def _config_from_metadata(raw: str, path: Path) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: the softsae_config metadata is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: the softsae_config metadata must be a mapping with a 'model' mapping, "
                         f"got {type(config).__name__}")
    return config["model"]


_INT_FIELDS = ("d", "n", "k_hidden")
_FLOAT_FIELDS = ("k", "k_max", "alpha", "threshold_beta")
_STR_FIELDS = ("arch", "backend", "decode_mode", "k_round")


def check_model_config(config: Any, where: str | Path) -> dict:
    """Check the types and finiteness of a model config (``model.config()``): ValueError naming ``where``."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the model config must be a mapping, got {type(config).__name__}")
    for key, value in config.items():
        if value is None and key in ("k_max", "k_hidden"):
            continue
        if key in _INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: model config {key} must be a positive int, got {value!r}")
        if key in _FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or not math.isfinite(value)):
            raise ValueError(f"{where}: model config {key} must be a finite number, got {value!r}")
        if key in _STR_FIELDS and not isinstance(value, str):
            raise ValueError(f"{where}: model config {key} must be a string, got {value!r}")
        if key == "alpha_relative" and not isinstance(value, bool):
            raise ValueError(f"{where}: model config {key} must be true or false, got {value!r}")
    return config


def build_checked(config: Any, tensors: dict[str, tuple[tuple[int, ...], bool]], where: str | Path
                  ) -> SparseAutoencoder:
    """Build the model of ``config`` once a model of that config is known (built on the meta device,
    nothing allocated) to hold exactly ``tensors`` (name -> (shape, is floating point)); ValueError naming
    ``where`` otherwise, so a tiny file declaring huge sizes fails before any allocation."""
    check_model_config(config, where)
    try:
        with torch.device("meta"):
            skeleton = build_model(config)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{where}: invalid model config ({type(err).__name__}: {err})") from None
    want = {k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()}
    del skeleton
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    for k, (shape, is_float) in want.items():
        got_shape, got_float = tensors[k]
        if tuple(got_shape) != shape:
            raise ValueError(f"{where}: {k} has shape {tuple(got_shape)}, the config needs {shape}")
        if got_float != is_float:
            raise ValueError(f"{where}: {k} must be {'floating point' if is_float else 'an integer tensor'}")
    return build_model(config)


def _load_state(model: SparseAutoencoder, state: dict[str, Tensor], where: str | Path) -> None:
    """Load a state dict already checked by ``build_checked``; every float tensor must be finite."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: {k} holds NaN or inf values")
    model.load_state_dict(state, strict=True)


def shapes_of(state: Any, where: str | Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, is floating point) of a state dict of tensors; ValueError naming ``where`` otherwise."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{where}: the model weights must be a mapping of names to tensors")
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}


def load_checked(config: Any, state: Any, where: str | Path) -> SparseAutoencoder:
    """``build_checked`` + load ``state`` (a dict of tensors) into it."""
    model = build_checked(config, shapes_of(state, where), where)
    _load_state(model, state, where)
    return model


# ----------------------------------------------------------------------------- trainer state (resume)

_STATE_KEYS = {"step": int, "model_config": dict, "model": dict, "optimizer": dict, "tracker": dict, "rng": dict,
               "torch_rng": Tensor, "train_config": dict}


def load_trainer_state(path: str | Path) -> dict:
    """Read a ``trainer_state.pt`` (no pickled code) and check its layout: ValueError naming ``path``
    for an empty, corrupt or foreign file. The model and optimizer contents are checked by
    ``check_resume_state`` once the model is built."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an empty or corrupt file of any kind
        raise ValueError(f"{path}: cannot read the training state ({type(err).__name__}: {err}); delete it to "
                         "start afresh") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a softsae training state (a {type(state).__name__})")
    for key, typ in _STATE_KEYS.items():
        if not isinstance(state.get(key), typ) or (typ is int and isinstance(state[key], bool)):
            raise ValueError(f"{path}: not a softsae training state ({key!r} missing or not a {typ.__name__})")
    if state["step"] < 0:
        raise ValueError(f"{path}: step must be >= 0, got {state['step']}")
    for f in ("arch", "dict_size", "k", "steps", "batch_size"):
        if f not in state["train_config"]:
            raise ValueError(f"{path}: train_config lacks {f!r}")
    want = torch.get_rng_state()
    rng_t = state["torch_rng"]
    if rng_t.dtype != want.dtype or rng_t.shape != want.shape:
        raise ValueError(f"{path}: torch_rng is not a torch RNG state")
    try:
        import numpy as np

        np.random.default_rng().bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: rng is not a numpy PCG64 state ({err})") from None
    return state


def check_resume_state(state: dict, model: SparseAutoencoder, where: str | Path) -> None:
    """The optimizer moments and dead-latent counters of a training state fit ``model`` (ValueError naming
    ``where``), so that loading them cannot fail half-way or silently broadcast."""
    params = list(model.parameters())
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{where}: optimizer state lacks 'state' / 'param_groups'")
    groups = opt["param_groups"]
    if len(groups) != 1 or not isinstance(groups[0], dict) or list(groups[0].get("params", [])) != list(
            range(len(params))):
        raise ValueError(f"{where}: optimizer param_groups do not match the model's {len(params)} parameters")
    for i, st in opt["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(st, dict):
            raise ValueError(f"{where}: optimizer state entry {i!r} does not match the model")
        for name, v in st.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{where}: optimizer state {i}/{name} is not a tensor")
            if name != "step" and (v.shape != params[i].shape or not bool(torch.isfinite(v).all())):
                raise ValueError(f"{where}: optimizer state {i}/{name} has shape {tuple(v.shape)} or non-finite "
                                 f"values; parameter {i} has shape {tuple(params[i].shape)}")
    tr = state["tracker"]
    t = tr.get("tokens_since_fired")
    if not isinstance(t, Tensor) or tuple(t.shape) != (model.n,) or t.is_floating_point() or isinstance(
            tr.get("threshold"), bool) or not isinstance(tr.get("threshold"), int):
        raise ValueError(f"{where}: tracker state does not match a model of n={model.n} latents")
